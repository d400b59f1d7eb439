"""Evidence on the real default model + shipped SAE: steering does what its labels say.

These tests load SmolLM2-135M (a few seconds once converted) and generate greedily, so they are
marked slow; they still run in CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinymorph.steering.engine import CompletionRequest, Engine
from tinymorph.steering.features import search_features, show_feature
from tinymorph.steering.generate import GenerationOptions
from tinymorph.steering.library import FeatureLibrary, default_resolver
from tinymorph.steering.sae import load_sae, validate_for_model
from tinymorph.steering.steering import SteeringEntry, SteeringPlan

pytestmark = pytest.mark.slow

PROMPTS = [
    "The old man looked out of the window and said",
    "In the morning we packed our bags and",
    "My favourite thing about the weekend is",
    "She opened the letter slowly. It said",
    "The report concludes that",
    "Once upon a time, in a small village,",
]
# Concept features of the shipped SAE, found by `tinymorph features search` (see `features show default:ID`).
# id -> (concept of the eval set, strength; 1 = half the layer's typical residual norm along the direction)
EVIDENCE_FEATURES = {
    1592: ("medicine", 1.0),  # 'medical, doctor, medicine → says patients, diagnosis, patient'
    5632: ("football", 1.0),  # 'football, sports, baseball → says opponent, opposing, opponents'
    632: ("driving", 1.0),  # 'car, vehicle, cars → says vehicle'
}
MAX_TOKENS = 16
HIT_TOKENS = 40  # concept hits are judged over the length strength 1 is calibrated over (`calibration.TOKENS`):
# an SAE feature pushes the text the model writes less than the text it reads, so its turn can come later


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> FeatureLibrary:
    from tinymorph.steering.calibration import CalibrationStore

    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("TINYMORPH_CACHE_DIR", str(cache))  # concept vectors and calibrations of this test only
    yield FeatureLibrary(calibrations=CalibrationStore(cache / "calibrations.json"))
    mp.undo()


@pytest.fixture(scope="module")
def engine(library: FeatureLibrary) -> Engine:
    eng = Engine.load("default", dtype="float32")
    eng.set_steering_resolver(default_resolver(eng, library=library))
    return eng


def complete(engine: Engine, prompt: str, plan: SteeringPlan | None = None, tokens: int = MAX_TOKENS) -> str:
    options = GenerationOptions(max_tokens=tokens, stop="none", temperature=0.0)
    return engine.complete(CompletionRequest(text=prompt, doc_id=f"t:{prompt}", options=options,
                                             steering=plan)).text


def top_token_rate(engine: Engine, texts: list[str], top_tokens: list[str]) -> float:
    """Fraction of generated tokens that are one of the feature's promoted tokens (case/space-folded)."""
    wanted = {t.strip().lower() for t in top_tokens if t.strip()}
    ids = [i for t in texts for i in engine.tokenize(t)]
    hits = sum(engine.detokenize([i]).strip().lower() in wanted for i in ids)
    return hits / max(1, len(ids))


def test_shipped_sae_matches_the_model(library: FeatureLibrary, engine: Engine) -> None:
    sae = load_sae("default")
    validate_for_model(sae, engine.info.d_model, engine.info.layers)
    assert sae.layer == 15 and sae.has_stats
    assert (sae.max_act > 0).all()


def test_strength_zero_equals_unsteered(engine: Engine) -> None:
    feature = next(iter(EVIDENCE_FEATURES))
    for prompt in PROMPTS[:3]:
        zero = SteeringPlan((SteeringEntry(f"default:{feature}", 0.0),))
        assert complete(engine, prompt, zero) == complete(engine, prompt)
    # and at the level of logits: the hooks leave the forward pass bit-identical
    ids = engine.tokenize(PROMPTS[0])
    plain = engine.model(ids, engine.model.new_cache(64))
    resolved = engine.resolve(SteeringPlan((SteeringEntry(f"default:{feature}", 0.0, "clamp"),)))
    with engine.hooks.active(resolved):
        zero = engine.model(ids, engine.model.new_cache(64))
    assert torch.equal(plain, zero)


@pytest.mark.parametrize("feature", list(EVIDENCE_FEATURES))
def test_steering_a_concept_feature_puts_the_concept_in_the_text(engine: Engine, library: FeatureLibrary,
                                                                  feature: int) -> None:
    from tinymorph.steering.steer_eval import count_hits, load_eval_set

    name, strength = EVIDENCE_FEATURES[feature]
    concept = next(c for c in load_eval_set().concepts if c.name == name)
    info = show_feature(library, f"default:{feature}")
    assert concept.pattern().search(info["phrase"]), info  # the label says what to expect
    plan = SteeringPlan((SteeringEntry(f"default:{feature}", strength),))
    plain = [complete(engine, p, tokens=HIT_TOKENS) for p in PROMPTS]
    steered = [complete(engine, p, plan, HIT_TOKENS) for p in PROMPTS]
    before = sum(count_hits(t, concept.pattern()) > 0 for t in plain)
    after = sum(count_hits(t, concept.pattern()) > 0 for t in steered)
    assert after >= before + 2, (info["label"], before, after, steered)


