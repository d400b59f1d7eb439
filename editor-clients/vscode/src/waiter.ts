// Lets an inline-completion request wait for the suggestion that is still being generated.
// No `vscode` import: unit-tested under node.
//
// VS Code asks for ghost text on every keystroke, before the debounced suggestion exists, and LSP
// has no "inline completion refresh". So when the server has nothing yet for this version, the
// request waits (cancelled by the next keystroke) until the suggestion for that version finished
// (`tinymorph/metrics`), then asks once more, like long-polling completion servers do. Meanwhile
// the inlay hint at the cursor shows the suggestion as it streams (see display.ts, ghost.ts).

export class SuggestionWaiter {
  /** uri → highest document version whose suggestion finished. */
  private finishedVersion = new Map<string, number>();
  private waiters = new Set<{ uri: string; version: number; resolve: (done: boolean) => void }>();
  private conditions = new Set<{ uri: string; check: () => boolean; resolve: (done: boolean) => void }>();

  /** The suggestion for `uri` at `version` finished (`tinymorph/metrics`). */
  finished(uri: string, version: number): void {
    this.finishedVersion.set(uri, Math.max(version, this.finishedVersion.get(uri) ?? -1));
    for (const w of [...this.waiters]) {
      if (w.uri === uri && version >= w.version) {
        this.waiters.delete(w);
        w.resolve(true);
      }
    }
    for (const c of [...this.conditions]) {
      if (c.uri === uri && c.check()) {
        this.conditions.delete(c);
        c.resolve(true);
      }
    }
  }

  /**
   * Resolves true once `check()` holds (tested now and whenever something finishes for `uri`),
   * false on timeout or cancellation.
   */
  until(uri: string, check: () => boolean, timeoutMs: number, onCancel?: (cb: () => void) => void): Promise<boolean> {
    if (check()) return Promise.resolve(true);
    return new Promise((resolve) => {
      const waiter = {
        uri,
        check,
        resolve: (done: boolean) => {
          clearTimeout(timer);
          resolve(done);
        },
      };
      const stop = () => {
        if (this.conditions.delete(waiter)) waiter.resolve(false);
      };
      const timer = setTimeout(stop, timeoutMs);
      this.conditions.add(waiter);
      onCancel?.(stop);
    });
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
    return this.waiters.size + this.conditions.size;
  }
}
