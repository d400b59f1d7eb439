// Where the suggestion shows (`tinymorph.display`). No `vscode` import: unit-tested under node.
//
// "both": ghost text at the cursor (Tab accepts) and the inlay hint wherever the cursor is not.
// VS Code draws ghost text only at the cursor; showing the hint there too would print the same
// text twice, while a hint left behind when the cursor moves away still marks the suggestion.
// Until VS Code has ghost text for the suggestion (the server holds an inline-completion request up
// to 1.5 s while tokens stream), the hint shows at the cursor too, so the first token is visible
// as soon as it exists.

export type DisplayMode = "both" | "ghostText" | "inlayHint";

export interface Pos {
  line: number;
  character: number;
}

export function displayMode(value: unknown): DisplayMode {
  return value === "ghostText" || value === "inlayHint" ? value : "both";
}

export function showsGhostText(mode: DisplayMode): boolean {
  return mode !== "inlayHint";
}

/**
 * Whether a hint at `hint` is shown, given the cursor (undefined: not in this document or a
 * selection) and whether VS Code got ghost text for this suggestion.
 */
export function showsHint(mode: DisplayMode, hint: Pos, cursor: Pos | undefined, ghostShown = true): boolean {
  if (mode === "ghostText") return false;
  if (mode === "inlayHint" || !cursor || !ghostShown) return true;
  return !(hint.line === cursor.line && hint.character === cursor.character);
}

/**
 * Whether a cursor move from `before` to `after` changes which hints are shown, i.e. whether
 * the hints must be asked for again (VS Code does not re-ask on cursor moves by itself).
 */
export function cursorMoveChangesHints(
  mode: DisplayMode,
  hints: Pos[],
  before: Pos | undefined,
  after: Pos | undefined,
  ghostShown = true,
): boolean {
  if (mode !== "both") return false;
  return hints.some((h) => showsHint(mode, h, before, ghostShown) !== showsHint(mode, h, after, ghostShown));
}

/**
 * VS Code cuts inlay-hint labels at `editor.inlayHints.maximumLength` (43 by default) in the middle of
 * a word ("…progressed t…"). We cut first, on purpose: the whole label when it fits, else its first
 * clause (up to `,;:.!?`) when that fits, else as many whole words as fit, and `…`. The full text
 * stays in the hint's tooltip.
 */
export const HINT_MAX_CHARS = 40;
const ELLIPSIS = "…";

export function hintLabel(label: string, maxChars = HINT_MAX_CHARS): string {
  const body = label.endsWith(ELLIPSIS) ? label.slice(0, -ELLIPSIS.length) : label;
  if (body.length <= maxChars) return label;
  const clause = /^(\s*\S.*?[,;:.!?])(?=\s|$)/u.exec(body);
  if (clause && clause[1].length <= maxChars - 1 && clause[1].trim().split(/\s+/).length >= 2) {
    return clause[1] + ELLIPSIS;
  }
  let out = "";
  for (const word of body.match(/\s*\S+/gu) ?? []) {
    if ((out + word).length > maxChars - 1) break;
    out += word;
  }
  // One word longer than the limit: cut it (rare; VS Code would cut it anyway).
  if (out.trim() === "") out = body.slice(0, maxChars - 1);
  return out + ELLIPSIS;
}
