// The client's view of the server state, fed by `tinymorph/status`, `tinymorph/metrics`,
// `$/progress` and the client's own edits, and its rendering as status-bar text.
// No `vscode` import: unit-tested under node.

export type ServerState =
  | "starting"
  | "loading"
  | "ready"
  | "generating"
  | "error"
  | "disabled"
  | "stopped"
  | "untrusted";

/** `tinymorph/status` notification / `tinymorph.status` result (docs/protocol.md). */
export interface StatusPayload {
  state?: string;
  model?: string;
  lastTtftMs?: number | null;
  message?: string;
  steering?: SteeringEntry[];
  /** Counters for diagnostics (suggestions scheduled/finished/cancelled/failed/accepted). */
  stats?: Record<string, number>;
}

/** `tinymorph/metrics` notification. */
export interface MetricsPayload {
  uri?: string;
  version?: number;
  /** The suggestion's id (a number from today's server). */
  id?: string | number;
  ttftMs?: number;
  prefillMs?: number;
  queueMs?: number;
  tokensPerSecond?: number;
  tokensReused?: number;
  tokensPrefilled?: number;
  tokensGenerated?: number;
  stopReason?: string;
  steering?: SteeringEntry[];
  text?: string;
}

export interface SteeringEntry {
  feature: string;
  layer?: number;
  mode?: string;
  strength: number;
}

/** `$/progress` value of a work-done progress. */
export interface ProgressValue {
  kind: "begin" | "report" | "end";
  title?: string;
  message?: string;
  percentage?: number;
}

export interface StatusView {
  text: string;
  tooltip: string;
  /** "error" or "warning" selects the status bar background; undefined = normal. */
  severity?: "error" | "warning";
  /** The command a click runs (undefined: the tinymorph menu). */
  command?: string;
}

/** How long we show "generating" without hearing back before assuming the server dropped it. */
export const GENERATING_TIMEOUT_MS = 20_000;

export class StatusModel {
  state: ServerState = "starting";
  model = "";
  message = "";
  lastTtftMs: number | null = null;
  tokensPerSecond: number | null = null;
  progressPercent: number | null = null;
  steering: SteeringEntry[] = [];
  /** uri → time (ms) and document version of the edit we expect a suggestion for. */
  private pending = new Map<string, { since: number; version?: number }>();
  /** The server's own state, which "generating" overlays. */
  private serverState: ServerState = "starting";
  /** The document in the active editor: "generating" is about it (undefined: any document). */
  private activeUri: string | undefined;

  onStatus(payload: StatusPayload): void {
    const known: ServerState[] = ["loading", "ready", "error", "disabled"];
    if (payload.state && (known as string[]).includes(payload.state)) {
      this.serverState = payload.state as ServerState;
      if (this.serverState !== "loading") this.progressPercent = null;
      if (this.serverState === "disabled" || this.serverState === "error") this.pending.clear();
    }
    if (typeof payload.model === "string") this.model = payload.model;
    if (typeof payload.message === "string") this.message = payload.message;
    if (typeof payload.lastTtftMs === "number") this.lastTtftMs = payload.lastTtftMs;
    if (Array.isArray(payload.steering)) this.steering = payload.steering;
    this.recompute(Date.now());
  }

  onMetrics(m: MetricsPayload, now = Date.now()): void {
    if (typeof m.ttftMs === "number") this.lastTtftMs = m.ttftMs;
    if (typeof m.tokensPerSecond === "number") this.tokensPerSecond = m.tokensPerSecond;
    if (Array.isArray(m.steering)) this.steering = m.steering;
    if (m.uri) {
      // An older suggestion that finished just before the next edit does not end the wait for the new one.
      const p = this.pending.get(m.uri);
      if (p && (p.version === undefined || m.version === undefined || m.version >= p.version)) this.pending.delete(m.uri);
    } else this.pending.clear();
    // A finished suggestion proves the model is loaded, even if we missed the status notification.
    if (this.serverState === "loading" || this.serverState === "starting") this.serverState = "ready";
    this.recompute(now);
  }

  /** The user edited a document the server suggests in: a suggestion is on its way. */
  onEdit(uri: string, now = Date.now(), version?: number): void {
    if (this.serverState === "disabled" || this.serverState === "error") return;
    this.pending.set(uri, { since: now, version });
    this.recompute(now);
  }

  /** The editor shows `uri` (undefined: no editor); "generating" is shown for its generation. */
  setActive(uri: string | undefined, now = Date.now()): void {
    this.activeUri = uri;
    this.recompute(now);
  }

  /** Whether a suggestion for `uri` is on its way (an edit without its metrics yet). */
  isPending(uri: string): boolean {
    return this.pending.has(uri) && this.serverState === "ready";
  }

  /** The suggestion was dismissed or the document closed: stop waiting for it. */
  onSettled(uri: string, now = Date.now()): void {
    this.pending.delete(uri);
    this.recompute(now);
  }

  onProgress(value: ProgressValue): void {
    if (value.kind === "end") {
      this.progressPercent = null;
      if (this.serverState === "loading" || this.serverState === "starting") this.serverState = "ready";
    } else {
      if (this.serverState === "starting" || this.serverState === "ready") this.serverState = "loading";
      if (typeof value.percentage === "number") this.progressPercent = value.percentage;
      if (value.message) this.message = value.message;
      else if (value.title && value.kind === "begin") this.message = value.title;
    }
    this.recompute(Date.now());
  }

  onClientError(message: string): void {
    this.serverState = "error";
    this.message = message;
    this.pending.clear();
    this.recompute(Date.now());
  }

  onStopped(): void {
    this.serverState = "stopped";
    this.pending.clear();
    this.recompute(Date.now());
  }

