import { test } from "node:test";
import assert from "node:assert/strict";
import { cursorMoveChangesHints, displayMode, HINT_MAX_CHARS, hintLabel, showsGhostText, showsHint } from "../src/display";

const at = (line: number, character: number) => ({ line, character });

test("display mode parsing falls back to both", () => {
  assert.equal(displayMode("ghostText"), "ghostText");
  assert.equal(displayMode("inlayHint"), "inlayHint");
  assert.equal(displayMode("nonsense"), "both");
  assert.equal(displayMode(undefined), "both");
});

test("both: the hint hides where the ghost text is (at the cursor)", () => {
  assert.equal(showsHint("both", at(0, 30), at(0, 30)), false);
  assert.equal(showsHint("both", at(0, 30), at(0, 12)), true);
  assert.equal(showsHint("both", at(0, 30), undefined), true);
  assert.equal(showsGhostText("both"), true);
});

test("single surfaces", () => {
  assert.equal(showsHint("inlayHint", at(0, 30), at(0, 30)), true);
  assert.equal(showsGhostText("inlayHint"), false);
  assert.equal(showsHint("ghostText", at(0, 30), at(5, 0)), false);
  assert.equal(showsGhostText("ghostText"), true);
});

test("cursor moves re-ask for hints only when one appears or disappears", () => {
  const hints = [at(0, 30)];
  assert.equal(cursorMoveChangesHints("both", hints, at(0, 30), at(0, 29)), true);
  assert.equal(cursorMoveChangesHints("both", hints, at(0, 29), at(0, 28)), false);
  assert.equal(cursorMoveChangesHints("both", hints, at(0, 10), at(0, 30)), true);
  assert.equal(cursorMoveChangesHints("inlayHint", hints, at(0, 30), at(0, 29)), false);
  assert.equal(cursorMoveChangesHints("both", [], at(0, 30), at(0, 29)), false);
});

test("issue 12.2: until VS Code has ghost text, the hint shows at the cursor too", () => {
  assert.equal(showsHint("both", at(0, 30), at(0, 30), false), true);
  assert.equal(showsHint("both", at(0, 30), at(0, 30), true), false);
  assert.equal(showsHint("ghostText", at(0, 30), at(0, 30), false), false);
});

test("issue 12.8: inlay-hint labels are cut on purpose below VS Code's 43 characters", () => {
  const long = " she was killed in the sea, and the children never saw her again after that day";
  const clause = hintLabel(long);
  assert.equal(clause, " she was killed in the sea,…");
  const words = hintLabel(" the old lighthouse keeper had progressed to the final chapter of his story");
  assert.ok(words.length <= HINT_MAX_CHARS, words);
  assert.ok(words.endsWith("…"));
  assert.equal(words, " the old lighthouse keeper had…");
  assert.equal(hintLabel(" short."), " short.", "labels that fit stay whole");
  assert.equal(hintLabel(" fits…"), " fits…", "the server's ellipsis stays");
  assert.equal(hintLabel("x".repeat(60)).length, HINT_MAX_CHARS);
  for (const label of [long, "↵" + long, " a, " + "b".repeat(50)]) {
    assert.ok(hintLabel(label).length <= HINT_MAX_CHARS, hintLabel(label));
  }
});
