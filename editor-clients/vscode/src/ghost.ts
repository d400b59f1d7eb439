// Keeps VS Code's ghost text in step with the server's suggestion. No `vscode` import: unit-tested under node.
//
// The server streams a suggestion token by token; it tells us it changed by sending
// `workspace/inlayHint/refresh` (we then see a new hint label) and `tinymorph/metrics` when it
// finished. LSP has no "inline completion refresh", and VS Code keeps showing the ghost text it got
// last: an answer that came while the suggestion was still growing (" she") stayed on screen (and
// was what Tab inserted) after the suggestion finished (" she was killed in the sea."). Asking
// again does not help reliably: VS Code skips an explicit request for the same position and text
// version as the explicit one it already answered. So the extension hands VS Code only finished
// suggestions (the inlay hint at the cursor shows the text while it streams), and this tracker says
// when a finished suggestion has not reached VS Code yet; it also remembers dismissals, which last
// until the text changes.

import type { Pos } from "./display";

interface DocGhost {
  version: number;
  /** Bumped whenever the suggestion for `version` changed (a new hint label or id, or it finished). */
  changes: number;
  /** `changes` when the last inline-completion request for `version` started. */
  askedAt: number;
  /** Inline-completion requests in flight for this document. */
  inFlight: number;
  /** The last hint seen for `version`: its id, label and where it sits. */
  hintId?: string;
  hintLabel?: string;
  anchor?: Pos;
  /** The item text we last handed to VS Code for `version`, if any. */
  served?: string;
  /** The finished suggestion's id and text for `version` (from `tinymorph/metrics`). */
  finishedId?: string;
  finishedText?: string;
  dismissed: boolean;
}

export class GhostTracker {
  private docs = new Map<string, DocGhost>();
  /** uri → ids of its suggestions that finished (a typed-ahead one keeps its id into later versions). */
  private finishedIds = new Map<string, Set<string>>();

  /** The state for `uri` at `version`; a newer version starts afresh (the text changed). */
  private at(uri: string, version: number): DocGhost {
    let d = this.docs.get(uri);
    if (!d || version > d.version) {
      const inFlight = d?.inFlight ?? 0;
      d = { version, changes: 0, askedAt: -1, inFlight, dismissed: false };
      this.docs.set(uri, d);
    }
    return d;
  }

  private current(uri: string, version: number): DocGhost | undefined {
    const d = this.docs.get(uri);
    return d && d.version === version ? d : undefined;
  }

  /** The server returned a hint for `version` (the suggestion exists: at least one token streamed). */
  onHint(uri: string, version: number, id: string | undefined, label: string, anchor: Pos): void {
    const d = this.at(uri, version);
    if (d.version !== version) return;
    if (d.hintId !== id || d.hintLabel !== label) d.changes++;
    d.hintId = id;
    d.hintLabel = label;
    d.anchor = anchor;
  }

  /** `tinymorph/metrics`: the suggestion `id` for `version` finished with `text`. */
  onFinished(uri: string, version: number, id: string | undefined, text: string | undefined): void {
    if (id !== undefined) {
      const ids = this.finishedIds.get(uri) ?? new Set<string>();
      if (ids.size > 64) ids.clear();
      ids.add(id);
      this.finishedIds.set(uri, ids);
    }
    const d = this.at(uri, version);
    if (d.version === version) {
      d.finishedId = id;
      d.finishedText = text;
      d.changes++;
    } else if (id !== undefined && d.hintId === id) {
      // Typed ahead while it streamed: the same suggestion, now finished, for the newer version.
      d.finishedId = id;
      d.finishedText = undefined;
      d.changes++;
    }
  }

  /** An inline-completion request for `version` starts. */
  requestStarted(uri: string, version: number): void {
    const d = this.at(uri, version);
    d.inFlight++;
    if (d.version === version) d.askedAt = d.changes;
  }

  /** A request already in flight asks the server once more (after waiting for the first token). */
  askedAgain(uri: string, version: number): void {
    const d = this.current(uri, version);
    if (d) d.askedAt = d.changes;
  }

  /** It ended; `served` is the item text handed to VS Code (undefined when none). */
  requestEnded(uri: string, version: number, served: string | undefined): void {
    const d = this.docs.get(uri);
    if (!d) return;
    d.inFlight = Math.max(0, d.inFlight - 1);
    if (d.version === version && served !== undefined) d.served = served;
  }

  /** The user dismissed the suggestion shown for `version`: nothing more shows until the text changes. */
  dismiss(uri: string, version: number): void {
    const d = this.at(uri, version);
    if (d.version === version) d.dismissed = true;
  }

  isDismissed(uri: string, version: number): boolean {
    return this.current(uri, version)?.dismissed ?? false;
  }

  /** Whether VS Code was handed ghost text for `version` (then the hint at the cursor would repeat it). */
  ghostServed(uri: string, version: number): boolean {
    const served = this.current(uri, version)?.served;
    return served !== undefined && served !== "";
  }

  /** Whether the suggestion `id` is one that already finished (a typed-ahead hint of a finished suggestion). */
  isFinished(uri: string, id: string | undefined): boolean {
    return id !== undefined && (this.finishedIds.get(uri)?.has(id) ?? false);
  }

  /**
   * Whether inserting `text` at `at` types ahead into a finished suggestion that is shown (the user
   * typed what it suggests, or accepted it): the server keeps that suggestion and generates nothing new.
   */
  typesAhead(uri: string, at: Pos, text: string): boolean {
    const d = this.docs.get(uri);
    if (!d || !d.anchor || d.hintLabel === undefined || text === "" || d.dismissed) return false;
    if (!this.isFinished(uri, d.hintId)) return false;
    if (d.anchor.line !== at.line || d.anchor.character !== at.character) return false;
    const shown = d.hintLabel.endsWith("…") ? d.hintLabel.slice(0, -1) : d.hintLabel;
    return !shown.startsWith("↵") && shown.startsWith(text);
  }

  /** Where the suggestion for `version` is anchored (its hint's position), if known. */
  anchor(uri: string, version: number): Pos | undefined {
    return this.current(uri, version)?.anchor;
  }

  /**
   * Whether to ask VS Code for the ghost text again now: the suggestion for the document's current
   * version finished since the last request started and VS Code does not have its whole text, no
   * request is in flight (it will get the finished suggestion itself), the user did not dismiss it,
   * and the cursor is where the suggestion is anchored (elsewhere an explicit request would start a
   * new suggestion).
   */
  shouldAskAgain(uri: string, version: number, cursor: Pos | undefined): boolean {
    const d = this.current(uri, version);
    if (!d || d.dismissed || d.inFlight > 0 || d.changes <= d.askedAt) return false;
    if (d.finishedId === undefined) return false;
    if (d.finishedText !== undefined && d.served === d.finishedText) return false;
    if (!cursor || !d.anchor) return false;
    return cursor.line === d.anchor.line && cursor.character === d.anchor.character;
  }

  forget(uri: string): void {
    this.docs.delete(uri);
    this.finishedIds.delete(uri);
  }
}
