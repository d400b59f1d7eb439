// QuickPick / InputBox flows for steering. The item building and parsing are in steering.ts.

import * as vscode from "vscode";
import { SteeringEntry } from "./status";
import {
  CompareResult,
  compareDocument,
  DEFAULT_STRENGTH,
  FeatureHit,
  FeaturePickItem,
  featureItems,
  searchTitle,
  LatestOnly,
  parseStrength,
  steeringItems,
} from "./steering";

export type ServerCall = <T>(command: string, args?: unknown[]) => Promise<T | undefined>;

const SEARCH_DEBOUNCE_MS = 150;
const SEARCH_LIMIT = 50;

async function askStrength(feature: string, current?: number): Promise<number | undefined> {
  const input = await vscode.window.showInputBox({
    title: `Steering strength for ${feature}`,
    prompt: "Positive pushes the text towards the feature, negative away from it.",
    value: current !== undefined ? String(current) : DEFAULT_STRENGTH,
    validateInput: (text) => {
      const parsed = parseStrength(text);
      return typeof parsed === "string" ? parsed : undefined;
    },
  });
  if (input === undefined) return undefined;
  const parsed = parseStrength(input);
  return typeof parsed === "number" ? parsed : undefined;
}

/**
 * Searchable feature picker: every keystroke (debounced) asks the server's
 * `tinymorph.features.search`, then the chosen feature is steered with the strength typed.
 * Returns the new steering list, or undefined when cancelled.
 */
export async function pickFeature(call: ServerCall, steering: SteeringEntry[]): Promise<SteeringEntry[] | undefined> {
  const quickPick = vscode.window.createQuickPick<FeaturePickItem>();
  quickPick.title = searchTitle("", -1);
  quickPick.placeholder = "Describe it (\"about the sea\", \"formal\") or search features";
  quickPick.matchOnDescription = true;
  quickPick.matchOnDetail = true;
  const latest = new LatestOnly();
  let timer: NodeJS.Timeout | undefined;
  const search = (query: string) => {
    const id = latest.next();
    quickPick.busy = true;
    void call<FeatureHit[]>("tinymorph.features.search", [query, SEARCH_LIMIT]).then((hits) => {
      if (!latest.isLatest(id)) return;
      quickPick.busy = false;
      quickPick.items = featureItems(hits ?? [], steering, query);
      quickPick.title = searchTitle(query, hits?.length ?? 0);
    });
  };
  quickPick.onDidChangeValue((value) => {
    if (timer) clearTimeout(timer);
    timer = setTimeout(() => search(value), SEARCH_DEBOUNCE_MS);
  });
  search("");
  const picked = await new Promise<FeaturePickItem | undefined>((resolve) => {
    quickPick.onDidAccept(() => resolve(quickPick.selectedItems[0]));
    quickPick.onDidHide(() => resolve(undefined));
    quickPick.show();
  });
  if (timer) clearTimeout(timer);
  quickPick.dispose();
  if (!picked) return undefined;
  const strength = await askStrength(picked.featureId, picked.currentStrength ?? picked.suggestedStrength);
  if (strength === undefined) return undefined;
  return steerSet(call, { feature: picked.featureId, strength });
}

/** Lists the current steering; lets the user change a strength, remove an entry, add or clear. */
export async function editSteering(call: ServerCall, steering: SteeringEntry[]): Promise<SteeringEntry[] | undefined> {
  const choice = await vscode.window.showQuickPick(steeringItems(steering), { title: "tinymorph: steering" });
  if (!choice) return undefined;
  if (choice.action === "add") return pickFeature(call, steering);
  if (choice.action === "clear") return call<SteeringEntry[]>("tinymorph.steer.clear");
  const feature = choice.featureId!;
  const entry = steering.find((s) => s.feature === feature);
  const what = await vscode.window.showQuickPick(["Change strength", "Remove"], { title: feature });
  if (what === "Remove") return call<SteeringEntry[]>("tinymorph.steer.remove", [feature]);
  if (what !== "Change strength") return undefined;
  const strength = await askStrength(feature, entry?.strength);
  if (strength === undefined) return undefined;
  return steerSet(call, { ...entry, feature, strength });
}

/** `tinymorph.steer.set` with a notification while it runs: the first time a feature is added the
 * server calibrates its strength 1 (~20 s on a laptop CPU), and a picker that closed with nothing
 * to show for that long reads as a hang. */
function steerSet(call: ServerCall, entry: SteeringEntry): Thenable<SteeringEntry[] | undefined> {
  return vscode.window.withProgress(
    {
      location: vscode.ProgressLocation.Notification,
      title: `tinymorph: steering by ${entry.feature} (a new one is calibrated first, ~20 s)…`,
    },
    () => call<SteeringEntry[]>("tinymorph.steer.set", [entry]),
  );
}

/**
 * Read-only side documents for "compare steered vs unsteered". A custom URI scheme keeps them out
 * of the language client's document selector, so the server does not suggest into them.
 */
export class CompareView implements vscode.Disposable {
  static readonly scheme = "tinymorph-compare";
  private contents = new Map<string, string>();
  private counter = 0;
  private registration: vscode.Disposable;

  constructor() {
    this.registration = vscode.workspace.registerTextDocumentContentProvider(CompareView.scheme, {
      provideTextDocumentContent: (uri) => this.contents.get(uri.path) ?? "",
    });
  }

  async show(result: CompareResult, steering: SteeringEntry[], context: string): Promise<void> {
    const path = `/compare-${++this.counter}.md`;
    this.contents.set(path, compareDocument(result, steering, context));
    const doc = await vscode.workspace.openTextDocument(vscode.Uri.from({ scheme: CompareView.scheme, path }));
    await vscode.window.showTextDocument(doc, { viewColumn: vscode.ViewColumn.Beside, preview: true, preserveFocus: true });
  }

  dispose(): void {
    this.registration.dispose();
  }
}