def test_steering_the_first_search_answer_puts_the_concept_in_the_text(engine: Engine, library: FeatureLibrary) -> None:
    """What a writer does first: search a concept and steer the first answer (the best features
    together) at strength 1, the calibrated push."""
    from tinymorph.steering.steer_eval import count_hits, load_eval_set

    concept = next(c for c in load_eval_set().concepts if c.name == "football")
    group = search_features(library, concept.query, limit=1, model=engine)[0]
    assert group["kind"] == "group" and len(group["members"]) >= 2, group
    plan = SteeringPlan((SteeringEntry(group["id"], 1.0),))
    plain = sum(count_hits(complete(engine, p, tokens=HIT_TOKENS), concept.pattern()) > 0 for p in PROMPTS)
    steered = [complete(engine, p, plan, HIT_TOKENS) for p in PROMPTS]
    assert sum(count_hits(t, concept.pattern()) > 0 for t in steered) >= plain + 2, (group["label"], steered)


def test_ablate_and_clamp_change_less_than_add(engine: Engine) -> None:
    """Sanity of the other modes on the real model: they run, and ablating is a small edit."""
    feature = next(iter(EVIDENCE_FEATURES))
    ids = engine.tokenize(PROMPTS[0])
    plain = engine.model(ids, engine.model.new_cache(64))
    outs = {}
    for mode, strength in (("ablate", 1.0), ("clamp", 2.0), ("add", 4.0)):
        resolved = engine.resolve(SteeringPlan((SteeringEntry(f"default:{feature}", strength, mode),)))
        with engine.hooks.active(resolved):
            outs[mode] = engine.model(ids, engine.model.new_cache(64))
    assert not torch.equal(outs["add"], plain)
    diff = {m: float((o.softmax(-1) - plain.softmax(-1)).abs().sum()) for m, o in outs.items()}
    assert diff["ablate"] < diff["add"]


def test_described_concept_puts_the_concept_in_the_text(engine: Engine, library: FeatureLibrary) -> None:
    """`steer add "about the sea"`: no examples, no feature ids; the continuations turn to the sea,
    the vector is cached on disk, and "less about the sea" pushes the other way."""
    plain = [complete(engine, p) for p in PROMPTS]
    plan = SteeringPlan((SteeringEntry("about the sea", 2.0),))
    steered = [complete(engine, p, plan) for p in PROMPTS]
    # the unsteered model finds the steered continuations likelier once "The following text is about
    # the sea." is written in front (the presence the calibration maximises; lexicon hit rates over
    # 24 concepts are `tinymorph steer eval`'s job: on 6 prompts x 16 tokens a count of sea words is noise)
    gain_plain = prompted_gain(engine, "about the sea", plain)
    gain_steered = prompted_gain(engine, "about the sea", steered)
    assert gain_steered > gain_plain + 0.1, (gain_steered, gain_plain, steered)
    assert steered != plain
    from tinymorph.steering.concepts import concept_path, load_concept

    path = concept_path(library.model_key, "about the sea", library.concept_layers)
    cached = load_concept(path)
    assert cached.add_fraction is not None and sorted(cached.directions) == library.concept_layers
    assert cached.meta["examples"] and cached.meta["calibration"]
    more, less = library.handles("about the sea"), library.handles("less about the sea")
    for a, b in zip(more, less, strict=True):
        assert torch.allclose(a.direction, -b.direction) and a.add_scale == b.add_scale
        assert abs(float(a.direction.norm()) - 1.0) < 1e-4  # handles carry unit directions
    info = show_feature(library, "about the sea")
    assert info["kind"] == "concept" and info["features"] and info["examples"], info


def prompted_gain(engine: Engine, description: str, texts: list[str]) -> float:
    """Mean nats per token by which the description written before each prompt makes `texts` likelier."""
    from tinymorph.steering.batch import BatchRunner
    from tinymorph.steering.distill import PROMPT_TEMPLATE

    runner = BatchRunner(engine.model, engine.hooks, engine.special_ids)
    head = engine.tokenize(PROMPT_TEMPLATE.format(description=description))
    prompts = [engine.tokenize(p) for p in PROMPTS]
    conts = [engine.tokenize(t) or [0] for t in texts]
    plain, _ = runner.score(prompts, conts)
    prompted, _ = runner.score([head + p for p in prompts], conts)
    return sum(a - b for a, b in zip(plain, prompted, strict=True)) / len(texts)


