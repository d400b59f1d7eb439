import { test } from "node:test";
import assert from "node:assert/strict";
import { GhostTracker } from "../src/ghost";

const uri = "file:///story.md";
const at = (line: number, character: number) => ({ line, character });

test("issue 12.1: a ghost text served while the suggestion streamed is asked again when it finishes", () => {
  const g = new GhostTracker();
  const anchor = at(0, 62);
  // First token streamed: the hint shows " she"; a request got the partial item.
  g.onHint(uri, 3, "s1", " she", anchor);
  g.requestStarted(uri, 3);
  g.requestEnded(uri, 3, " she");
  assert.equal(g.shouldAskAgain(uri, 3, anchor), false, "nothing changed since that request");
  // It grows (the hint at the cursor shows that) and finishes: the served " she" is stale.
  g.onHint(uri, 3, "s1", " she was killed", anchor);
  assert.equal(g.shouldAskAgain(uri, 3, anchor), false, "growing: the hint shows it, VS Code waits for the end");
  g.onFinished(uri, 3, "s1", " she was killed in the sea.");
  assert.equal(g.shouldAskAgain(uri, 3, anchor), true, "finished: ask again");
  g.requestStarted(uri, 3);
  assert.equal(g.shouldAskAgain(uri, 3, anchor), false, "not while a request is in flight");
  g.requestEnded(uri, 3, " she was killed in the sea.");
  assert.equal(g.shouldAskAgain(uri, 3, anchor), false, "the whole suggestion is served: done");
  // The refresh after the finish brings the same hint once more: still nothing to do.
  g.onHint(uri, 3, "s1", " she was killed in the sea.", anchor);
  assert.equal(g.shouldAskAgain(uri, 3, anchor), false);
});

test("a change that arrives while a request is in flight is asked for after it ends", () => {
  const g = new GhostTracker();
  const anchor = at(0, 10);
  g.onHint(uri, 1, "s1", " a", anchor);
  g.requestStarted(uri, 1);
  g.onFinished(uri, 1, "s1", " a b c.");
  g.requestEnded(uri, 1, " a");
  assert.equal(g.shouldAskAgain(uri, 1, anchor), true);
});

test("never asked away from the anchor (an explicit request there would start a new suggestion)", () => {
  const g = new GhostTracker();
  g.onHint(uri, 1, "s1", " a", at(0, 10));
  g.onFinished(uri, 1, "s1", " a b.");
  assert.equal(g.shouldAskAgain(uri, 1, at(0, 4)), false);
  assert.equal(g.shouldAskAgain(uri, 1, undefined), false);
  assert.equal(g.shouldAskAgain(uri, 2, at(0, 10)), false, "not for another version");
});

test("issue 12.3: a dismissed suggestion stays dismissed until the text changes", () => {
  const g = new GhostTracker();
  const anchor = at(0, 10);
  g.onHint(uri, 4, "s1", " gone", anchor);
  g.requestStarted(uri, 4);
  g.requestEnded(uri, 4, " gone");
  g.dismiss(uri, 4);
  assert.equal(g.isDismissed(uri, 4), true);
  g.onFinished(uri, 4, "s1", " gone for good.");
  assert.equal(g.shouldAskAgain(uri, 4, anchor), false, "a finish after the dismissal does not bring it back");
  g.onHint(uri, 5, "s2", " new", anchor);
  assert.equal(g.isDismissed(uri, 5), false, "an edit (new version) ends the dismissal");
});

test("ghostServed tells whether the hint at the cursor would repeat the ghost text", () => {
  const g = new GhostTracker();
  g.onHint(uri, 1, "s1", " a", at(0, 1));
  assert.equal(g.ghostServed(uri, 1), false);
  g.requestStarted(uri, 1);
  g.requestEnded(uri, 1, undefined);
  assert.equal(g.ghostServed(uri, 1), false, "an empty answer is no ghost text");
  g.requestStarted(uri, 1);
  g.requestEnded(uri, 1, " a");
  assert.equal(g.ghostServed(uri, 1), true);
  assert.equal(g.ghostServed(uri, 2), false);
});

test("a typed-ahead hint keeps the finished suggestion's id", () => {
  const g = new GhostTracker();
  g.onFinished(uri, 1, "s1", " and then");
  assert.equal(g.isFinished(uri, "s1"), true);
  g.onHint(uri, 2, "s1", "nd then", at(0, 5));
  assert.equal(g.isFinished(uri, "s1"), true);
  assert.equal(g.isFinished(uri, "s2"), false);
});

test("typing what a finished suggestion shows is typing ahead (nothing new is generated)", () => {
  const g = new GhostTracker();
  g.onHint(uri, 1, "s1", " and then the rain", at(0, 5));
  assert.equal(g.typesAhead(uri, at(0, 5), " and"), false, "not while it is still generated");
  g.onFinished(uri, 1, "s1", " and then the rain");
  assert.equal(g.typesAhead(uri, at(0, 5), " and"), true);
  assert.equal(g.typesAhead(uri, at(0, 5), " and then the rain"), true, "all of it (Tab)");
  assert.equal(g.typesAhead(uri, at(0, 5), " but"), false, "other text");
  assert.equal(g.typesAhead(uri, at(0, 4), " and"), false, "elsewhere");
});

test("a suggestion typed ahead while it streamed is asked for when it finishes", () => {
  const g = new GhostTracker();
  g.onHint(uri, 1, "s1", " and", at(0, 5));
  g.onHint(uri, 2, "s1", "nd", at(0, 6));
  assert.equal(g.shouldAskAgain(uri, 2, at(0, 6)), false);
  g.onFinished(uri, 1, "s1", " and then.");
  assert.equal(g.shouldAskAgain(uri, 2, at(0, 6)), true);
});
