// Mapping between VS Code settings (`tinymorph.*`) and the server's settings object
// (initializationOptions / workspace/didChangeConfiguration). No `vscode` import: unit-tested under node.

/** Keys the server understands (docs/protocol.md, "Settings"), with their JSON type. */
export const SERVER_KEYS = {
  model: "string",
  dtype: "string",
  threads: "number",
  debounceMs: "number",
  maxTokens: "number",
  stop: "string",
  enabled: "boolean",
  temperature: "number",
  contextTokens: "number",
  config: "string",
} as const;

export type ServerKey = keyof typeof SERVER_KEYS;
export type ServerSettings = Partial<Record<ServerKey, string | number | boolean>>;

/** What `WorkspaceConfiguration.inspect(key)` returns, reduced to what we need. */
export interface Inspected<T = unknown> {
  defaultValue?: T;
  globalValue?: T;
  workspaceValue?: T;
  workspaceFolderValue?: T;
  defaultLanguageValue?: T;
  globalLanguageValue?: T;
  workspaceLanguageValue?: T;
  workspaceFolderLanguageValue?: T;
}

/**
 * The value the user set explicitly, or undefined when only the default applies.
 * We forward explicit values only: the server has its own defaults and may read a tinymorph.toml,
 * and a client default would silently override what that file says.
 */
export function explicitValue<T>(inspected: Inspected<T> | undefined): T | undefined {
  if (!inspected) return undefined;
  const order: (keyof Inspected<T>)[] = [
    "workspaceFolderLanguageValue",
    "workspaceLanguageValue",
    "globalLanguageValue",
    "defaultLanguageValue",
    "workspaceFolderValue",
    "workspaceValue",
    "globalValue",
  ];
  for (const key of order) {
    const value = inspected[key];
    if (value !== undefined) return value;
  }
  return undefined;
}

/** Drops values the server would reject (wrong type, empty strings, non-finite numbers). */
function valid(key: ServerKey, value: unknown): boolean {
  if (value === undefined || value === null) return false;
  if (typeof value !== SERVER_KEYS[key]) return false;
  if (typeof value === "string" && value.trim() === "") return false;
  if (typeof value === "number" && !Number.isFinite(value)) return false;
  return true;
}

/**
 * Builds the settings object sent as initializationOptions.
 * `inspect(key)` looks up `tinymorph.<key>` (a function so that tests can pass a plain object).
 */
export function serverSettings(inspect: (key: ServerKey) => Inspected | undefined): ServerSettings {
  const out: ServerSettings = {};
  for (const key of Object.keys(SERVER_KEYS) as ServerKey[]) {
    const value = explicitValue(inspect(key));
    if (valid(key, value)) out[key] = value as string | number | boolean;
  }
  return out;
}

/**
 * Settings to push with didChangeConfiguration after the user edited settings.
 * Keys the user removed are reset to the extension's declared default (when it has one), so the
 * server does not keep a value that no longer appears anywhere in the user's settings.
 * Returns undefined when nothing changed.
 */
export function settingsChange(
  previous: ServerSettings,
  next: ServerSettings,
  defaults: ServerSettings,
): ServerSettings | undefined {
  const change: ServerSettings = {};
  let changed = false;
  for (const key of Object.keys(SERVER_KEYS) as ServerKey[]) {
    if (key in next) {
      if (previous[key] !== next[key]) {
        change[key] = next[key];
        changed = true;
      }
    } else if (key in previous && defaults[key] !== undefined) {
      change[key] = defaults[key];
      changed = true;
    }
  }
  return changed ? change : undefined;
}

export interface ServerCommand {
  command: string;
  args: string[];
}

/**
 * Resolves `tinymorph.server.command`: a program name on PATH, a path to the executable,
 * or a virtual environment folder (then its `bin/tinymorph`, `Scripts\tinymorph.exe` on Windows).
 * `~` and `${workspaceFolder}` are expanded; `isDir`/`exists` are injected for tests.
 */
export function resolveServerCommand(
  command: string,
  args: string[],
  env: { home?: string; workspaceFolder?: string; platform?: string },
  fs: { isDir: (p: string) => boolean; exists: (p: string) => boolean },
): ServerCommand {
  let cmd = (command || "tinymorph").trim();
  if (cmd === "~" || cmd.startsWith("~/")) cmd = (env.home ?? "~") + cmd.slice(1);
  if (env.workspaceFolder !== undefined) cmd = cmd.split("${workspaceFolder}").join(env.workspaceFolder);
  if (fs.isDir(cmd)) {
    const base = cmd.replace(/[\\/]+$/, "");
    const candidates =
      env.platform === "win32"
        ? [`${base}\\Scripts\\tinymorph.exe`, `${base}\\tinymorph.exe`]
        : [`${base}/bin/tinymorph`, `${base}/tinymorph`];
    cmd = candidates.find((c) => fs.exists(c)) ?? candidates[0];
  }
  return { command: cmd, args: Array.isArray(args) ? args.map(String) : ["lsp"] };
}

/** Settings that only matter to the client; changing them needs a server restart. */
export const RESTART_KEYS = ["server.command", "server.args", "server.env", "languages"];

/** Where the server executable was looked for, and what was found. */
export interface ServerLookup {
  /** The executable to spawn, when one was found. */
  found?: string;
  /** What was tried, for the one error message the user sees ("/x/bin/tinymorph" or "tinymorph on PATH"). */
  tried: string;
}

/**
 * Finds the resolved server command before spawning it, so that a wrong path gives one clear
 * message naming the path tried instead of a spawn ENOENT (which vscode-languageclient reports
 * with its own, second, toast). A name without a path separator is looked up on `PATH`.
 */
export function findServer(
  command: string,
  env: { PATH?: string; PATHEXT?: string; platform?: string },
  fs: { isExecutable: (p: string) => boolean },
): ServerLookup {
  const win = env.platform === "win32";
  const hasSeparator = win ? /[\\/]/.test(command) : command.includes("/");
  if (hasSeparator) return { found: fs.isExecutable(command) ? command : undefined, tried: command };
  const dirs = (env.PATH ?? "").split(win ? ";" : ":").filter((d) => d !== "");
  const exts = win ? ["", ...(env.PATHEXT ?? ".EXE;.CMD;.BAT").split(";")] : [""];
  for (const dir of dirs) {
    for (const ext of exts) {
      const candidate = `${dir.replace(/[\\/]+$/, "")}${win ? "\\" : "/"}${command}${ext}`;
      if (fs.isExecutable(candidate)) return { found: candidate, tried: `${command} on PATH` };
    }
  }
  return { tried: `${command} on PATH` };
}

/** The one message shown when the server executable is missing. */
export function serverNotFoundMessage(lookup: ServerLookup, setting: string): string {
  return (
    `tinymorph: server not found: tried ${lookup.tried} (tinymorph.server.command = "${setting}"). ` +
    "Set tinymorph.server.command to the tinymorph executable or its virtual environment folder " +
    "(User settings; in a remote or code-server window, Remote settings work too)."
  );
}