  /** A (re)started server: numbers measured by a previous server process no longer apply. */
  onStarting(): void {
    this.serverState = "starting";
    this.message = "";
    this.lastTtftMs = null;
    this.tokensPerSecond = null;
    this.progressPercent = null;
    this.pending.clear();
    this.recompute(Date.now());
  }

  /** Restricted Mode: the extension does not start the server in an untrusted workspace. */
  onUntrusted(): void {
    this.serverState = "untrusted";
    this.message = "";
    this.pending.clear();
    this.recompute(Date.now());
  }

  /** Drops stale "generating" marks; call from a timer. Returns true when the state changed. */
  tick(now = Date.now()): boolean {
    const before = this.state;
    for (const [uri, p] of this.pending) {
      if (now - p.since > GENERATING_TIMEOUT_MS) this.pending.delete(uri);
    }
    this.recompute(now);
    return before !== this.state;
  }

  private recompute(_now: number): void {
    const waiting = this.activeUri === undefined ? this.pending.size > 0 : this.pending.has(this.activeUri);
    this.state = this.serverState === "ready" && waiting ? "generating" : this.serverState;
  }
}

/** "85 ms", "1.2 s". */
export function formatMs(ms: number | null | undefined): string {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return "–";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  return `${(ms / 1000).toFixed(1)} s`;
}

/** "+4 formal" style summary of one steering entry (feature id shortened to what follows ':'). */
export function formatSteeringEntry(e: SteeringEntry): string {
  const sign = e.strength >= 0 ? "+" : "";
  const mode = e.mode && e.mode !== "add" ? ` ${e.mode}` : "";
  const layer = e.layer !== undefined ? ` @L${e.layer}` : "";
  return `${e.feature} ${sign}${e.strength}${mode}${layer}`;
}

const ICONS: Record<ServerState, string> = {
  starting: "$(loading~spin)",
  loading: "$(loading~spin)",
  ready: "$(sparkle)",
  generating: "$(sync~spin)",
  error: "$(error)",
  disabled: "$(circle-slash)",
  stopped: "$(debug-stop)",
  untrusted: "$(workspace-untrusted)",
};

/** Why the extension is off in Restricted Mode (status tooltip and README say the same). */
export const RESTRICTED_MODE_REASON =
  "tinymorph is off in Restricted Mode: it starts a local program (tinymorph.server.command) and the " +
  "server reads this folder's tinymorph.toml, which can name models and SAEs to load. " +
  "Trust this folder to turn tinymorph on.";

/** Status bar text and tooltip for the model's current state. */
export function statusView(s: StatusModel): StatusView {
  let detail: string;
  switch (s.state) {
    case "starting":
      detail = "starting";
      break;
    case "loading":
      detail = s.progressPercent !== null ? `loading ${Math.round(s.progressPercent)}%` : "loading";
      break;
    case "ready":
      detail = s.lastTtftMs !== null ? formatMs(s.lastTtftMs) : "ready";
      break;
    case "generating":
      detail = "generating";
      break;
    case "untrusted":
      detail = "off (Restricted Mode)";
      break;
    case "error":
      detail = "error";
      break;
    case "disabled":
      detail = "off";
      break;
    case "stopped":
      detail = "stopped";
      break;
  }
  const steer = s.steering.length > 0 ? ` $(symbol-color)${s.steering.length}` : "";
  const text = `${ICONS[s.state]} tinymorph ${detail}${steer}`;
  if (s.state === "untrusted") {
    return {
      text,
      tooltip: `${RESTRICTED_MODE_REASON}\nclick to manage workspace trust`,
      severity: "warning",
      command: "workbench.trust.manage",
    };
  }

  const lines = [`tinymorph: ${s.state}`];
  if (s.model) lines.push(`model: ${s.model}`);
  if (s.message) lines.push(s.message);
  lines.push(`last TTFT: ${formatMs(s.lastTtftMs)}`);
  if (s.tokensPerSecond !== null) lines.push(`speed: ${s.tokensPerSecond.toFixed(1)} tok/s`);
  lines.push(
    s.steering.length > 0 ? `steering: ${s.steering.map(formatSteeringEntry).join(", ")}` : "steering: none",
  );
  lines.push("click for tinymorph actions");
  const severity = s.state === "error" ? "error" : s.state === "stopped" ? "warning" : undefined;
  return { text, tooltip: lines.join("\n"), severity };
}

/**
 * Show Server Status: a one-line summary and readable detail lines (not the raw JSON object).
 */
export function statusReport(p: StatusPayload, s: StatusModel): { summary: string; detail: string[] } {
  const state = p.state ?? s.state;
  const summary = `tinymorph is ${state === "disabled" ? "off" : state}` + (p.model ? ` (${p.model})` : "");
  const detail: string[] = [];
  if (p.message) detail.push(p.message);
  detail.push(`last time to first token: ${formatMs(p.lastTtftMs ?? s.lastTtftMs)}`);
  if (s.tokensPerSecond !== null) detail.push(`speed: ${s.tokensPerSecond.toFixed(1)} tokens/s`);
  const steering = Array.isArray(p.steering) ? p.steering : s.steering;
  detail.push(steering.length > 0 ? `steering: ${steering.map(formatSteeringEntry).join(", ")}` : "steering: none");
  if (p.stats && typeof p.stats === "object") {
    const parts = Object.entries(p.stats)
      .filter(([, n]) => typeof n === "number")
      .map(([k, n]) => `${n} ${k}`);
    if (parts.length > 0) detail.push(`suggestions: ${parts.join(", ")}`);
  }
  return { summary, detail };
}
