// VS Code entry point: starts `tinymorph lsp`, wires its notifications into the status bar and
// registers the commands. Logic testable without VS Code lives in settings.ts, status.ts,
// steering.ts, display.ts, ghost.ts and waiter.ts (unit-tested under node); steeringUi.ts and
// progress.ts hold the VS Code UI around them.

import * as fs from "fs";
import * as os from "os";
import * as vscode from "vscode";
import {
  ExecuteCommandRequest,
  InlayHintRequest,
  LanguageClient,
  LanguageClientOptions,
  RevealOutputChannelOn,
  ServerOptions,
  State,
} from "vscode-languageclient/node";
import {
  findServer,
  ServerKey,
  ServerSettings,
  resolveServerCommand,
  serverNotFoundMessage,
  serverSettings,
  settingsChange,
  RESTART_KEYS,
  SERVER_KEYS,
} from "./settings";
import { LoadProgressFeature } from "./progress";
import { SuggestionWaiter } from "./waiter";
import { GhostTracker } from "./ghost";
import {
  cursorMoveChangesHints,
  DisplayMode,
  displayMode,
  hintLabel,
  Pos,
  showsGhostText,
  showsHint,
} from "./display";
import { MetricsPayload, StatusModel, StatusPayload, statusReport, statusView, SteeringEntry } from "./status";
import { steeringToRestore } from "./steering";
import { CompareView, pickFeature, editSteering } from "./steeringUi";

const SECTION = "tinymorph";

let client: LanguageClient | undefined;
let output: vscode.LogOutputChannel;
let statusItem: vscode.StatusBarItem;
const model = new StatusModel();
// The server settings last sent, to compute what a settings change must send.
let sentSettings: ServerSettings = {};

const waiter = new SuggestionWaiter();
/** Longest an inline-completion request waits for the first token of a suggestion on its way. */
const GHOST_WAIT_MS = 60_000;
const ghosts = new GhostTracker();
/** The steering in effect on the server we stopped, to re-apply on the next one (Restart Server). */
let steeringToKeep: SteeringEntry[] | undefined;

type InlineResult = vscode.InlineCompletionItem[] | vscode.InlineCompletionList | null | undefined;

function itemCount(result: InlineResult): number {
  if (!result) return 0;
  return Array.isArray(result) ? result.length : result.items.length;
}

/** A suggestion id as the server sends it (a number today; docs/protocol.md does not fix the type). */
function idOf(value: unknown): string | undefined {
  return typeof value === "string" || typeof value === "number" ? String(value) : undefined;
}

/** The suggestion id of the server's item (its `tinymorph.accepted` command carries [uri, id]). */
function suggestionId(result: InlineResult): string | undefined {
  if (!result) return undefined;
  const item = Array.isArray(result) ? result[0] : result.items[0];
  return idOf(item?.command?.arguments?.[1]);
}

function config(): vscode.WorkspaceConfiguration {
  return vscode.workspace.getConfiguration(SECTION);
}

function currentServerSettings(): ServerSettings {
  const cfg = config();
  return serverSettings((key) => cfg.inspect(key));
}

/** The declared defaults of the server keys (package.json), used when the user removes a setting. */
function declaredDefaults(): ServerSettings {
  const cfg = config();
  const out: ServerSettings = {};
  for (const key of Object.keys(SERVER_KEYS) as ServerKey[]) {
    const value = cfg.inspect(key)?.defaultValue;
    if (value !== undefined && value !== null && value !== "") out[key] = value as string | number | boolean;
  }
  return out;
}

function languages(): string[] {
  return config().get<string[]>("languages", ["markdown", "plaintext", "git-commit"]);
}

function display(): DisplayMode {
  return displayMode(config().get<string>("display", "both"));
}

/** The cursor of the active editor in `document`, if it is a plain cursor (no selection). */
function cursorIn(document: vscode.TextDocument): Pos | undefined {
  const editor = vscode.window.activeTextEditor;
  if (!editor || editor.document !== document || !editor.selection.isEmpty) return undefined;
  return editor.selection.active;
}

