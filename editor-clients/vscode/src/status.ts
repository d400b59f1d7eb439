// The client's view of the server state, fed by `tinymorph/status`, `tinymorph/metrics`,
// `$/progress` and the client's own edits, and its rendering as status-bar text.
// No `vscode` import: unit-tested under node.

export type ServerState = "starting" | "loading" | "ready" | "generating" | "error" | "disabled" | "stopped";

/** `tinymorph/status` notification / `tinymorph.status` result (docs/protocol.md). */
export interface StatusPayload {
  state?: string;
  model?: string;
  lastTtftMs?: number | null;
  message?: string;
  steering?: SteeringEntry[];
}

/** `tinymorph/metrics` notification. */
export interface MetricsPayload {
  uri?: string;
  version?: number;
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
  /** uri → time (ms) of the edit we expect a suggestion for. */
  private pending = new Map<string, number>();
  /** The server's own state, which "generating" overlays. */
  private serverState: ServerState = "starting";

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
    if (m.uri) this.pending.delete(m.uri);
    else this.pending.clear();
    // A finished suggestion proves the model is loaded, even if we missed the status notification.
    if (this.serverState === "loading" || this.serverState === "starting") this.serverState = "ready";
    this.recompute(now);
  }

  /** The user edited a document the server suggests in: a suggestion is on its way. */
  onEdit(uri: string, now = Date.now()): void {
    if (this.serverState === "disabled" || this.serverState === "error") return;
    this.pending.set(uri, now);
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

  onStarting(): void {
    this.serverState = "starting";
    this.message = "";
    this.recompute(Date.now());
  }

  /** Drops stale "generating" marks; call from a timer. Returns true when the state changed. */
  tick(now = Date.now()): boolean {
    const before = this.state;
    for (const [uri, since] of this.pending) {
      if (now - since > GENERATING_TIMEOUT_MS) this.pending.delete(uri);
    }
    this.recompute(now);
    return before !== this.state;
  }

  private recompute(_now: number): void {
    this.state = this.serverState === "ready" && this.pending.size > 0 ? "generating" : this.serverState;
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
};

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
    case "generating":
      detail = s.lastTtftMs !== null ? formatMs(s.lastTtftMs) : s.state;
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
