// Steering UI logic: QuickPick items for feature search results and the current steering,
// strength parsing, and the steered-vs-unsteered document. No `vscode` import: unit-tested under node.

import { formatSteeringEntry, SteeringEntry } from "./status";

/** One `tinymorph.features.search` result (docs/protocol.md). */
export interface FeatureHit {
  id: string;
  label?: string;
  topTokens?: string[];
  maxActivation?: number;
  /** Whether the feature (a group: any member) fires on the query's own words. */
  readsQuery?: boolean;
  /** The strength that steers the way the query asks: -1 for "less hedging" (hedging's features, turned down). */
  suggestedStrength?: number;
}

/** Structurally a vscode.QuickPickItem, plus the data we need back after the pick. */
export interface FeaturePickItem {
  label: string;
  description?: string;
  detail?: string;
  /** Keep VS Code's own filter from hiding server-side matches whose label lacks the query. */
  alwaysShow?: boolean;
  featureId: string;
  currentStrength?: number;
  /** What the strength prompt offers when the feature is not steered yet (search's `suggestedStrength`). */
  suggestedStrength?: number;
}

/** What the strength prompt offers: 1 is the calibrated push (noticeable and still fluent). */
export const DEFAULT_STRENGTH = "1";
/** The server's bound (`MAX_STRENGTH` in steering.py): a larger strength is refused there. */
export const MAX_STRENGTH = 20;

/** Shows a token the way the model sees it: leading spaces visible, control characters escaped. */
export function showToken(token: string): string {
  return JSON.stringify(token).slice(1, -1).replace(/^ /, "·");
}

/** QuickPick items for search results; features already steered show their strength first. */
export function featureItems(hits: FeatureHit[], steering: SteeringEntry[], query = ""): FeaturePickItem[] {
  const active = new Map(steering.map((s) => [s.feature, s.strength]));
  const description = query.trim().replace(/\s+/g, " ");
  // first choice: steer by the words typed (the server builds a calibrated concept vector from them)
  const described: FeaturePickItem[] = /[a-z]/i.test(description)
    ? [{
        label: `$(sparkle) Steer by description: "${description}"`,
        description: active.has(description) ? `(steering ${active.get(description)})` : "concept vector",
        detail: hits.length > 0 && hits.every((hit) => hit.readsQuery === false)
          ? `no feature below fires on "${description}" itself (the SAE likely has none): the description steers it more surely`
          : "the model writes about it, tinymorph steers towards the difference (try \"about the sea\", \"formal\", \"less hedging\")",
        alwaysShow: true,
        featureId: description,
        currentStrength: active.get(description),
      }]
    : [];
  return described.concat(hits.map((hit) => {
    const strength = active.get(hit.id);
    const name = hit.label && hit.label.trim() ? hit.label.trim() : hit.id;
    const tokens = (hit.topTokens ?? []).slice(0, 8).map(showToken).join("  ");
    const detailParts: string[] = [];
    if (tokens) detailParts.push(`top tokens: ${tokens}`);
    if (typeof hit.maxActivation === "number") detailParts.push(`max act ${hit.maxActivation.toFixed(2)}`);
    return {
      label: strength !== undefined ? `$(check) ${name}` : name,
      description: strength !== undefined
        ? `${hit.id}  (steering ${strength})`
        : (hit.suggestedStrength ?? 1) < 0 ? `${hit.id}  (turned down: ${hit.suggestedStrength})` : hit.id,
      detail: detailParts.join(" · ") || undefined,
      alwaysShow: true,
      featureId: hit.id,
      currentStrength: strength,
      suggestedStrength: hit.suggestedStrength,
    };
  }));
}

/** QuickPick title: says when a search found nothing, since an empty list looks like "still loading". */
export function searchTitle(query: string, count: number): string {
  const base = "tinymorph: steer towards a feature";
  if (count !== 0) return base;
  return query.trim() ? `${base} (no match for "${query.trim()}")` : `${base} (type to search)`;
}

export interface SteeringPickItem {
  label: string;
  description?: string;
  featureId?: string;
  action: "edit" | "add" | "clear";
}

/** QuickPick items for "Edit steering": one per entry, then add / clear actions. */
export function steeringItems(steering: SteeringEntry[]): SteeringPickItem[] {
  const items: SteeringPickItem[] = steering.map((e) => ({
    label: `$(symbol-color) ${formatSteeringEntry(e)}`,
    description: "change strength or remove",
    featureId: e.feature,
    action: "edit",
  }));
  items.push({ label: "$(add) Add a feature…", action: "add" });
  if (steering.length > 0) items.push({ label: "$(clear-all) Clear all steering", action: "clear" });
  return items;
}

/**
 * Parses a strength typed by the user. Returns the number, or an error message for the input box.
 * Zero is refused: it means "remove", which has its own action.
 */
export function parseStrength(input: string): number | string {
  const text = input.trim().replace(",", ".");
  if (text === "") return "Enter a number, e.g. 1 (the calibrated push) or -0.5";
  const value = Number(text);
  if (!Number.isFinite(value)) return `Not a number: ${input}`;
  if (value === 0) return "0 has no effect; use Remove instead";
  if (Math.abs(value) > MAX_STRENGTH) return `Strength must be between -${MAX_STRENGTH} and ${MAX_STRENGTH} (1 = the calibrated push)`;
  return value;
}

/** Debounces feature searches typed into the QuickPick; returns a fresh call id to discard stale answers. */
export class LatestOnly {
  private counter = 0;
  next(): number {
    return ++this.counter;
  }
  isLatest(id: number): boolean {
    return id === this.counter;
  }
}

export interface CompareResult {
  steered: string;
  unsteered: string;
}

/** The side document for `tinymorph.steer.compare`: both continuations after the same context. */
export function compareDocument(result: CompareResult, steering: SteeringEntry[], context: string): string {
  const fence = (text: string) => {
    // A fence longer than any backtick run inside the text keeps it intact.
    const longest = Math.max(2, ...(text.match(/`+/g) ?? []).map((run) => run.length));
    const ticks = "`".repeat(longest + 1);
    return `${ticks}text\n${text}\n${ticks}`;
  };
  const tail = context.length > 300 ? "…" + context.slice(-300) : context;
  const lines = [
    "# tinymorph: steered vs unsteered",
    "",
    `Steering: ${steering.length > 0 ? steering.map(formatSteeringEntry).join(", ") : "none"}`,
    "",
  ];
  if (tail) lines.push("## Context (end)", "", fence(tail), "");
  lines.push("## Steered", "", fence(result.steered), "", "## Unsteered", "", fence(result.unsteered), "");
  if (result.steered === result.unsteered) {
    lines.push("_Both continuations are identical: try a larger strength or another feature._", "");
  }
  return lines.join("\n");
}

/**
 * Steering to re-apply on a restarted server: the old server's list is what the user had in effect.
 * The new server starts from the config file (tinymorph.toml), so only a difference needs work:
 * then the list is cleared and every old entry set again, in order.
 */
export function steeringToRestore(before: SteeringEntry[], after: SteeringEntry[]): SteeringEntry[] | undefined {
  const key = (e: SteeringEntry) => JSON.stringify([e.feature, e.strength, e.mode ?? "add", e.layer ?? null]);
  const same = before.length === after.length && before.every((e, i) => key(e) === key(after[i]));
  return same ? undefined : before;
}