// Positions of the hints the server last returned, per document, and the cursor we filtered them with.
const lastHints = new Map<string, Pos[]>();
let lastCursor: Pos | undefined;

/** Asks VS Code to request inlay hints again (the feature's refresh event). */
function refreshHints(document: vscode.TextDocument): void {
  const provider = client?.getFeature(InlayHintRequest.method)?.getProvider(document);
  provider?.onDidChangeInlayHints.fire();
}

/**
 * `tinymorph.hintAtCursor`: the suggestion shows as an inlay hint at the cursor (while it streams,
 * or in `inlayHint` display mode); Tab then accepts what it shows (package.json keybindings).
 */
let hintAtCursor = false;
function setHintAtCursor(on: boolean): void {
  if (on === hintAtCursor) return;
  hintAtCursor = on;
  void vscode.commands.executeCommand("setContext", "tinymorph.hintAtCursor", on);
}

function onSelectionChanged(e: vscode.TextEditorSelectionChangeEvent): void {
  const document = e.textEditor.document;
  const uri = document.uri.toString();
  const hints = lastHints.get(uri);
  const cursor = e.selections.length === 1 && e.selections[0].isEmpty ? e.selections[0].active : undefined;
  const before = lastCursor;
  lastCursor = cursor;
  if (!hints) return;
  const ghostShownHere = ghosts.ghostServed(uri, document.version) && display() !== "inlayHint";
  setHintAtCursor(
    !!cursor &&
      !ghostShownHere &&
      display() !== "ghostText" &&
      !ghosts.isDismissed(uri, document.version) &&
      hints.some((h) => h.line === cursor.line && h.character === cursor.character),
  );
  const ghostShown = ghosts.ghostServed(uri, document.version);
  if (cursorMoveChangesHints(display(), hints, before, cursor, ghostShown)) refreshHints(document);
  // Back on the suggestion's anchor: bring its ghost text back (VS Code dropped it when the cursor left).
  const onAnchor = cursor && hints.some((h) => h.line === cursor.line && h.character === cursor.character);
  if (
    onAnchor &&
    showsGhostText(display()) &&
    e.textEditor === vscode.window.activeTextEditor &&
    !ghosts.isDismissed(uri, document.version)
  ) {
    void vscode.commands.executeCommand("editor.action.inlineSuggest.trigger");
  }
}

/**
 * The suggestion for the active document changed since VS Code last asked for its ghost text
 * (it grew, or finished): ask again, so the ghost text (and what Tab inserts) is the whole of it.
 */
function askAgainIfChanged(uri: string): void {
  const editor = vscode.window.activeTextEditor;
  if (!editor || editor.document.uri.toString() !== uri || !showsGhostText(display())) return;
  if (!ghosts.shouldAskAgain(uri, editor.document.version, cursorIn(editor.document))) return;
  output.debug(`suggestion for v${editor.document.version} finished: asking for its ghost text`);
  // VS Code skips an explicit request for the position and version of an explicit one it already
  // answered: clear its state first (nothing of this suggestion is shown as ghost text yet).
  void vscode.commands
    .executeCommand("editor.action.inlineSuggest.hide")
    .then(() => vscode.commands.executeCommand("editor.action.inlineSuggest.trigger"));
}

function renderStatus(): void {
  const view = statusView(model);
  statusItem.text = view.text;
  statusItem.tooltip = view.tooltip;
  statusItem.command = view.command ?? "tinymorph.showMenu";
  statusItem.backgroundColor =
    view.severity === "error"
      ? new vscode.ThemeColor("statusBarItem.errorBackground")
      : view.severity === "warning"
        ? new vscode.ThemeColor("statusBarItem.warningBackground")
        : undefined;
  statusItem.show();
}

