import { test } from "node:test";
import assert from "node:assert/strict";
import { SuggestionWaiter } from "../src/waiter";

test("a waiter resolves when its version (or a later one) finishes", async () => {
  const w = new SuggestionWaiter();
  const p = w.wait("file:///a.md", 5, 1000);
  w.finished("file:///b.md", 9);
  w.finished("file:///a.md", 4);
  assert.equal(w.waiting, 1, "older versions and other documents do not count");
  w.finished("file:///a.md", 6);
  assert.equal(await p, true);
  assert.equal(w.waiting, 0);
});

test("a suggestion that finished before the wait started counts at once", async () => {
  const w = new SuggestionWaiter();
  w.finished("file:///a.md", 7);
  assert.equal(await w.wait("file:///a.md", 7, 1000), true);
  w.forget("file:///a.md");
  assert.equal(await w.wait("file:///a.md", 7, 10), false);
});

test("timeout and cancellation resolve false", async () => {
  const w = new SuggestionWaiter();
  assert.equal(await w.wait("file:///a.md", 1, 10), false);
  let cancel: () => void = () => {};
  const p = w.wait("file:///a.md", 2, 1000, (cb) => (cancel = cb));
  cancel();
  assert.equal(await p, false);
  assert.equal(w.waiting, 0);
});

test("until: resolves when the condition holds after a finish, false when cancelled", async () => {
  const w = new SuggestionWaiter();
  let done = false;
  const p = w.until("file:///a.md", () => done, 1000);
  w.finished("file:///a.md", 1);
  assert.equal(w.waiting, 1, "condition still false");
  done = true;
  w.finished("file:///a.md", 2);
  assert.equal(await p, true);
  let cancel: () => void = () => {};
  const q = w.until("file:///a.md", () => false, 1000, (cb) => (cancel = cb));
  cancel();
  assert.equal(await q, false);
  assert.equal(await w.until("file:///a.md", () => true, 10), true);
});
