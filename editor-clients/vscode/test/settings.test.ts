import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import {
  explicitValue,
  findServer,
  Inspected,
  resolveServerCommand,
  serverNotFoundMessage,
  serverSettings,
  settingsChange,
} from "../src/settings";

function inspector(values: Record<string, Inspected>) {
  return (key: string) => values[key];
}

test("only explicitly set server keys become initializationOptions", () => {
  const opts = serverSettings(
    inspector({
      maxTokens: { defaultValue: 24, globalValue: 40 },
      stop: { defaultValue: "sentence" },
      model: { defaultValue: "default", workspaceValue: "/models/tiny" },
      enabled: { defaultValue: true, globalValue: false },
    }),
  );
  assert.deepEqual(opts, { maxTokens: 40, model: "/models/tiny", enabled: false });
});

test("workspace beats global, folder beats workspace", () => {
  assert.equal(explicitValue({ globalValue: 1, workspaceValue: 2 }), 2);
  assert.equal(explicitValue({ globalValue: 1, workspaceValue: 2, workspaceFolderValue: 3 }), 3);
  assert.equal(explicitValue({ defaultValue: 9 }), undefined);
  assert.equal(explicitValue(undefined), undefined);
});

test("values of the wrong type, empty strings and unknown keys are not sent", () => {
  const opts = serverSettings(
    inspector({
      maxTokens: { globalValue: "many" },
      config: { globalValue: "  " },
      temperature: { globalValue: Number.NaN },
      debounceMs: { globalValue: 0 },
      bogus: { globalValue: 1 },
    }),
  );
  assert.deepEqual(opts, { debounceMs: 0 });
});

test("settingsChange sends changed keys and resets removed ones to their default", () => {
  const change = settingsChange(
    { maxTokens: 40, stop: "line", dtype: "float32" },
    { maxTokens: 40, stop: "word", debounceMs: 50 },
    { maxTokens: 24, stop: "sentence", debounceMs: 120 },
  );
  // dtype has no declared default: the server keeps what it has.
  assert.deepEqual(change, { stop: "word", debounceMs: 50 });
  assert.deepEqual(settingsChange({ maxTokens: 40 }, {}, { maxTokens: 24 }), { maxTokens: 24 });
  assert.equal(settingsChange({ maxTokens: 40 }, { maxTokens: 40 }, {}), undefined);
});

const noFs = { isDir: () => false, exists: () => false };

test("server command: plain name and args pass through", () => {
  assert.deepEqual(resolveServerCommand("tinymorph", ["lsp"], {}, noFs), { command: "tinymorph", args: ["lsp"] });
  assert.deepEqual(resolveServerCommand("", ["lsp", "--model", "x"], {}, noFs), {
    command: "tinymorph",
    args: ["lsp", "--model", "x"],
  });
});

test("server command: ~ and ${workspaceFolder} expand, a venv folder maps to bin/tinymorph", () => {
  const fs = {
    isDir: (p: string) => p === "/home/u/.venv" || p === "/home/u/.venv/",
    exists: (p: string) => p === "/home/u/.venv/bin/tinymorph",
  };
  assert.equal(resolveServerCommand("~/.venv/", ["lsp"], { home: "/home/u" }, fs).command, "/home/u/.venv/bin/tinymorph");
  assert.equal(
    resolveServerCommand("${workspaceFolder}/.venv", ["lsp"], { workspaceFolder: "/home/u" }, fs).command,
    "/home/u/.venv/bin/tinymorph",
  );
  assert.equal(resolveServerCommand("~/bin/tm", ["lsp"], { home: "/h" }, noFs).command, "/h/bin/tm");
});

test("server command: a Windows venv uses Scripts\\tinymorph.exe", () => {
  const fs = { isDir: () => true, exists: (p: string) => p.endsWith("Scripts\\tinymorph.exe") };
  assert.equal(
    resolveServerCommand("C:\\env", ["lsp"], { platform: "win32" }, fs).command,
    "C:\\env\\Scripts\\tinymorph.exe",
  );
});

// The package manifest, as VS Code reads it (the tests run from out/test/).
const manifest = JSON.parse(readFileSync(join(__dirname, "..", "..", "package.json"), "utf8"));
const properties = manifest.contributes.configuration.properties;

