import { test } from "node:test";
import assert from "node:assert/strict";
import { explicitValue, Inspected, resolveServerCommand, serverSettings, settingsChange } from "../src/settings";

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