/** Sends `workspace/executeCommand` to the server; undefined (after a message) when not running. */
async function serverCommand<T>(command: string, args: unknown[] = []): Promise<T | undefined> {
  if (!client || !client.isRunning()) {
    vscode.window.showWarningMessage("tinymorph: the server is not running (see the tinymorph output).");
    return undefined;
  }
  try {
    return (await client.sendRequest(ExecuteCommandRequest.type, { command, arguments: args })) as T;
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err);
    output.error(`${command} failed: ${message}`);
    vscode.window.showErrorMessage(`tinymorph: ${command} failed: ${message}`);
    return undefined;
  }
}

function activeUri(): string | undefined {
  const editor = vscode.window.activeTextEditor;
  return editor ? editor.document.uri.toString() : undefined;
}

function updateActiveContext(): void {
  const editor = vscode.window.activeTextEditor;
  const active = !!editor && languages().includes(editor.document.languageId) && !!client?.isRunning();
  void vscode.commands.executeCommand("setContext", "tinymorph.active", active);
  model.setActive(editor?.document.uri.toString());
  renderStatus();
}

/**
 * "generating" lasts while the generation runs: it ends with its metrics, or when the suggestion
 * for the current version turns out to be one that already finished (the server kept a typed-ahead
 * suggestion), a dismissal or a deletion.
 */
function settle(uri: string): void {
  if (!model.isPending(uri)) return;
  model.onSettled(uri);
  renderStatus();
}

function isExecutable(p: string): boolean {
  try {
    fs.accessSync(p, process.platform === "win32" ? fs.constants.F_OK : fs.constants.X_OK);
    return fs.statSync(p).isFile();
  } catch {
    return false;
  }
}

/** Dismisses what is shown for the active document (ghost text and hint) until its text changes. */
async function dismissSuggestion(): Promise<void> {
  const editor = vscode.window.activeTextEditor;
  if (!editor) return;
  const document = editor.document;
  const uri = document.uri.toString();
  ghosts.dismiss(uri, document.version);
  setHintAtCursor(false);
  model.onSettled(uri);
  renderStatus();
  // VS Code keeps its ghost text (and Tab would insert it) until told to hide it.
  await vscode.commands.executeCommand("editor.action.inlineSuggest.hide");
  refreshHints(document);
  if (client?.isRunning()) await serverCommand("tinymorph.dismiss", [uri]);
}