test("issue 12.4: the server settings apply in User settings of local, remote and code-server windows", () => {
  // VS Code reads User settings of a remote window (code-server is one) only for these scopes
  // (LOCAL_MACHINE_SCOPES), and Remote settings only for REMOTE_MACHINE_SCOPES; "machine" and
  // "machine-overridable" are greyed out in User settings there ("cannot be applied in this window").
  const local = ["application", "window", "resource", "language-overridable"];
  const remote = ["machine", "application-machine", "window", "resource", "language-overridable", "machine-overridable"];
  for (const key of ["tinymorph.server.command", "tinymorph.server.args", "tinymorph.server.env"]) {
    const scope = properties[key].scope ?? "window";
    assert.ok(local.includes(scope) && remote.includes(scope), `${key} has scope ${scope}`);
  }
});

test("issue 12.4: a missing server is found out before spawning, naming the path tried", () => {
  const exe = new Set(["/opt/venv/bin/tinymorph", "/usr/local/bin/tinymorph"]);
  const fs = { isExecutable: (p: string) => exe.has(p) };
  assert.deepEqual(findServer("/opt/venv/bin/tinymorph", { PATH: "" }, fs), {
    found: "/opt/venv/bin/tinymorph",
    tried: "/opt/venv/bin/tinymorph",
  });
  assert.deepEqual(findServer("tinymorph", { PATH: "/usr/bin:/usr/local/bin/" }, fs), {
    found: "/usr/local/bin/tinymorph",
    tried: "tinymorph on PATH",
  });
  const missing = findServer("/home/me/tinymorph/.venv/bin/tinymorph", { PATH: "/usr/local/bin" }, fs);
  assert.equal(missing.found, undefined);
  const message = serverNotFoundMessage(missing, "/home/me/tinymorph/.venv");
  assert.match(message, /tried \/home\/me\/tinymorph\/\.venv\/bin\/tinymorph/);
  assert.match(message, /tinymorph\.server\.command/);
  assert.equal(findServer("tinymorph", { PATH: "/usr/bin" }, fs).found, undefined);
  assert.equal(
    findServer("tinymorph", { PATH: "C:\\env\\Scripts", platform: "win32", PATHEXT: ".EXE" }, {
      isExecutable: (p) => p === "C:\\env\\Scripts\\tinymorph.EXE",
    }).found,
    "C:\\env\\Scripts\\tinymorph.EXE",
  );
});

test("issue 12.5: Restricted Mode is declared, with the settings an untrusted workspace must not set", () => {
  const trust = manifest.capabilities?.untrustedWorkspaces;
  assert.ok(trust, "capabilities.untrustedWorkspaces is declared");
  assert.equal(trust.supported, "limited");
  assert.ok(typeof trust.description === "string" && /trust/i.test(trust.description));
  for (const key of ["tinymorph.server.command", "tinymorph.server.args", "tinymorph.server.env", "tinymorph.model", "tinymorph.config"]) {
    assert.ok(trust.restrictedConfigurations.includes(key), key);
  }
});

test("issue 12.3: Escape and Ctrl+Alt+Backspace dismiss through tinymorph", () => {
  const keys = manifest.contributes.keybindings.filter((k: { command: string }) => k.command === "tinymorph.dismissSuggestion");
  const esc = keys.find((k: { key: string }) => k.key === "escape");
  assert.ok(esc, "Escape is bound");
  assert.match(esc.when, /inlineSuggestionVisible/);
  assert.match(esc.when, /tinymorph\.hintAtCursor/);
  assert.ok(keys.some((k: { key: string }) => k.key === "ctrl+alt+backspace"));
});

test("issue 12.1: Tab accepts the suggestion the hint at the cursor shows (while it streams)", () => {
  const tab = manifest.contributes.keybindings.find(
    (k: { key: string; command: string }) => k.key === "tab" && k.command === "tinymorph.acceptSuggestion",
  );
  assert.ok(tab, "Tab is bound for the hint at the cursor");
  assert.match(tab.when, /tinymorph\.hintAtCursor/);
  assert.match(tab.when, /!inlineSuggestionVisible/, "ghost text keeps VS Code's own Tab");
  assert.match(tab.when, /!suggestWidgetVisible/);
});