def test_distilled_vector_does_what_the_prompt_does_on_unseen_text(engine: Engine, library: FeatureLibrary) -> None:
    """The vector is trained on a few neutral sentences; on other text it still brings the plain
    model's next-token distributions closer to the prompted model's (KL(prompted ‖ steered) drops)."""
    from tinymorph.steering.distill import CAP, kl_to_prompted

    vec = library.concept("about the sea")
    texts = [engine.tokenize(p + " " + q) for p, q in zip(PROMPTS, PROMPTS[1:], strict=False)]
    plain = kl_to_prompted(engine.model, engine.tokenizer, "about the sea", texts)
    steered = kl_to_prompted(engine.model, engine.tokenizer, "about the sea", texts, vec.pushes(CAP))
    assert steered < 0.9 * plain, (steered, plain)


def test_steering_effect_tells_a_concept_feature_from_another(library: FeatureLibrary, engine: Engine) -> None:
    """Search re-ranks its best candidates by what steering them does: each evidence feature makes
    the model likelier to say its own concept's words, and more so than the other concept's feature."""
    from tinymorph.steering.features import effect_scores

    sae = library.sae("default")
    for feature, (name, _strength) in EVIDENCE_FEATURES.items():
        others = [f for f in EVIDENCE_FEATURES if f != feature]
        effect = effect_scores(sae, engine, name, [feature, *others])
        assert effect is not None and float(effect[0]) > 0, (name, effect)
        assert float(effect[0]) > float(effect[1:].max()), (name, effect)
    assert effect_scores(sae, engine, "sea", []) is None


def test_a_group_keeps_the_features_that_write_the_concept(library: FeatureLibrary, engine: Engine) -> None:
    """A search group's members share its push by weights fitted so that plain text reads as if "The
    following text is about <concept>." came first: the evidence features (which fire on their concept
    and write it) get weight; a feature that fires on "happiness" in old verse but writes none of it
    (`twas, mo, var`) gets none beside one that writes it, and the group leaves it out."""
    from tinymorph.steering.features import prompt_weights

    sae, span = library.sae("default"), library.feature_span
    for feature, (name, _strength) in EVIDENCE_FEATURES.items():
        assert prompt_weights(sae, engine, name, [feature], span)[0] > 0, name
    verse, writes = prompt_weights(sae, engine, "happiness", [1889, 4269], span)
    assert writes > 0 and verse == 0.0
    group = search_features(library, "happiness", limit=3, model=engine)[0]
    assert group["kind"] == "group" and "default:1889" not in group["members"] and "default:4269" in group["members"]
    assert group["weights"][group["members"].index("default:4269")] > 0


def test_the_fit_asks_for_the_concepts_own_word(library: FeatureLibrary, engine: Engine) -> None:
    """The fit's teacher asks for the description's own words (a 135M model told "about dance" seldom
    writes "dance"): the group's push fitted so makes the model likelier to write the word on plain text
    than the push fitted to the prompt alone."""
    from tinymorph.steering.batch import BatchRunner
    from tinymorph.steering.concepts import NEUTRAL_CONTEXTS
    from tinymorph.steering.distill import _steered_logprobs
    from tinymorph.steering.features import _query_tokens, prompt_weights

    def first(text: str) -> int:
        return engine.tokenizer(text, add_special_tokens=False)["input_ids"][0]

    ids = _query_tokens(engine.tokenizer, "about the sea")
    assert {first(" sea"), first(" Sea"), first("sea")} <= set(ids)
    assert first(" the") not in ids and first(" about") not in ids
    hits = search_features(library, "dance", limit=9, model=engine)  # the group's 8 candidates: its fit is reused
    candidates = [int(h["id"].rpartition(":")[2]) for h in hits if h.get("kind") != "group"][:8]
    sae, span = library.sae("default"), library.feature_span
    layers = list(range(sae.layer, sae.layer + span))
    directions = torch.stack([sae.direction(i).float() for i in candidates])
    runner = BatchRunner(engine.model, special_ids=engine.special_ids)
    texts = [engine.tokenize(t) for t in NEUTRAL_CONTEXTS]
    word = _query_tokens(engine.tokenizer, "dance")

    def word_mass(bonus: float | None) -> float:
        weights = torch.tensor(prompt_weights(sae, engine, "dance", candidates, span, word_bonus=bonus))
        push = (weights @ directions) / len(layers)
        with torch.no_grad():
            logp = _steered_logprobs(runner, texts, dict.fromkeys(layers, push))
        return float(logp[:, word].exp().sum(-1).mean())

    plain, asked = word_mass(0.0), word_mass(None)
    assert asked > 1.5 * plain, (plain, asked)
    less = search_features(library, "less dance", limit=9, model=engine)  # the same fit: "about dance"
    assert [h["id"] for h in less] == [h["id"] for h in hits], (less[:2], hits[:2])
    assert {h["suggestedStrength"] for h in less} == {-1.0} and {h["suggestedStrength"] for h in hits} == {1.0}


