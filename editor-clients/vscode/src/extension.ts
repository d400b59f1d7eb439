// VS Code entry point: starts `tinymorph lsp`, wires its notifications into the status bar and
// registers the commands. Logic testable without VS Code lives in settings.ts, status.ts,
// steering.ts, display.ts and waiter.ts (unit-tested under node); steeringUi.ts and progress.ts
// hold the VS Code UI around them.

import * as fs from "fs";
import * as os from "os";
import * as vscode from "vscode";
import {
  ExecuteCommandRequest,
  InlayHintRequest,
  LanguageClient,
  LanguageClientOptions,
  ServerOptions,
  State,
} from "vscode-languageclient/node";
import {
  ServerKey,
  ServerSettings,
  resolveServerCommand,
  serverSettings,
  settingsChange,
  RESTART_KEYS,
  SERVER_KEYS,
} from "./settings";
import { LoadProgressFeature } from "./progress";
import { SuggestionWaiter } from "./waiter";
import { cursorMoveChangesHints, DisplayMode, displayMode, Pos, showsGhostText, showsHint } from "./display";
import { MetricsPayload, StatusModel, StatusPayload, statusView, SteeringEntry } from "./status";
import { CompareView, pickFeature, editSteering } from "./steeringUi";

const SECTION = "tinymorph";

let client: LanguageClient | undefined;
let output: vscode.LogOutputChannel;
let statusItem: vscode.StatusBarItem;
const model = new StatusModel();
// The server settings last sent, to compute what a settings change must send.
let sentSettings: ServerSettings = {};

const waiter = new SuggestionWaiter();
/** Longest an inline-completion request waits for a suggestion still being generated. */
const GHOST_WAIT_MS = 60_000;
// "uri@version" of the last inline-completion answer with an item, to avoid asking twice.
let lastServedGhost = "";