/** The server from tinymorph.server.command, or undefined (after one message) when it is not there. */
function buildClient(): LanguageClient | undefined {
  const cfg = config();
  const folder = vscode.workspace.workspaceFolders?.[0]?.uri.fsPath;
  const resolved = resolveServerCommand(
    cfg.get<string>("server.command", "tinymorph"),
    cfg.get<string[]>("server.args", ["lsp"]),
    { home: os.homedir(), workspaceFolder: folder, platform: process.platform },
    {
      isDir: (p) => {
        try {
          return fs.statSync(p).isDirectory();
        } catch {
          return false;
        }
      },
      exists: (p) => fs.existsSync(p),
    },
  );
  const env = { ...process.env, ...cfg.get<Record<string, string>>("server.env", {}) };
  const lookup = findServer(resolved.command, { PATH: env.PATH, PATHEXT: env.PATHEXT, platform: process.platform }, { isExecutable });
  if (!lookup.found) {
    const message = serverNotFoundMessage(lookup, cfg.get<string>("server.command", "tinymorph"));
    model.onClientError(message);
    renderStatus();
    output.error(message);
    void vscode.window.showErrorMessage(message, "Open Settings", "Show Log").then((choice) => {
      if (choice === "Open Settings") void vscode.commands.executeCommand("workbench.action.openSettings", "tinymorph.server.command");
      if (choice === "Show Log") output.show();
    });
    return undefined;
  }
  output.info(`starting ${lookup.found} ${resolved.args.join(" ")}`);
  // No `transport`: TransportKind.stdio would append "--stdio" to the arguments, which tinymorph refuses.
  const executable = { command: lookup.found, args: resolved.args, options: { env } };
  const serverOptions: ServerOptions = { run: executable, debug: executable };
  sentSettings = currentServerSettings();

  const selector = languages().flatMap((language) => [
    { scheme: "file", language },
    { scheme: "untitled", language },
  ]);
  const clientOptions: LanguageClientOptions = {
    documentSelector: selector,
    initializationOptions: sentSettings,
    outputChannel: output,
    // One failure = one message (ours): the client's own "couldn't create connection" toast repeats it.
    revealOutputChannelOn: RevealOutputChannelOn.Never,
    middleware: {
      didChange: (event, next) => {
        // Insertions start a suggestion on the server; deletions only cancel the one on its way.
        const uri = event.document.uri.toString();
        setHintAtCursor(false);
        const typedAhead =
          event.contentChanges.length === 1 &&
          ghosts.typesAhead(uri, event.contentChanges[0].range.start, event.contentChanges[0].text);
        if (typedAhead) {
          // The server keeps the finished suggestion for the new text: nothing is generated.
          model.onSettled(uri);
        } else if (event.contentChanges.some((change) => change.text.length > 0)) {
          model.onEdit(uri, Date.now(), event.document.version);
        } else if (event.contentChanges.length > 0) {
          model.onSettled(uri);
        }
        renderStatus();
        return next(event);
      },
      didClose: (document, next) => {
        const uri = document.uri.toString();
        model.onSettled(uri);
        lastHints.delete(uri);
        waiter.forget(uri);
        ghosts.forget(uri);
        renderStatus();
        return next(document);
      },
      // `tinymorph.display` picks the surfaces; see display.ts for when "both" hides the hint at the cursor.
      provideInlayHints: async (document, range, token, next) => {
        const mode = display();
        const uri = document.uri.toString();
        const version = document.version;
        const hints = ((await next(document, range, token)) ?? []).filter(() => !ghosts.isDismissed(uri, version));
        lastHints.set(uri, hints.map((h) => h.position));
        for (const h of hints) {
          const data = (h as vscode.InlayHint & { data?: { id?: unknown } }).data;
          const id = idOf(data?.id);
          const label = typeof h.label === "string" ? h.label : h.label.map((part) => part.value).join("");
          ghosts.onHint(uri, version, id, label, h.position);
          // A typed-ahead suggestion that already finished: nothing more is generated for this edit.
          if (ghosts.isFinished(uri, id)) settle(uri);
          if (typeof h.label === "string") {
            const short = hintLabel(h.label);
            if (short !== h.label && !h.tooltip) h.tooltip = h.label;
            h.label = short;
          }
        }
        if (mode === "ghostText") return [];
        const cursor = cursorIn(document);
        lastCursor = cursor;
        const ghostShown = ghosts.ghostServed(uri, version);
        const shown = hints.filter((h) => showsHint(mode, h.position, cursor, ghostShown));
        setHintAtCursor(shown.some((h) => cursor && h.position.isEqual(new vscode.Position(cursor.line, cursor.character))));
        return shown;
      },
      provideInlineCompletionItems: async (document, position, context, token, next) => {
        if (!showsGhostText(display())) return null;
        const uri = document.uri.toString();
        const version = document.version;
        if (ghosts.isDismissed(uri, version)) return null;
        ghosts.requestStarted(uri, version);
        let served: string | undefined;
        const onCancel = (cb: () => void) => token.onCancellationRequested(cb);
        try {
          let result = await next(document, position, context, token);
          // VS Code keeps the ghost text it gets: hand it only the finished suggestion (ghost.ts).
          // While it streams, the inlay hint at the cursor shows it.
          for (let round = 0; round < 3 && !token.isCancellationRequested; round++) {
            const id = suggestionId(result);
            let done: boolean;
            if (itemCount(result) === 0) {
              if (!model.isPending(uri)) break;
              done = await waiter.wait(uri, version, GHOST_WAIT_MS, onCancel);
            } else if (id !== undefined && !ghosts.isFinished(uri, id)) {
              done = await waiter.until(uri, () => ghosts.isFinished(uri, id), GHOST_WAIT_MS, onCancel);
            } else {
              break;
            }
            if (!done || token.isCancellationRequested) {
              result = null;
              break;
            }
            ghosts.askedAgain(uri, version);
            result = await next(document, position, context, token);
          }
          const id = suggestionId(result);
          if (ghosts.isDismissed(uri, version) || (id !== undefined && !ghosts.isFinished(uri, id))) return null;
          const items = !result ? [] : Array.isArray(result) ? result : result.items;
          if (items.length > 0) {
            const text = items[0].insertText;
            served = typeof text === "string" ? text : text.value;
          }
          output.debug(`inline completion v${version} ${position.line}:${position.character}: ${items.length} item(s)`);
          return result;
        } finally {
          ghosts.requestEnded(uri, version, served);
          if (served) {
            // VS Code has the ghost text now: the hint at the cursor would repeat it.
            refreshHints(document);
          }
          setTimeout(() => askAgainIfChanged(uri), 0);
        }
      },
      executeCommand: (command, args, next) => {
        // Tab accepted the ghost text: the server keeps that suggestion, nothing new is generated.
        if (command === "tinymorph.accepted" && typeof args[0] === "string") settle(args[0]);
        return next(command, args);
      },
      workspace: {
        // Servers that pull settings get the same object as initializationOptions.
        configuration: (params, token, next) =>
          params.items.map((item) => (item.section === SECTION ? currentServerSettings() : null)),
      },
    },
  };
  const c = new LanguageClient("tinymorph", "tinymorph", serverOptions, clientOptions);
  c.onDidChangeState((e) => {
    if (e.newState === State.Running) {
      // Every restart gets the steering that was in effect (see restoreSteering).
      void restoreSteering();
    }
  });
  c.registerFeature(
    new LoadProgressFeature(c, (value) => {
      model.onProgress(value);
      renderStatus();
    }),
  );
  c.onDidChangeState((e) => {
    if (e.newState === State.Running) updateActiveContext();
    if (e.newState === State.Stopped) {
      model.onStopped();
      renderStatus();
      updateActiveContext();
    }
  });
  return c;
}

