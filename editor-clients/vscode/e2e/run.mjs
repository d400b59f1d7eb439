// End-to-end check of the extension in real VS Code (code-server in Chromium, driven by playwright-core).
// Opt-in: TINYMORPH_E2E_VSCODE=1 node e2e/run.mjs   (after `npm ci && npm run compile` and e2e/setup.sh)
//
// It installs the extension folder (or TINYMORPH_VSIX) into a fresh code-server, opens a markdown
// file, types, waits for the ghost text and the inlay hint, checks that the ghost text grows to the
// whole finished suggestion and that Tab inserts all of it, accepts word by word, dismisses with
// Ctrl+Alt+Backspace and with Escape (the suggestion must stay away until the text changes), steers
// through the feature QuickPick and opens the steered-vs-unsteered view. The server command comes
// from User settings with the server's folder removed from PATH (it must not fall back to a bare
// `tinymorph`). Screenshots and a JSON report go to e2e/results/ (TINYMORPH_E2E_OUT).
// Exit code 0 = every check passed.
//
// Environment:
//   TINYMORPH_E2E_VSCODE=1     required (otherwise the script only says it was skipped)
//   TINYMORPH_SERVER           JSON list: server command and args (default ["tinymorph","lsp"])
//   TINYMORPH_E2E_SETTINGS     JSON object of extra user settings (e.g. {"tinymorph.maxTokens": 12})
//   TINYMORPH_E2E_TOOLS        folder prepared by e2e/setup.sh (default e2e/.tools)
//   TINYMORPH_E2E_FEATURE      feature search query for the steering step (default "")
//   TINYMORPH_E2E_PICK         pick the first search result containing this text, e.g. "tiny:" (default: first)
//   TINYMORPH_E2E_TIMEOUT_MS   wait for model load / suggestions (default 180000)
//   TINYMORPH_VSIX             install this .vsix instead of copying the folder
//   TINYMORPH_E2E_LOG=debug    code-server log level (the tinymorph log then has debug lines)
//   TINYMORPH_E2E_KEEP=1       keep the temporary user-data folder (logs under user-data/logs)

import { spawn, spawnSync } from "node:child_process";
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { delimiter, dirname, isAbsolute, join, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const extDir = resolve(dirname(fileURLToPath(import.meta.url)), "..");

if (process.env.TINYMORPH_E2E_VSCODE !== "1") {
  console.log("skipped: set TINYMORPH_E2E_VSCODE=1 to run the VS Code end-to-end check");
  process.exit(0);
}

const tools = resolve(process.env.TINYMORPH_E2E_TOOLS ?? join(extDir, "e2e", ".tools"));
const outDir = resolve(process.env.TINYMORPH_E2E_OUT ?? join(extDir, "e2e", "results"));
const timeout = Number(process.env.TINYMORPH_E2E_TIMEOUT_MS ?? 180000);
const serverCmd = JSON.parse(process.env.TINYMORPH_SERVER ?? '["tinymorph", "lsp"]');
const extraSettings = JSON.parse(process.env.TINYMORPH_E2E_SETTINGS ?? "{}");
const featureQuery = process.env.TINYMORPH_E2E_FEATURE ?? "";
const featurePick = process.env.TINYMORPH_E2E_PICK ?? "";
const node24 = join(tools, "node24", "bin", "node");
const codeServer = join(tools, "cs", "node_modules", "code-server", "out", "node", "entry.js");
const playwrightPath = join(tools, "cs", "node_modules", "playwright-core", "index.mjs");

for (const [what, path] of [
  ["Node 24 (run e2e/setup.sh)", node24],
  ["code-server (run e2e/setup.sh)", codeServer],
  ["playwright-core (run e2e/setup.sh)", playwrightPath],
  ["compiled extension (npm run compile)", join(extDir, "out", "src", "extension.js")],
]) {
  if (!existsSync(path)) {
    console.error(`missing ${what}: ${path}`);
    process.exit(2);
  }
}
const { chromium } = await import(pathToFileURL(playwrightPath).href);

const report = { steps: [], serverCmd };
rmSync(outDir, { recursive: true, force: true });
mkdirSync(outDir, { recursive: true });
const work = mkdtempSync(join(tmpdir(), "tinymorph-e2e-"));
const userData = join(work, "user-data");
const extensions = join(work, "extensions");
const workspace = join(work, "workspace");
for (const d of [join(userData, "User"), extensions, workspace]) mkdirSync(d, { recursive: true });
writeFileSync(join(workspace, "story.md"), "");

/** The folder a user would copy into ~/.vscode/extensions: manifest, compiled code, production deps. */
function installExtensionFolder() {
  const target = join(extensions, "tinymorph.tinymorph-0.1.0");
  mkdirSync(target, { recursive: true });
  cpSync(join(extDir, "package.json"), join(target, "package.json"));
  cpSync(join(extDir, "out", "src"), join(target, "out", "src"), { recursive: true });
  const ls = spawnSync("npm", ["ls", "--omit=dev", "--all", "--parseable"], { cwd: extDir, encoding: "utf8" });
  for (const path of ls.stdout.split("\n").filter((p) => p.includes("node_modules"))) {
    cpSync(path, join(target, path.slice(extDir.length)), { recursive: true });
  }
  return target;
}

function installVsix(vsix) {
  const r = spawnSync(node24, [codeServer, "--extensions-dir", extensions, "--user-data-dir", userData, "--install-extension", vsix], {
    encoding: "utf8",
  });
  if (r.status !== 0) throw new Error(`--install-extension failed: ${r.stdout}\n${r.stderr}`);
  return vsix;
}

function freePort() {
  return new Promise((resolvePort) => {
    const srv = createServer();
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolvePort(port));
    });
  });
}