def test_search_finds_the_concept_features(library: FeatureLibrary, engine: Engine) -> None:
    """The features above are what a writer gets first when searching for their concept (by the
    eval set's query: "car" for driving)."""
    from tinymorph.steering.steer_eval import load_eval_set

    queries = {c.name: c.query for c in load_eval_set().concepts}
    for feature, (name, _strength) in EVIDENCE_FEATURES.items():
        hits = search_features(library, queries[name], limit=5, model=engine)
        assert hits and hits[1]["id"] == f"default:{feature}", (name, hits[:3])
        group = hits[0]  # the first answer: the best features steered together, the best one first
        assert group["kind"] == "group" and group["members"][0] == hits[1]["id"], group
        assert group["readsQuery"] and hits[1]["readsQuery"], group  # they fire on the query's own words
        found = {h["id"]: h for h in search_features(library, queries[name], limit=9, model=engine)[1:]}
        named = max(group["members"], key=lambda m: found[m]["word"])  # fires most on the query's words
        assert group["label"].startswith("together: " + found[named]["phrase"]), (group["label"], named)
        assert max(group["weights"]) == 1 and min(group["weights"]) > 0  # relative to the heaviest member
        assert group["id"] == "default:" + "+".join(m.rpartition(":")[2] + ("" if w == 1 else f"*{w:g}")
                                                    for m, w in zip(group["members"], group["weights"], strict=True))
        assert show_feature(library, group["id"])["members"][0]["id"] == hits[1]["id"]
    labels_only = search_features(library, "sea", limit=20)  # no model: label words alone
    assert labels_only and all(h["id"].startswith("default:") for h in labels_only)


def test_search_reads_a_word_as_the_model_knows_it(library: FeatureLibrary, engine: Engine) -> None:
    """A name typed in lower case ("paris": the pieces ' par' + 'is') is read as the one token the
    vocabulary has (' Paris'), and a word's forms the vocabulary splits ('d' + 'ance') are not asked
    for: their first piece begins other words. Before, "paris" found `par, parolles, parley` and
    features that fire on no city; now a feature that reads Paris comes first."""
    from tinymorph.steering.features import _query_tokens, as_the_model_knows

    tok = engine.tokenizer

    def pieces(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    assert len(pieces("dance")) > 1 and len(pieces(" paris")) > 1  # what the rule is about
    assert _query_tokens(tok, "dance") == [pieces(" dance")[0], pieces(" Dance")[0]]
    assert _query_tokens(tok, "paris") == pieces(" Paris")
    assert as_the_model_knows(tok, "paris and dance") == "Paris and dance"
    hits = search_features(library, "paris", limit=3, model=engine)
    assert hits[1]["readsQuery"] and "paris" in hits[1]["label"], hits[1]
    assert hits[0]["readsQuery"], hits[0]


def test_search_says_when_no_feature_reads_the_query(library: FeatureLibrary, engine: Engine, tmp_path) -> None:
    """The shipped SAE has no feature for dinosaurs: search still answers (its nearest neighbours,
    e.g. `ancient, old, past`), marks that none of them fires on the word, and the CLI says so and
    points to a description (for a concept it has, the test above sees `readsQuery` set)."""
    hits = search_features(library, "dinosaurs", limit=4, model=engine)
    assert hits and not any(h["readsQuery"] for h in hits), hits
    exe = shutil.which("tinymorph", path=str(Path(sys.executable).parent))
    out = subprocess.run([exe, "features", "search", "dinosaurs", "--limit", "2"], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path, env={**os.environ, "TINYMORPH_CONFIG_DIR": str(tmp_path)})
    assert out.returncode == 0 and 'none of these fires on "dinosaurs" itself' in out.stdout, out.stdout
    assert 'tinymorph steer add "dinosaurs"' in out.stdout


def test_an_overtaken_search_answers_from_the_cheap_signals(library: FeatureLibrary, engine: Engine,
                                                           monkeypatch) -> None:
    """A search a newer one has overtaken skips the stages that steer the model (effect re-ranking and
    the group's fit, ~4 s) but still answers: the features that fire on the word, no group."""
    import tinymorph.steering.features as features

    def slow_stage(*_a, **_k):
        raise AssertionError("an overtaken search steered the model")

    monkeypatch.setattr(features, "effect_scores", slow_stage)
    monkeypatch.setattr(features, "prompt_weights", slow_stage)
    hits = search_features(library, "lighthouse", limit=5, model=engine, superseded=lambda: True)
    assert hits and all(h.get("kind") != "group" and "activation" in h for h in hits), hits