/**
 * After Restart Server: the new process starts with the config file's steering; put back what was
 * in effect on the old one (set with the steering commands, which live in the server's memory).
 */
async function restoreSteering(): Promise<void> {
  const keep = steeringToKeep;
  steeringToKeep = undefined;
  if (!keep || !client) return;
  const now = (await serverCommand<SteeringEntry[]>("tinymorph.steer.list")) ?? [];
  const restore = steeringToRestore(keep, now);
  if (!restore) return;
  let list = await serverCommand<SteeringEntry[]>("tinymorph.steer.clear");
  for (const e of restore) {
    list = (await serverCommand<SteeringEntry[]>("tinymorph.steer.set", [e])) ?? list;
  }
  if (list) model.onStatus({ steering: list });
  renderStatus();
  output.info(`restored steering after restart: ${restore.length} feature(s)`);
}

async function startClient(): Promise<void> {
  model.onStarting();
  renderStatus();
  if (!vscode.workspace.isTrusted) {
    model.onUntrusted();
    renderStatus();
    output.info("Restricted Mode: tinymorph stays off until the workspace is trusted");
    return;
  }
  const c = buildClient();
  if (!c) return;
  client = c;
  c.onNotification("tinymorph/status", (payload: StatusPayload) => {
    model.onStatus(payload);
    renderStatus();
  });
  c.onNotification("tinymorph/metrics", (payload: MetricsPayload) => {
    model.onMetrics(payload);
    renderStatus();
    if (payload.uri && typeof payload.version === "number") {
      ghosts.onFinished(payload.uri, payload.version, idOf(payload.id), payload.text);
      waiter.finished(payload.uri, payload.version);
      askAgainIfChanged(payload.uri);
    }
  });
  try {
    await c.start();
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err);
    model.onClientError(`could not start the server: ${message}`);
    renderStatus();
    output.error(`could not start the server: ${message}`);
    const choice = await vscode.window.showErrorMessage(
      `tinymorph: the server (${config().get("server.command")}) did not start: ${message}. See the log for its output.`,
      "Show Log",
      "Open Settings",
    );
    if (choice === "Open Settings") void vscode.commands.executeCommand("workbench.action.openSettings", "tinymorph.server");
    if (choice === "Show Log") output.show();
    return;
  }
  const status = await serverCommand<StatusPayload>("tinymorph.status");
  if (status) {
    model.onStatus(status);
    renderStatus();
  }
}