async function step(name, fn) {
  const t0 = Date.now();
  try {
    const value = await fn();
    report.steps.push({ name, ok: true, ms: Date.now() - t0, value });
    console.log(`ok   ${name} (${Date.now() - t0} ms)${value !== undefined ? ": " + JSON.stringify(value) : ""}`);
    return value;
  } catch (err) {
    report.steps.push({ name, ok: false, ms: Date.now() - t0, error: String(err?.stack ?? err) });
    console.log(`FAIL ${name}: ${err?.message ?? err}`);
    throw err;
  }
}

const clean = (text) => text.replace(/\u00a0/g, " ");

let codeServerProc;
let browser;
let page;
let shot = 0;
const screenshot = async (name) => {
  const file = join(outDir, `${String(++shot).padStart(2, "0")}-${name}.png`);
  await page.screenshot({ path: file });
  return file;
};

/** Document text as rendered: the editor's lines without ghost text and inlay hints. */
async function editorText() {
  return clean(
    await page.evaluate(() =>
      [...document.querySelectorAll(".editor-instance .monaco-editor .view-lines .view-line")]
        .sort((a, b) => parseFloat(a.style.top) - parseFloat(b.style.top))
        .map((line) =>
          [...line.querySelectorAll("span > span")]
            .filter((s) => !/ghost-text|dyn-rule/.test(s.className))
            .map((s) => s.textContent)
            .join(""),
        )
        .join("\n"),
    ),
  );
}

/** Ghost text: its first line is a decoration on the cursor line, further lines sit in a view zone. */
async function ghostText() {
  return clean(
    await page.evaluate(() => {
      const editor = ".editor-instance .monaco-editor";
      const inline = [...document.querySelectorAll(`${editor} .ghost-text-decoration`)].map((s) => s.textContent).join("");
      const below = [...document.querySelectorAll(`${editor} .ghost-text`)].map((s) => s.textContent);
      return [inline, ...below].filter((t) => t).join("\n");
    }),
  );
}

/** Inlay hints are injected text; in a markdown file nothing else injects text. */
async function hintText() {
  return clean(
    await page.evaluate(() =>
      [...document.querySelectorAll(".editor-instance .monaco-editor .view-line span[class*='dyn-rule']")]
        .map((s) => s.textContent)
        .join(""),
    ),
  );
}

async function statusText() {
  return clean(await page.locator(".statusbar-item", { hasText: "tinymorph" }).first().innerText()).trim();
}

async function waitFor(what, fn, ms = timeout) {
  const end = Date.now() + ms;
  for (;;) {
    const value = await fn();
    if (value) return value;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await page.waitForTimeout(100);
  }
}

