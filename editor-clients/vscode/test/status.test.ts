import { test } from "node:test";
import assert from "node:assert/strict";
import { formatMs, GENERATING_TIMEOUT_MS, StatusModel, statusReport, statusView } from "../src/status";

test("formatMs", () => {
  assert.equal(formatMs(84.6), "85 ms");
  assert.equal(formatMs(1234), "1.2 s");
  assert.equal(formatMs(null), "–");
});

test("starting → loading with percentage → ready with TTFT", () => {
  const m = new StatusModel();
  assert.match(statusView(m).text, /loading~spin\) tinymorph starting$/);
  m.onProgress({ kind: "begin", title: "Loading model", percentage: 0 });
  m.onProgress({ kind: "report", percentage: 42.4, message: "weights" });
  assert.equal(m.state, "loading");
  assert.equal(statusView(m).text, "$(loading~spin) tinymorph loading 42%");
  assert.match(statusView(m).tooltip, /weights/);
  m.onProgress({ kind: "end" });
  assert.equal(m.state, "ready");
  m.onStatus({ state: "ready", model: "SmolLM2-135M", lastTtftMs: null, message: "", steering: [] });
  assert.equal(statusView(m).text, "$(sparkle) tinymorph ready");
  m.onMetrics({ uri: "file:///a.md", ttftMs: 85.2, tokensPerSecond: 31.5 });
  const view = statusView(m);
  assert.equal(view.text, "$(sparkle) tinymorph 85 ms");
  assert.match(view.tooltip, /model: SmolLM2-135M/);
  assert.match(view.tooltip, /31\.5 tok\/s/);
});

test("an edit shows generating until the metrics for that document arrive", () => {
  const m = new StatusModel();
  m.onStatus({ state: "ready", lastTtftMs: 90 });
  m.onEdit("file:///a.md", 1000);
  assert.equal(m.state, "generating");
  assert.equal(statusView(m).text, "$(sync~spin) tinymorph generating");
  m.onMetrics({ uri: "file:///other.md", ttftMs: 50 }, 1100);
  assert.equal(m.state, "generating", "metrics for another document do not end this one");
  assert.equal(m.isPending("file:///a.md"), true);
  assert.equal(m.isPending("file:///other.md"), false);
  m.onMetrics({ uri: "file:///a.md", ttftMs: 70 }, 1200);
  assert.equal(m.state, "ready");
  assert.equal(m.isPending("file:///a.md"), false);
  assert.equal(m.lastTtftMs, 70);
});

test("generating times out when no suggestion comes", () => {
  const m = new StatusModel();
  m.onStatus({ state: "ready" });
  m.onEdit("file:///a.md", 0);
  assert.equal(m.tick(GENERATING_TIMEOUT_MS - 1), false);
  assert.equal(m.tick(GENERATING_TIMEOUT_MS + 1), true);
  assert.equal(m.state, "ready");
});

test("disabled and error states; edits while disabled do not show generating", () => {
  const m = new StatusModel();
  m.onStatus({ state: "disabled" });
  m.onEdit("file:///a.md");
  assert.equal(m.state, "disabled");
  assert.equal(statusView(m).text, "$(circle-slash) tinymorph off");
  m.onStatus({ state: "error", message: "model not found" });
  const view = statusView(m);
  assert.equal(view.text, "$(error) tinymorph error");
  assert.equal(view.severity, "error");
  assert.match(view.tooltip, /model not found/);
  m.onStatus({ state: "bogus" });
  assert.equal(m.state, "error", "unknown states are ignored");
});

test("steering count and entries appear in the status", () => {
  const m = new StatusModel();
  m.onStatus({
    state: "ready",
    steering: [
      { feature: "default:12", layer: 15, mode: "add", strength: 4 },
      { feature: "default:7", layer: 15, mode: "clamp", strength: -2 },
    ],
  });
  const view = statusView(m);
  assert.equal(view.text, "$(sparkle) tinymorph ready $(symbol-color)2");
  assert.match(view.tooltip, /steering: default:12 \+4 @L15, default:7 -2 clamp @L15/);
});

test("issue 12.2: generating (spinner) lasts while the active document's generation runs", () => {
  const m = new StatusModel();
  m.onStatus({ state: "ready", lastTtftMs: 2100 });
  m.setActive("file:///a.md");
  m.onEdit("file:///a.md", 1000, 7);
  const view = statusView(m);
  assert.equal(view.text, "$(sync~spin) tinymorph generating", "not 'ready' or the last TTFT while it runs");
  m.onMetrics({ uri: "file:///a.md", version: 6, ttftMs: 50 }, 1100);
  assert.equal(m.state, "generating", "an older suggestion finishing does not end the wait for this one");
  m.onEdit("file:///b.md", 1200, 1);
  m.onMetrics({ uri: "file:///a.md", version: 7, ttftMs: 60 }, 1300);
  assert.equal(m.state, "ready", "another document's generation does not show in this editor");
  m.setActive("file:///b.md");
  assert.equal(m.state, "generating");
});

test("issue 12.6: a restarted server's status has no numbers of the old one", () => {
  const m = new StatusModel();
  m.onStatus({ state: "ready", steering: [{ feature: "default:3", strength: 4 }] });
  m.onMetrics({ uri: "file:///a.md", ttftMs: 85, tokensPerSecond: 31.5 });
  m.onStarting();
  const view = statusView(m);
  assert.doesNotMatch(view.tooltip, /31\.5|85 ms/);
  assert.match(view.tooltip, /last TTFT: –/);
  assert.equal(m.lastTtftMs, null);
  assert.equal(m.tokensPerSecond, null);
});

test("issue 12.5: Restricted Mode shows why tinymorph is off and where to change it", () => {
  const m = new StatusModel();
  m.onUntrusted();
  const view = statusView(m);
  assert.equal(view.text, "$(workspace-untrusted) tinymorph off (Restricted Mode)");
  assert.match(view.tooltip, /Restricted Mode/);
  assert.match(view.tooltip, /trust/i);
  assert.equal(view.command, "workbench.trust.manage");
  m.onEdit("file:///a.md");
  assert.equal(m.state, "untrusted");
});

test("issue 12.7: Show Server Status is readable lines, not JSON", () => {
  const m = new StatusModel();
  const report = statusReport(
    {
      state: "ready",
      model: "SmolLM2-135M-Instruct",
      lastTtftMs: 84.6,
      message: "",
      steering: [{ feature: "default:12", strength: 4, layer: 15, mode: "add" }],
      stats: { scheduled: 5, finished: 3, cancelled: 2, failed: 0, accepted: 1 },
    },
    m,
  );
  assert.equal(report.summary, "tinymorph is ready (SmolLM2-135M-Instruct)");
  assert.deepEqual(report.detail, [
    "last time to first token: 85 ms",
    "steering: default:12 +4 @L15",
    "suggestions: 5 scheduled, 3 finished, 2 cancelled, 0 failed, 1 accepted",
  ]);
  for (const line of [report.summary, ...report.detail]) assert.doesNotMatch(line, /[{}"]/);
});