async function stopClient(): Promise<void> {
  const c = client;
  client = undefined;
  // Steering set through the commands lives in the server's memory: keep it for the next one (the
  // server's own list when it still answers, else the last list it reported).
  steeringToKeep = [...model.steering];
  if (c?.isRunning()) {
    try {
      const list = await c.sendRequest(ExecuteCommandRequest.type, { command: "tinymorph.steer.list", arguments: [] });
      if (Array.isArray(list)) steeringToKeep = list as SteeringEntry[];
    } catch {
      // keep the last reported list
    }
  }
  if (c) {
    try {
      await c.stop(3000);
    } catch (err) {
      output.warn(`stopping the server: ${String(err)}`);
    }
  }
}

async function onConfigurationChanged(e: vscode.ConfigurationChangeEvent): Promise<void> {
  if (!e.affectsConfiguration(SECTION)) return;
  updateActiveContext();
  if (RESTART_KEYS.some((key) => e.affectsConfiguration(`${SECTION}.${key}`))) {
    const choice = await vscode.window.showInformationMessage(
      "tinymorph: restart the server to use the new server settings?",
      "Restart",
    );
    if (choice === "Restart") await vscode.commands.executeCommand("tinymorph.restartServer");
    return;
  }
  const next = currentServerSettings();
  const change = settingsChange(sentSettings, next, declaredDefaults());
  sentSettings = next;
  if (change && client?.isRunning()) {
    output.info(`settings changed: ${JSON.stringify(change)}`);
    await client.sendNotification("workspace/didChangeConfiguration", { settings: { [SECTION]: change } });
  }
}

/** The text before the cursor, for the compare view's context. */
function contextBeforeCursor(): string {
  const editor = vscode.window.activeTextEditor;
  if (!editor) return "";
  return editor.document.getText(new vscode.Range(new vscode.Position(0, 0), editor.selection.active));
}