/** Every *.log file under `dir` (code-server writes the extension's output channel there). */
function logFiles(dir) {
  const out = [];
  if (!existsSync(dir)) return out;
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) out.push(...logFiles(path));
    else if (entry.name.endsWith(".log")) out.push(path);
  }
  return out;
}

/** A Python repr of a str ('…' or "…"), as the server's log line prints the suggestion. */
function unrepr(text) {
  const body = text.slice(1, -1);
  return body.replace(/\\(x[0-9a-f]{2}|u[0-9a-f]{4}|.)/gi, (_, c) => {
    if (c === "n") return "\n";
    if (c === "t") return "\t";
    if (c === "r") return "\r";
    if (c[0] === "x" || c[0] === "u") return String.fromCharCode(parseInt(c.slice(1), 16));
    return c;
  });
}

/**
 * Finished suggestions as the server logged them (`window/logMessage`, in the tinymorph output):
 * "suggestion v12: ttft … stop sentence: ' she was killed in the sea.'", oldest first.
 */
function finishedSuggestions() {
  const found = [];
  for (const file of logFiles(join(userData, "logs"))) {
    for (const line of readFileSync(file, "utf8").split("\n")) {
      const m = /suggestion v(\d+): .* stop ([\w-]+): ('.*'|".*")\s*$/.exec(line);
      if (m) found.push({ version: Number(m[1]), stop: m[2], text: unrepr(m[3]), line });
    }
  }
  return found.sort((a, b) => a.version - b.version);
}

/** The newest finished suggestion once no newer one arrived for `quietMs`. */
async function settledSuggestion(afterCount, quietMs = 1500) {
  let last;
  let since = Date.now();
  return waitFor("a finished suggestion in the server log", async () => {
    const all = finishedSuggestions();
    if (all.length <= afterCount) return undefined;
    const newest = all[all.length - 1];
    if (!last || newest.version !== last.version) {
      last = newest;
      since = Date.now();
      return undefined;
    }
    return Date.now() - since >= quietMs ? newest : undefined;
  });
}

async function runCommand(title) {
  await page.keyboard.press("F1");
  await page.locator(".quick-input-widget input").waitFor();
  await page.keyboard.type(title, { delay: 10 });
  await page.locator(".quick-input-list .monaco-list-row", { hasText: title.replace(/^>\s*/, "").split(": ").pop() }).first().waitFor();
  await page.keyboard.press("Enter");
}

