// Lets an inline-completion request wait for the suggestion that is still being generated.
// No `vscode` import: unit-tested under node.
//
// VS Code asks for ghost text on every keystroke, before the debounced suggestion exists, and LSP
// has no "inline completion refresh". So when the server has nothing yet for this version, the
// request waits (cancelled by the next keystroke) until the suggestion for that version exists (its
// first token shows up as an inlay hint) or finished (`tinymorph/metrics`), then asks once more,
// like long-polling completion servers do. Later growth is asked for by ghost.ts.

export class SuggestionWaiter {
  /** uri → highest document version whose suggestion finished. */
  private finishedVersion = new Map<string, number>();
  private waiters = new Set<{ uri: string; version: number; resolve: (done: boolean) => void }>();

  /** The suggestion for `uri` at `version` exists (a hint for it) or finished (`tinymorph/metrics`). */
  finished(uri: string, version: number): void {
    this.finishedVersion.set(uri, Math.max(version, this.finishedVersion.get(uri) ?? -1));
    for (const w of [...this.waiters]) {
      if (w.uri === uri && version >= w.version) {
        this.waiters.delete(w);
        w.resolve(true);
      }
    }
  }

  forget(uri: string): void {
    this.finishedVersion.delete(uri);
  }

  /**
   * Resolves true once the suggestion for `version` (or a later one) finished, false on timeout
   * or cancellation. `onCancel` registers a callback for the request's cancellation.
   */
  wait(uri: string, version: number, timeoutMs: number, onCancel?: (cb: () => void) => void): Promise<boolean> {
    if ((this.finishedVersion.get(uri) ?? -1) >= version) return Promise.resolve(true);
    return new Promise((resolve) => {
      const waiter = {
        uri,
        version,
        resolve: (done: boolean) => {
          clearTimeout(timer);
          resolve(done);
        },
      };
      const stop = () => {
        if (this.waiters.delete(waiter)) waiter.resolve(false);
      };
      const timer = setTimeout(stop, timeoutMs);
      this.waiters.add(waiter);
      onCancel?.(stop);
    });
  }

  get waiting(): number {
    return this.waiters.size;
  }
}