async function showMenu(): Promise<void> {
  const items: (vscode.QuickPickItem & { command: string })[] = [
    { label: "$(check) Accept suggestion", command: "tinymorph.acceptSuggestion" },
    { label: "$(symbol-color) Steer: pick a feature…", command: "tinymorph.pickFeature" },
    { label: "$(list-unordered) Steer: edit current steering…", command: "tinymorph.editSteering" },
    { label: "$(split-horizontal) Steer: compare steered vs unsteered", command: "tinymorph.compareSteering" },
    { label: "$(clear-all) Steer: clear", command: "tinymorph.clearSteering" },
    {
      label: model.state === "disabled" ? "$(play) Turn suggestions on" : "$(circle-slash) Turn suggestions off",
      command: "tinymorph.toggleSuggestions",
    },
    { label: "$(info) Show server status", command: "tinymorph.showStatus" },
    { label: "$(output) Show log", command: "tinymorph.showLog" },
    { label: "$(debug-restart) Restart server", command: "tinymorph.restartServer" },
  ];
  const pick = await vscode.window.showQuickPick(items, { title: "tinymorph" });
  if (pick) await vscode.commands.executeCommand(pick.command);
}

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  output = vscode.window.createOutputChannel("tinymorph", { log: true });
  statusItem = vscode.window.createStatusBarItem("tinymorph.status", vscode.StatusBarAlignment.Right, 100);
  statusItem.name = "tinymorph";
  statusItem.command = "tinymorph.showMenu";
  const compare = new CompareView();
  const timer = setInterval(() => {
    if (model.tick()) renderStatus();
  }, 1000);
  context.subscriptions.push(output, statusItem, compare, { dispose: () => clearInterval(timer) });

  // Accept/dismiss go through the server so it can keep the rest of a partly accepted suggestion.
  const onDocument = (server: string) => async () => {
    const uri = activeUri();
    if (!uri) return;
    const result = await serverCommand<{ applied?: boolean }>(server, [uri]);
    // The accepted text types ahead into the suggestion: the server generates nothing new for it.
    if (result?.applied) settle(uri);
  };
  const steerList = async () => (await serverCommand<SteeringEntry[]>("tinymorph.steer.list")) ?? [];
  const commands: Record<string, (...args: unknown[]) => unknown> = {
    "tinymorph.acceptSuggestion": onDocument("tinymorph.accept"),
    "tinymorph.acceptNextWord": onDocument("tinymorph.acceptWord"),
    "tinymorph.acceptNextLine": onDocument("tinymorph.acceptLine"),
    "tinymorph.dismissSuggestion": dismissSuggestion,
    "tinymorph.toggleSuggestions": async () => {
      const result = await serverCommand<{ enabled: boolean }>("tinymorph.toggle");
      if (result) vscode.window.setStatusBarMessage(`tinymorph: suggestions ${result.enabled ? "on" : "off"}`, 3000);
    },
    "tinymorph.pickFeature": async () => {
      const changed = await pickFeature(serverCommand, await steerList());
      if (changed) model.onStatus({ steering: changed });
      renderStatus();
    },
    "tinymorph.editSteering": async () => {
      const changed = await editSteering(serverCommand, await steerList());
      if (changed) model.onStatus({ steering: changed });
      renderStatus();
    },
    "tinymorph.clearSteering": async () => {
      const list = await serverCommand<SteeringEntry[]>("tinymorph.steer.clear");
      if (list) model.onStatus({ steering: list });
      renderStatus();
    },
    "tinymorph.compareSteering": async () => {
      const uri = activeUri();
      const context = contextBeforeCursor();
      const result = await vscode.window.withProgress(
        { location: vscode.ProgressLocation.Notification, title: "tinymorph: generating steered and unsteered…" },
        () => serverCommand<{ steered: string; unsteered: string }>("tinymorph.steer.compare", uri ? [uri] : []),
      );
      if (result) await compare.show(result, await steerList(), context);
    },
    "tinymorph.showStatus": async () => {
      const status = await serverCommand<StatusPayload>("tinymorph.status");
      if (!status) return;
      model.onStatus(status);
      renderStatus();
      const report = statusReport(status, model);
      for (const line of [report.summary, ...report.detail]) output.info(line);
      const choice = await vscode.window.showInformationMessage(
        report.summary,
        { modal: true, detail: report.detail.join("\n") },
        "Show Log",
      );
      if (choice === "Show Log") output.show();
    },
    "tinymorph.showLog": () => output.show(),
    "tinymorph.showMenu": showMenu,
    "tinymorph.restartServer": async () => {
      await stopClient();
      await startClient();
    },
  };
  for (const [id, handler] of Object.entries(commands)) {
    context.subscriptions.push(vscode.commands.registerCommand(id, handler));
  }
  context.subscriptions.push(
    vscode.workspace.onDidChangeConfiguration((e) => void onConfigurationChanged(e)),
    vscode.window.onDidChangeActiveTextEditor(() => updateActiveContext()),
    vscode.window.onDidChangeTextEditorSelection(onSelectionChanged),
    vscode.workspace.onDidGrantWorkspaceTrust(() => void startClient()),
  );
  renderStatus();
  updateActiveContext();
  await startClient();
}

export async function deactivate(): Promise<void> {
  await stopClient();
}
