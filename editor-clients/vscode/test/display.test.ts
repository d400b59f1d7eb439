import { test } from "node:test";
import assert from "node:assert/strict";
import { cursorMoveChangesHints, displayMode, showsGhostText, showsHint } from "../src/display";

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
