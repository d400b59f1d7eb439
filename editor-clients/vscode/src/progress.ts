// Shows the server's work-done progress (model loading) both as a notification and in our status
// bar. It replaces vscode-languageclient's built-in handler for `window/workDoneProgress/create`
// (features registered later win), because a progress token can have only one listener.

import * as vscode from "vscode";
import {
  Disposable,
  FeatureState,
  LanguageClient,
  StaticFeature,
  WorkDoneProgress,
  WorkDoneProgressCreateRequest,
} from "vscode-languageclient/node";
import { ProgressValue } from "./status";

export class LoadProgressFeature implements StaticFeature {
  private active = new Set<Disposable>();

  constructor(
    private readonly client: LanguageClient,
    private readonly onValue: (value: ProgressValue) => void,
  ) {}

  fillClientCapabilities(capabilities: { window?: { workDoneProgress?: boolean } }): void {
    capabilities.window = capabilities.window ?? {};
    capabilities.window.workDoneProgress = true;
  }

  getState(): FeatureState {
    return { kind: "static" };
  }

  initialize(): void {
    this.client.onRequest(WorkDoneProgressCreateRequest.type, (params) => this.track(params.token));
  }

  clear(): void {
    for (const d of this.active) d.dispose();
    this.active.clear();
  }

  private track(token: string | number): void {
    let finish: (() => void) | undefined;
    let report: ((value: { message?: string; increment?: number }) => void) | undefined;
    let lastPercent = 0;
    const listener = this.client.onProgress(WorkDoneProgress.type, token, (value) => {
      this.onValue(value as ProgressValue);
      if (value.kind === "begin") {
        void vscode.window.withProgress(
          { location: vscode.ProgressLocation.Notification, title: `tinymorph: ${value.title}` },
          (progress) =>
            new Promise<void>((resolve) => {
              finish = resolve;
              report = (v) => progress.report(v);
              report({ message: value.message, increment: value.percentage });
              lastPercent = value.percentage ?? 0;
            }),
        );
      } else if (value.kind === "report") {
        // withProgress wants increments; the protocol sends absolute percentages.
        const percent = value.percentage ?? lastPercent;
        report?.({ message: value.message, increment: percent - lastPercent });
        lastPercent = percent;
      } else {
        finish?.();
        listener.dispose();
        this.active.delete(listener);
      }
    });
    this.active.add(listener);
  }
}