function itemCount(result: vscode.InlineCompletionItem[] | vscode.InlineCompletionList | null | undefined): number {
  if (!result) return 0;
  return Array.isArray(result) ? result.length : result.items.length;
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

function onSelectionChanged(e: vscode.TextEditorSelectionChangeEvent): void {
  const uri = e.textEditor.document.uri.toString();
  const hints = lastHints.get(uri);
  const cursor = e.selections.length === 1 && e.selections[0].isEmpty ? e.selections[0].active : undefined;
  const before = lastCursor;
  lastCursor = cursor;
  if (!hints) return;
  if (cursorMoveChangesHints(display(), hints, before, cursor)) refreshHints(e.textEditor.document);
  // Back on the suggestion's anchor: bring its ghost text back (VS Code dropped it when the cursor left).
  const onAnchor = cursor && hints.some((h) => h.line === cursor.line && h.character === cursor.character);
  if (onAnchor && showsGhostText(display()) && e.textEditor === vscode.window.activeTextEditor) {
    void vscode.commands.executeCommand("editor.action.inlineSuggest.trigger");
  }
}

function renderStatus(): void {
  const view = statusView(model);
  statusItem.text = view.text;
  statusItem.tooltip = view.tooltip;
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
}

/**
 * "generating" means "waiting for the suggestion": it ends when one for the current version shows
 * up (the server kept a typed-ahead suggestion, or tokens started streaming), not only at metrics.
 */
function settle(uri: string): void {
  if (!model.isPending(uri)) return;
  model.onSettled(uri);
  renderStatus();
}

function buildClient(): LanguageClient {
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
  // No `transport`: TransportKind.stdio would append "--stdio" to the arguments, which tinymorph refuses.
  const executable = { command: resolved.command, args: resolved.args, options: { env } };
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
    middleware: {
      didChange: (event, next) => {
        // Insertions start a suggestion on the server; deletions do not.
        if (event.contentChanges.some((change) => change.text.length > 0)) {
          model.onEdit(event.document.uri.toString());
          renderStatus();
        }
        return next(event);
      },
      didClose: (document, next) => {
        model.onSettled(document.uri.toString());
        lastHints.delete(document.uri.toString());
        waiter.forget(document.uri.toString());
        renderStatus();
        return next(document);
      },
      // `tinymorph.display` picks the surfaces; see display.ts for why "both" hides the hint at the cursor.
      provideInlayHints: async (document, range, token, next) => {
        const mode = display();
        if (mode === "ghostText") return [];
        const hints = (await next(document, range, token)) ?? [];
        lastHints.set(document.uri.toString(), hints.map((h) => h.position));
        // The server only returns a hint computed for the current version: nothing is pending any more.
        if (hints.length > 0) settle(document.uri.toString());
        const cursor = cursorIn(document);
        lastCursor = cursor;
        return hints.filter((h) => showsHint(mode, h.position, cursor));
      },
      provideInlineCompletionItems: async (document, position, context, token, next) => {
        if (!showsGhostText(display())) return null;
        let result = await next(document, position, context, token);
        const uri = document.uri.toString();
        if (itemCount(result) === 0 && model.isPending(uri) && !token.isCancellationRequested) {
          // Nothing yet: wait for this version's suggestion (see waiter.ts), then ask once more.
          const done = await waiter.wait(uri, document.version, GHOST_WAIT_MS, (cb) => token.onCancellationRequested(cb));
          if (done && !token.isCancellationRequested) result = await next(document, position, context, token);
        }
        if (itemCount(result) > 0) {
          lastServedGhost = `${uri}@${document.version}`;
          settle(uri);
        }
        output.debug(`inline completion v${document.version} ${position.line}:${position.character}: ${itemCount(result)} item(s)`);
        return result;
      },
      workspace: {
        // Servers that pull settings get the same object as initializationOptions.
        configuration: (params, token, next) =>
          params.items.map((item) => (item.section === SECTION ? currentServerSettings() : null)),
      },
    },
  };
  const c = new LanguageClient("tinymorph", "tinymorph", serverOptions, clientOptions);
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
 * A suggestion finished but no inline-completion request was waiting for it (VS Code's request
 * had already timed out or been answered): ask VS Code to request the ghost text again.
 */
function askForGhostText(uri: string, version: number): void {
  const editor = vscode.window.activeTextEditor;
  if (!editor || !showsGhostText(display())) return;
  if (editor.document.uri.toString() !== uri || editor.document.version !== version) return;
  if (lastServedGhost === `${uri}@${version}`) return;
  void vscode.commands.executeCommand("editor.action.inlineSuggest.trigger");
}

async function startClient(): Promise<void> {
  model.onStarting();
  renderStatus();
  client = buildClient();
  client.onNotification("tinymorph/status", (payload: StatusPayload) => {
    model.onStatus(payload);
    renderStatus();
  });
  client.onNotification("tinymorph/metrics", (payload: MetricsPayload) => {
    model.onMetrics(payload);
    renderStatus();
    if (payload.uri && typeof payload.version === "number") {
      const waited = waiter.waiting > 0;
      waiter.finished(payload.uri, payload.version);
      if (!waited) askForGhostText(payload.uri, payload.version);
    }
  });
  try {
    await client.start();
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err);
    model.onClientError(`could not start the server: ${message}`);
    renderStatus();
    const choice = await vscode.window.showErrorMessage(
      `tinymorph: could not start "${config().get("server.command")}" (${message}). ` +
        "Set up the server (scripts/setup.sh in the tinymorph sources) and point tinymorph.server.command at its .venv.",
      "Open Settings",
      "Show Log",
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
    if (uri) await serverCommand(server, [uri]);
  };
  const steerList = async () => (await serverCommand<SteeringEntry[]>("tinymorph.steer.list")) ?? [];
  const commands: Record<string, (...args: unknown[]) => unknown> = {
    "tinymorph.acceptSuggestion": onDocument("tinymorph.accept"),
    "tinymorph.acceptNextWord": onDocument("tinymorph.acceptWord"),
    "tinymorph.acceptNextLine": onDocument("tinymorph.acceptLine"),
    "tinymorph.dismissSuggestion": onDocument("tinymorph.dismiss"),
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
      output.info(`status: ${JSON.stringify(status)}`);
      output.show(true);
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
  );
  renderStatus();
  await startClient();
}

export async function deactivate(): Promise<void> {
  await stopClient();
}
