// Where the suggestion shows (`tinymorph.display`). No `vscode` import: unit-tested under node.
//
// "both": ghost text at the cursor (Tab accepts) and the inlay hint wherever the cursor is not.
// VS Code draws ghost text only at the cursor; showing the hint there too would print the same
// text twice, while a hint left behind when the cursor moves away still marks the suggestion.

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

/** Whether a hint at `hint` is shown, given the cursor (undefined: not in this document or a selection). */
export function showsHint(mode: DisplayMode, hint: Pos, cursor: Pos | undefined): boolean {
  if (mode === "ghostText") return false;
  if (mode === "inlayHint" || !cursor) return true;
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
): boolean {
  if (mode !== "both") return false;
  return hints.some((h) => showsHint(mode, h, before) !== showsHint(mode, h, after));
}
