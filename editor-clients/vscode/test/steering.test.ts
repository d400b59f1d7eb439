import { test } from "node:test";
import assert from "node:assert/strict";
import {
  compareDocument,
  DEFAULT_STRENGTH,
  featureItems,
  LatestOnly,
  parseStrength,
  searchTitle,
  showToken,
  steeringItems,
  steeringToRestore,
} from "../src/steering";

test("search title says when nothing matched", () => {
  assert.equal(searchTitle("", -1), "tinymorph: steer towards a feature");
  assert.equal(searchTitle("", 0), "tinymorph: steer towards a feature (type to search)");
  assert.equal(searchTitle(" sea ", 0), 'tinymorph: steer towards a feature (no match for "sea")');
  assert.equal(searchTitle("sea", 3), "tinymorph: steer towards a feature");
});

test("feature items show label, id, top tokens and the current strength", () => {
  const items = featureItems(
    [
      { id: "default:12", label: "formal register", topTokens: [" therefore", "\n", "hence"], maxActivation: 7.25 },
      { id: "default:99", label: "", topTokens: [] },
    ],
    [{ feature: "default:12", strength: 4 }],
  );
  assert.equal(items.length, 2);
  assert.equal(items[0].label, "$(check) formal register");
  assert.equal(items[0].description, "default:12  (steering 4)");
  assert.equal(items[0].detail, "top tokens: ·therefore  \\n  hence · max act 7.25");
  assert.equal(items[0].currentStrength, 4);
  assert.equal(items[0].alwaysShow, true);
  assert.equal(items[1].label, "default:99", "a feature without label shows its id");
  assert.equal(items[1].detail, undefined);
  assert.equal(items[1].currentStrength, undefined);
});

test("what the user typed comes first, as a description to steer by", () => {
  const items = featureItems([{ id: "default:7", label: "waves" }], [{ feature: "about the sea", strength: 1 }], "  about   the sea ");
  assert.equal(items.length, 2);
  assert.equal(items[0].featureId, "about the sea");
  assert.match(items[0].label, /Steer by description: "about the sea"/);
  assert.equal(items[0].currentStrength, 1);
  assert.equal(items[1].featureId, "default:7");
  assert.match(items[0].detail ?? "", /the model writes about it/, "a hit without readsQuery: no warning");
  const none = featureItems([{ id: "default:872", label: "virtual", readsQuery: false }], [], "dinosaurs");
  assert.match(none[0].detail ?? "", /no feature below fires on "dinosaurs" itself/);
  const some = featureItems([{ id: "default:1", readsQuery: false }, { id: "default:2", readsQuery: true }], [], "wine");
  assert.match(some[0].detail ?? "", /the model writes about it/);
  assert.equal(featureItems([], [], "  ").length, 0, "no description item for an empty query");
  assert.equal(featureItems([], [], "123").length, 0, "numbers are not a description");
});

test("a hit of \"less formal\" is offered turned down", () => {
  const items = featureItems([{ id: "default:9", label: "formal", suggestedStrength: -1 }, { id: "default:2" }], [], "less formal");
  assert.equal(items[1].suggestedStrength, -1);
  assert.match(items[1].description ?? "", /turned down: -1/);
  assert.equal(items[2].description, "default:2");
  const steered = featureItems([{ id: "default:9", suggestedStrength: -1 }], [{ feature: "default:9", strength: 2 }], "less formal");
  assert.match(steered[1].description ?? "", /steering 2/, "a steered feature shows its own strength");
});

test("showToken makes whitespace visible", () => {
  assert.equal(showToken(" the"), "·the");
  assert.equal(showToken("a\tb"), "a\\tb");
});

test("steering items: entries, add, and clear only when something is steered", () => {
  assert.deepEqual(
    steeringItems([]).map((i) => i.action),
    ["add"],
  );
  const items = steeringItems([{ feature: "default:3", strength: -1.5, layer: 15 }]);
  assert.deepEqual(
    items.map((i) => i.action),
    ["edit", "add", "clear"],
  );
  assert.equal(items[0].featureId, "default:3");
  assert.match(items[0].label, /default:3 -1\.5 @L15/);
});

test("parseStrength", () => {
  assert.equal(parseStrength(" 4 "), 4);
  assert.equal(parseStrength("-2,5"), -2.5);
  assert.equal(typeof parseStrength(""), "string");
  assert.equal(typeof parseStrength("abc"), "string");
  assert.equal(typeof parseStrength("0"), "string");
  assert.equal(typeof parseStrength("1e9"), "string");
  assert.equal(typeof parseStrength("25"), "string"); // the server refuses |strength| > 20
  assert.equal(parseStrength("-20"), -20);
  assert.equal(parseStrength(DEFAULT_STRENGTH), 1); // the prompt offers the calibrated push (it offered 4)
});

test("LatestOnly discards answers to older searches", () => {
  const l = new LatestOnly();
  const a = l.next();
  const b = l.next();
  assert.equal(l.isLatest(a), false);
  assert.equal(l.isLatest(b), true);
});

test("compare document holds both texts, fenced safely", () => {
  const doc = compareDocument(
    { steered: "Thus we proceed ```formally```.", unsteered: "So we go on." },
    [{ feature: "default:12", strength: 4 }],
    "The plan was simple.",
  );
  assert.match(doc, /Steering: default:12 \+4/);
  assert.match(doc, /## Steered\n\n````text\nThus we proceed ```formally```\.\n````/);
  assert.match(doc, /## Unsteered\n\n```text\nSo we go on\.\n```/);
  assert.match(doc, /The plan was simple\./);
  assert.doesNotMatch(doc, /identical/);
  assert.match(compareDocument({ steered: "x", unsteered: "x" }, [], ""), /identical/);
});

test("issue 12.6: a restarted server gets the steering that was in effect", () => {
  const before = [
    { feature: "default:12", strength: 4, mode: "add", layer: 15 },
    { feature: "default:7", strength: -2, mode: "clamp", layer: 15 },
  ];
  assert.deepEqual(steeringToRestore(before, []), before, "an empty new server gets both back");
  assert.equal(steeringToRestore(before, before.map((e) => ({ ...e }))), undefined, "same list: nothing to do");
  assert.deepEqual(steeringToRestore(before, [before[0]]), before);
  assert.deepEqual(steeringToRestore([], [before[0]]), [], "cleared before the restart: clear the config's");
});