let failed = false;
try {
  await step("install extension", () =>
    process.env.TINYMORPH_VSIX ? installVsix(resolve(process.env.TINYMORPH_VSIX)) : installExtensionFolder(),
  );
  const settings = {
    "tinymorph.server.command": serverCmd[0],
    "tinymorph.server.args": serverCmd.slice(1),
    "workbench.startupEditor": "none",
    "security.workspace.trust.enabled": false,
    "chat.disableAIFeatures": true,
    "workbench.secondarySideBar.defaultVisibility": "hidden",
    "editor.fontFamily": "monospace",
    // Visual lines = document lines, so the rendered text can be compared with what was typed.
    "[markdown]": { "editor.wordWrap": "off" },
    ...extraSettings,
  };
  writeFileSync(join(userData, "User", "settings.json"), JSON.stringify(settings, null, 2));

  const port = await freePort();
  const galleryPort = await freePort();
  // The server must come from tinymorph.server.command in User settings: take its folder off PATH,
  // so a fallback to a bare `tinymorph` would fail (issue 12, VS Code 4).
  const serverDir = isAbsolute(serverCmd[0]) ? dirname(serverCmd[0]) : undefined;
  const PATH = (process.env.PATH ?? "")
    .split(delimiter)
    .filter((d) => d && resolve(d) !== serverDir)
    .join(delimiter);
  report.serverOffPath = !!serverDir;
  /** Starts code-server on `onPort` (workspace trust off unless `trust`). */
  const startCodeServer = async (onPort, folder, trust = false) => {
    codeServerProc = spawn(
      node24,
      [codeServer, "--auth", "none", "--bind-addr", `127.0.0.1:${onPort}`, "--user-data-dir", userData,
        "--extensions-dir", extensions, "--disable-telemetry", "--disable-update-check",
        ...(trust ? [] : ["--disable-workspace-trust"]), "--config", join(userData, "config.yaml"),
        ...(process.env.TINYMORPH_E2E_LOG ? ["--log", process.env.TINYMORPH_E2E_LOG] : []), folder],
      // An unused loopback gallery: code-server never looks for a marketplace outside.
      { env: { ...process.env, PATH, EXTENSIONS_GALLERY: JSON.stringify({ serviceUrl: `http://127.0.0.1:${galleryPort}/` }) } },
    );
    let log = "";
    codeServerProc.stdout.on("data", (d) => (log += d));
    codeServerProc.stderr.on("data", (d) => (log += d));
    const end = Date.now() + 60000;
    while (!log.includes("HTTP server listening")) {
      if (Date.now() > end || codeServerProc.exitCode !== null) throw new Error(`code-server did not start:\n${log}`);
      await new Promise((r) => setTimeout(r, 200));
    }
    return `http://127.0.0.1:${onPort}/`;
  };
  await step("start code-server", () => startCodeServer(port, workspace));

  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  page = await browser.newPage({ viewport: { width: 1400, height: 900 } });

  await step("open story.md", async () => {
    await page.goto(`http://127.0.0.1:${port}/?folder=${encodeURIComponent(workspace)}`);
    await page.locator(".explorer-folders-view .monaco-list-row", { hasText: "story.md" }).click({ timeout: 60000 });
    await page.locator(".editor-instance .monaco-editor .view-lines").waitFor({ timeout: 30000 });
  });

  // Every status bar text while the run goes on (generating must show while a suggestion is made).
  report.statusTimeline = [];
  const t0 = Date.now();
  const statusPoll = setInterval(async () => {
    const text = await statusText().catch(() => "");
    if (text && report.statusTimeline.at(-1)?.text !== text) report.statusTimeline.push({ ms: Date.now() - t0, text });
  }, 100);
  report.statusSeen = [];
  report.statusReady = await step("server ready (status bar)", () =>
    waitFor("tinymorph ready in the status bar", async () => {
      const text = await statusText().catch(() => "");
      // Keep every state shown on the way (starting, loading NN%, ready) for the report.
      if (text && report.statusSeen.at(-1) !== text) report.statusSeen.push(text);
      if (/tinymorph error/.test(text)) throw new Error(`server error: ${text}`);
      return /tinymorph (ready|\d)/.test(text) ? text : undefined;
    }),
  );
  console.log(`     status bar on the way: ${JSON.stringify(report.statusSeen)}`);
  await screenshot("ready");

  const typed = "Once upon a time, the old king";
  report.ghost = await step("type and see ghost text", async () => {
    await page.locator(".editor-instance .monaco-editor .view-lines").click();
    await page.keyboard.type(typed, { delay: 40 });
    const typedAt = Date.now();
    // Issue 12, VS Code 2: the text shows (as the hint at the cursor) as soon as the first token
    // exists, before the ghost text of the finished suggestion.
    let firstHint;
    const ghost = await waitFor("ghost text", async () => {
      const hint = (await hintText()).trim();
      if (hint && !firstHint) {
        firstHint = { ms: Date.now() - typedAt, text: hint };
        await screenshot("streaming-hint-at-cursor");
      }
      return (await ghostText()).trim() || undefined;
    });
    const ghostMs = Date.now() - typedAt;
    if (ghostMs > 3000 && !firstHint) throw new Error(`nothing visible for ${ghostMs} ms before the ghost text`);
    return { ghost, ghostMs, firstHint };
  });
  report.statusAfterSuggestion = await statusText();
  await screenshot("ghost-text");

  // Issue 12, VS Code 1 and 2: the ghost text follows the suggestion to its end, and the status bar
  // says "generating" while it is generated.
  report.ghostWhole = await step("ghost text is the whole finished suggestion", async () => {
    const finished = await settledSuggestion(0);
    const statusWhile = new Set(report.statusSeen);
    const ghost = await waitFor(
      "ghost text equal to the finished suggestion",
      async () => {
        const g = await ghostText();
        return g === finished.text ? g : undefined;
      },
      15000,
    ).catch(async (err) => {
      throw new Error(`${err.message}: ghost ${JSON.stringify(await ghostText())}, finished ${JSON.stringify(finished.text)}`);
    });
    if (!report.statusTimeline.some((s) => /tinymorph generating/.test(s.text))) {
      throw new Error(`the status bar never said generating: ${JSON.stringify(report.statusTimeline)}`);
    }
    return { ghost, finished: finished.text, version: finished.version, statusSeenEarlier: [...statusWhile] };
  });
  await screenshot("ghost-text-whole");

  report.hint = await step("move the cursor away and see the inlay hint", async () => {
    await page.keyboard.press("ArrowLeft");
    const hint = await waitFor("inlay hint", async () => (await hintText()).trim() || undefined, 15000);
    await screenshot("inlay-hint");
    await page.keyboard.press("End");
    return hint;
  });

  report.afterTab = await step("Tab accepts the ghost text", async () => {
    const ghost = await waitFor("ghost text back at the anchor", async () => (await ghostText()) || undefined, 15000);
    if (ghost !== report.ghostWhole.finished) {
      throw new Error(`ghost text back at the anchor ${JSON.stringify(ghost)} is not the suggestion ${JSON.stringify(report.ghostWhole.finished)}`);
    }
    await page.keyboard.press("Tab");
    const text = await waitFor("accepted text", async () => {
      const t = await editorText();
      return t.length > typed.length ? t : undefined;
    }, 15000);
    // Issue 12, VS Code 1: Tab inserts all that was shown, not the first streamed piece.
    const want = typed + report.ghostWhole.finished;
    if (!ghost.includes("\n") && text.trimEnd() !== want.trimEnd()) {
      throw new Error(`after Tab ${JSON.stringify(text)}, want ${JSON.stringify(want)}`);
    }
    if (!text.startsWith(typed + ghost.split("\n")[0].trimEnd())) throw new Error(`text ${JSON.stringify(text)} lacks ghost ${JSON.stringify(ghost)}`);
    return text;
  });
  await screenshot("accepted");

  report.afterWord = await step("accept next word (Ctrl+Alt+Right)", async () => {
    await page.keyboard.press("Control+End");
    await page.keyboard.type(" Then", { delay: 40 });
    const before = await editorText();
    await waitFor("ghost text", async () => (await ghostText()).trim() || undefined);
    await page.keyboard.press("Control+Alt+ArrowRight");
    const after = await waitFor("one more word", async () => {
      const t = await editorText();
      return t !== before ? t : undefined;
    }, 15000);
    if (!after.startsWith(before)) throw new Error(`word accept changed earlier text: ${JSON.stringify(after)}`);
    const word = after.slice(before.length);
    if (!/^\s*\S+$/.test(word.split("\n")[0]) && word.trim() !== "") throw new Error(`not one word: ${JSON.stringify(word)}`);
    return { before, after };
  });
  await screenshot("accepted-word");

  // Issue 12, VS Code 3: a dismissed suggestion stays dismissed (ghost text and inlay hint, and Tab
  // does not insert it) until the text changes.
  const gone = async (what, ms = 3000) => {
    const end = Date.now() + ms;
    while (Date.now() < end) {
      const [g, h] = [await ghostText(), await hintText()];
      if (g.trim() || h.trim()) throw new Error(`${what}: still shown: ghost ${JSON.stringify(g)}, hint ${JSON.stringify(h)}`);
      await page.waitForTimeout(100);
    }
  };
  for (const [name, key, more] of [
    ["dismiss with Ctrl+Alt+Backspace", "Control+Alt+Backspace", " Later that night"],
    ["dismiss with Escape", "Escape", " The next morning"],
  ]) {
    report[name] = await step(name, async () => {
      await page.keyboard.press("Control+End");
      await page.keyboard.type(more, { delay: 40 });
      const shown = await waitFor("ghost text", async () => (await ghostText()).trim() || undefined);
      await settledSuggestion(finishedSuggestions().length - 1, 800).catch(() => undefined);
      await page.keyboard.press(key);
      // The command goes from the browser to the extension host and back: allow it a moment.
      const hiddenAfter = Date.now();
      await waitFor("the dismissal to hide ghost text and hint", async () => !(await ghostText()).trim() && !(await hintText()).trim(), 3000);
      const hideMs = Date.now() - hiddenAfter;
      await gone("after the dismissal", 2500);
      const before = await editorText();
      // Moving the cursor away and back must not bring it back as an inlay hint or ghost text.
      await page.keyboard.press("ArrowLeft");
      await gone("cursor moved away");
      await page.keyboard.press("End");
      await gone("cursor back at the end");
      await screenshot(name.replace(/\W+/g, "-"));
      // Tab inserts indentation, not the dismissed suggestion.
      await page.keyboard.press("Tab");
      await page.waitForTimeout(500);
      const after = await editorText();
      if (!after.startsWith(before) || after.slice(before.length).trim() !== "") {
        throw new Error(`Tab after the dismissal inserted ${JSON.stringify(after.slice(before.length))}`);
      }
      await page.keyboard.press("Control+z");
      return { shown, hideMs, before: before.slice(-60) };
    });
  }
  report.afterDismissNewText = await step("a new edit brings a new suggestion", async () => {
    await page.keyboard.press("Control+End");
    await page.keyboard.type(" She", { delay: 40 });
    return waitFor("ghost text after typing again", async () => (await ghostText()).trim() || undefined);
  });

  report.steering = await step("steer via the feature QuickPick", async () => {
    await runCommand("tinymorph: Steer: Pick a Feature");
    await page.locator(".quick-input-widget .quick-input-title", { hasText: "steer towards a feature" }).waitFor();
    if (featureQuery) await page.keyboard.type(featureQuery, { delay: 30 });
    // The first search loads the SAE on the server: that can take a while on a busy machine.
    await page.locator(".quick-input-widget .quick-input-list .monaco-list-row").first().waitFor({ timeout });
    await page.waitForTimeout(500);
    const rows = page.locator(".quick-input-widget .quick-input-list .monaco-list-row");
    const row = featurePick ? rows.filter({ hasText: featurePick }).first() : rows.first();
    const first = clean(await row.innerText());
    await screenshot("feature-quickpick");
    await row.click();
    // Strength input box, prefilled with 4.
    await page.locator(".quick-input-widget input").waitFor();
    await page.waitForTimeout(300);
    await page.keyboard.press("Control+A");
    await page.keyboard.type("6");
    await page.keyboard.press("Enter");
    const aria = await waitFor("steering in the status bar", async () => {
      const label = await page.locator(".statusbar-item", { hasText: "tinymorph" }).first().getAttribute("aria-label");
      return label && /steering: (?!none)/.test(label) ? clean(label) : undefined;
    }, 30000);
    return { picked: first.split("\n")[0], status: aria.match(/steering: .*/)[0] };
  });
  await screenshot("steered-status");

  report.compare = await step("compare steered vs unsteered", async () => {
    await runCommand("tinymorph: Steer: Compare Steered vs Unsteered");
    await page.locator(".tab", { hasText: "compare-1.md" }).waitFor({ timeout: timeout });
    await page.waitForTimeout(500);
    const text = clean(
      await page.evaluate(() =>
        [...document.querySelectorAll(".editor-instance .monaco-editor .view-lines")]
          .map((v) => v.textContent)
          .join("\n"),
      ),
    );
    if (!/Steered/.test(text) || !/Unsteered/.test(text)) throw new Error(`compare view: ${text.slice(0, 300)}`);
    return text.slice(0, 400);
  });
  await screenshot("compare");

  clearInterval(statusPoll);
  report.toggle = await step("toggle suggestions off and on", async () => {
    await runCommand("tinymorph: Toggle Suggestions On/Off");
    const off = await waitFor("status off", async () => ((await statusText()).includes("tinymorph off") ? await statusText() : undefined), 30000);
    await screenshot("toggled-off");
    await runCommand("tinymorph: Toggle Suggestions On/Off");
    const on = await waitFor("status on", async () => {
      const text = await statusText();
      return /tinymorph (ready|\d)/.test(text) ? text : undefined;
    }, 30000);
    return { off, on };
  });

  // Issue 12, VS Code 6 and 7: Restart Server keeps the steering (the new server has it) and shows
  // no number of the old server; Show Server Status is a readable message.
  report.restart = await step("restart keeps steering, drops old numbers", async () => {
    const steeringBefore = report.steering.status;
    await runCommand("tinymorph: Restart Server");
    await waitFor("the restart to begin", async () => (/tinymorph (starting|loading)/.test(await statusText()) ? true : undefined), 30000);
    const ready = await waitFor("ready after the restart", async () => {
      const label = clean((await page.locator(".statusbar-item", { hasText: "tinymorph" }).first().getAttribute("aria-label")) ?? "");
      return /tinymorph ready/.test(await statusText()) && /steering: (?!none)/.test(label) ? label : undefined;
    });
    if (!/last TTFT: –/.test(ready) || /tok\/s/.test(ready)) throw new Error(`old numbers after the restart: ${ready}`);
    const steering = ready.match(/steering: [^,\n]*( [^\n]*)?/)?.[0] ?? "";
    if (!steering.startsWith(steeringBefore)) throw new Error(`steering after the restart: ${steering}, before: ${steeringBefore}`);
    await screenshot("after-restart");
    // The new server itself has it: Show Server Status asks the server.
    await runCommand("tinymorph: Show Server Status");
    const dialog = page.locator(".monaco-dialog-box");
    await dialog.waitFor({ timeout: 15000 });
    const message = clean(await dialog.innerText());
    await screenshot("server-status");
    await page.keyboard.press("Escape");
    if (!/tinymorph is ready/.test(message) || !message.includes(steeringBefore) || /[{}]/.test(message)) {
      throw new Error(`Show Server Status: ${message}`);
    }
    return { ready: ready.slice(0, 200), status: message.slice(0, 300) };
  });

  // Issue 12, VS Code 5: in Restricted Mode the extension says in the status bar why it is off
  // (and starts no server). A second code-server with workspace trust on, an untrusted folder.
  report.restricted = await step("Restricted Mode: status item says why tinymorph is off", async () => {
    codeServerProc.kill();
    await new Promise((r) => codeServerProc.once("exit", r));
    writeFileSync(
      join(userData, "User", "settings.json"),
      JSON.stringify({ ...settings, "security.workspace.trust.enabled": true, "security.workspace.trust.startupPrompt": "never" }, null, 2),
    );
    const untrusted = join(work, "untrusted");
    mkdirSync(untrusted, { recursive: true });
    writeFileSync(join(untrusted, "notes.md"), "Some notes.\n");
    const port2 = await freePort();
    await startCodeServer(port2, untrusted, true);
    await page.goto(`http://127.0.0.1:${port2}/?folder=${encodeURIComponent(untrusted)}`);
    await page.locator(".explorer-folders-view .monaco-list-row", { hasText: "notes.md" }).click({ timeout: 60000 });
    const text = await waitFor("the Restricted Mode status item", async () => {
      const t = await statusText().catch(() => "");
      return /Restricted Mode/.test(t) ? t : undefined;
    }, 60000);
    const label = clean((await page.locator(".statusbar-item", { hasText: "tinymorph" }).first().getAttribute("aria-label")) ?? "");
    await screenshot("restricted-mode");
    if (!/trust/i.test(label)) throw new Error(`the status item does not say why: ${label}`);
    const started = finishedSuggestions().length;
    return { text, label: label.slice(0, 200), noNewSuggestions: started === finishedSuggestions().length };
  });
} catch (err) {
  failed = true;
  report.error = String(err?.stack ?? err);
  if (page) await screenshot("failure").catch(() => {});
} finally {
  report.ok = !failed;
  writeFileSync(join(outDir, "report.json"), JSON.stringify(report, null, 2));
  if (browser) await browser.close().catch(() => {});
  if (codeServerProc) codeServerProc.kill();
  if (!process.env.TINYMORPH_E2E_KEEP) rmSync(work, { recursive: true, force: true });
  console.log(`${failed ? "FAILED" : "passed"}; screenshots and report.json in ${outDir}`);
  process.exit(failed ? 1 : 0);
}
