"""Feature search, labels and example-based ranking, on a tiny random Llama + tiny random SAE.

The tiny model uses the real SmolLM2 tokenizer, so snippets and promoted tokens are real strings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_sae import make_sae

from tinymorph.steering.features import FeatureIndex, rank_by_examples, search_features, show_feature
from tinymorph.steering.labels import (
    compute_labels,
    make_label,
    readable_labels,
    save_labels,
    snippet,
    steered_tokens,
)
from tinymorph.steering.library import FeatureLibrary
from tinymorph.steering.sae import load_sae
from tinymorph.steering.steering import SteeringError
from tinymorph.steering.vectors import (
    VectorError,
    load_vector,
    read_examples,
    save_vector,
    vector_from_examples,
)

D = 16


@pytest.fixture(scope="module")
def tokenizer():
    from tinymorph.steering.model import load_tokenizer, local_folder

    return load_tokenizer(local_folder("default"))


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=D, intermediate_size=32, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


LABELS = {
    "sae": "t", "layer": 2, "n_tokens": 100, "max_act": [1.0, 2.0, 3.0],
    "features": [
        {"id": 0, "label": "on 'ocean' → sea, waves", "max_act": 1.0, "density": 0.01,
         "top_act_tokens": [" ocean", " sea"], "top_tokens": [" waves", " tide"],
         "contexts": [{"text": "we sailed across the «ocean» at dawn", "act": 1.0}]},
        {"id": 1, "label": "on 'def' → python code", "max_act": 2.0, "density": 0.02,
         "top_act_tokens": [" def", " return"], "top_tokens": [" self", "("],
         "contexts": [{"text": "class Foo:⏎    «def» bar(self)", "act": 2.0}]},
        {"id": 2, "label": "on 'the' → ocean", "max_act": 3.0, "density": 0.3,
         "top_act_tokens": [" the"], "top_tokens": [" ocean"],
         "contexts": [{"text": "walked along «the» ocean shore", "act": 3.0}]},
    ],
}


def test_bm25_prefers_the_token_a_feature_fires_on() -> None:
    index = FeatureIndex({"t": LABELS})
    hits = index.search("ocean")
    assert [h[0] for h in hits][:2] == ["t:0", "t:2"]
    assert index.search("python def")[0][0] == "t:1"
    assert index.search("zebra") == []
    assert index.search("   ") == []


def test_labels_end_to_end(tmp_path: Path, tokenizer, tiny_model) -> None:
    folder = make_sae(tmp_path / "tiny", hook="model.layers.1")
    sae = load_sae(folder)
    texts = ["The ocean was calm and the waves were small.", "def add(a, b):\n    return a + b\n",
             "She walked along the shore at dawn, listening to the sea."] * 4
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    rows = [[tokenizer.bos_token_id, *ids[:15]] for ids in encoded]
    rows = [r + [tokenizer.eos_token_id] * (16 - len(r)) for r in rows]
    labels = compute_labels(sae, tiny_model, tokenizer, rows, batch_size=4)
    assert labels["n_tokens"] == len(rows) * 15
    assert len(labels["features"]) == sae.d_sae == len(labels["max_act"])
    live = [f for f in labels["features"] if f["max_act"] > 0]
    assert live, "a random SAE on random activations still fires"
    f = live[0]
    assert 0 < f["density"] <= 1 and len(f["top_tokens"]) == 10 and f["contexts"]
    assert all("«" in c["text"] and "»" in c["text"] for c in f["contexts"])
    acts = [c["act"] for c in f["contexts"]]
    assert acts == sorted(acts, reverse=True) and acts[0] == pytest.approx(f["max_act"], rel=1e-3)
    save_labels(labels, folder)
    # max activations now come from the labels, and search/show work through a library
    sae2 = load_sae(folder)
    assert sae2.has_stats and sae2.max_activation(f["id"]) == pytest.approx(f["max_act"], rel=1e-3)
    lib = FeatureLibrary({"tiny": str(folder)})
    query = f["label"].split(" (")[0]  # its phrase: the shipped SAE is searched too (8192 features)
    found = search_features(lib, query, limit=50)
    assert any(r["id"] == f"tiny:{f['id']}" for r in found), (query, f["label"], found[:3])
    less = search_features(lib, f"less {query}", limit=50)  # "less X": X's features, offered turned down
    assert [r["id"] for r in less] == [r["id"] for r in found]
    assert {r["suggestedStrength"] for r in found} == {1.0} and {r["suggestedStrength"] for r in less} == {-1.0}
    shown = show_feature(lib, f"tiny:{f['id']}")
    assert shown["label"] == f["label"] and shown["layer"] == 1 and shown["labelled"]
    with pytest.raises(SteeringError, match="features 0..31"):
        show_feature(lib, "tiny:32")
    json.dumps(shown)  # protocol results must be JSON


def test_a_phrase_leads_with_words_that_recur_over_the_contexts() -> None:
    """One context's odd name must not head a phrase, and a context read twice counts once."""
    odd = "Follow us at @S«helter»Deals for more"
    feature = {"max_act": 5.0, "density": 0.01, "contexts": [
        {"text": odd}, {"text": odd}, {"text": odd}, {"text": "she trimmed the roses in her «garden» before"},
        {"text": "weeds grew all over the «garden» path"}]}
    others = [{"max_act": 5.0, "density": 0.01, "contexts": [{"text": f"word{i} «thing» here"}]} for i in range(20)]
    phrase = readable_labels([feature, *others])[0]["phrase"]
    assert phrase.split(", ")[0] == "garden", phrase


def test_a_phrase_leads_with_the_words_a_feature_fires_on_most() -> None:
    """Rare words in a few contexts must not name a feature that fires on 'space' and 'place'."""
    feature = {"max_act": 5.0, "density": 0.05, "n_top": 200,
               "top_words": [["time", 45], ["space", 40], ["place", 30], ["manduca", 2]],
               "contexts": [{"text": f"genus «manduca» columba {i}"} for i in range(4)]}
    others = [{"max_act": 5.0, "density": 0.01, "n_top": 200, "top_words": [["time", 50], [f"w{i}", 50]],
               "contexts": [{"text": f"word{i} «thing» here"}]} for i in range(20)]
    phrase = readable_labels([feature, *others])[0]["phrase"].split(", ")
    assert phrase == ["space", "place", "time"], phrase  # "time" is what every feature fires on


def test_steered_tokens_are_what_the_remaining_layers_make_of_a_direction(tokenizer, tiny_model) -> None:
    """A direction added after the last layer that points at a token's unembedding row (through the
    final norm) makes that token the likeliest riser, and its opposite the likeliest faller."""
    last = tiny_model.config.num_hidden_layers - 1
    target = tokenizer(" ocean", add_special_tokens=False)["input_ids"][0]
    row = tiny_model.lm_head.weight[target].detach().float() / tiny_model.model.norm.weight.detach().float()
    unit = row / row.norm()
    up, down = steered_tokens(tiny_model, tokenizer, last, torch.stack([unit, -unit]), push=50.0, n=3)
    ocean = tokenizer.decode([target])
    assert up[0][0] == ocean and down[1][0] == ocean, (up, down)


def test_word_scores_read_the_share_of_activations_on_the_query_words() -> None:
    from tinymorph.steering.features import WORD_SHARE_FULL, word_scores

    feats = [{"n_top": 200, "top_words": [["insects", 30], ["insect", 20], ["beetle", 10]]},
             {"n_top": 200, "top_words": [["foul", 80], ["parasitic", 10]]},
             {"n_top": 200, "top_words": [["warm", 100]]},  # not "war"
             {}]  # labels from before top words existed
    assert word_scores(feats, "insects").tolist() == [1.0, 0.0, 0.0, 0.0]  # 50/200 of any form: full
    assert word_scores(feats, "beetles").tolist()[0] == pytest.approx(10 / 200 / WORD_SHARE_FULL)
    assert word_scores(feats, "war").tolist() == [0.0] * 4
    assert word_scores(feats, "about the war").tolist() == [0.0] * 4


def test_snippet_and_label_format(tokenizer) -> None:
    text_ids = tokenizer("The cat sat on the mat.", add_special_tokens=False)["input_ids"]
    ids = [tokenizer.bos_token_id, *text_ids]
    s = snippet(tokenizer, ids, 2)
    assert "«" in s and s.startswith("The")
    assert make_label([" cat", " dog"], [" purr", " meow"]) == "on 'cat', 'dog' → 'purr', 'meow'"


def test_from_examples_and_vectors(tmp_path: Path, tokenizer, tiny_model) -> None:
    folder = make_sae(tmp_path / "tiny", hook="model.layers.1")
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("The ocean roared.\n\nWaves broke on the sea wall.\n")
    neg.write_text("def f(x):\n    return x\n\nimport os\nprint(os.getcwd())\n")
    positive, negative = read_examples(pos), read_examples(neg)
    assert len(positive) == 2 and len(negative) == 2
    lib = FeatureLibrary({"tiny": str(folder)})
    ranked = rank_by_examples(lib, "tiny", tiny_model, tokenizer, positive, negative, limit=5)
    diffs = [r["diff"] for r in ranked]
    assert diffs == sorted(diffs, reverse=True) and diffs[0] > 0
    vec = vector_from_examples("sea", tiny_model, tokenizer, positive, negative, layer=1)
    assert vec.scale > 0 and torch.allclose(vec.direction.norm(), torch.tensor(1.0), atol=1e-5)
    save_vector(vec, tmp_path / "vectors")
    again = load_vector("sea", tmp_path / "vectors")
    assert again.layer == 1 and torch.allclose(again.direction, vec.direction)
    with pytest.raises(VectorError, match="unknown vector"):
        load_vector("nope", tmp_path / "vectors")
    with pytest.raises(VectorError, match="bad vector name"):
        vector_from_examples("../evil", tiny_model, tokenizer, positive, negative, layer=1)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(VectorError, match="no text"):
        read_examples(tmp_path / "empty.txt")
    with pytest.raises(VectorError, match="does not exist"):
        read_examples(tmp_path / "missing.txt")


def test_a_group_reads_the_query_if_any_member_does() -> None:
    """`readsQuery` of a group: true if a member fires on the query's words, false only when every
    member is known not to (labels without top words leave it unknown: no false warning)."""
    from tinymorph.steering.features import _any_reads, feature_group

    def hit(i: int, reads: bool | None) -> dict:
        return {"id": f"default:{i}", "score": 1.0, "readsQuery": reads}

    assert feature_group([hit(1, False), hit(2, True)])["readsQuery"] is True
    assert feature_group([hit(1, False), hit(2, False)])["readsQuery"] is False
    assert _any_reads([hit(1, False), hit(2, None)]) is None


def test_a_group_label_counts_its_broad_members() -> None:
    """Dense members fire on noise from all over the corpus: the label counts them instead of naming
    them, unless one leads the group (what the group is about)."""
    from tinymorph.steering.features import group_label

    def hit(phrase: str, density: float) -> dict:
        return {"id": f"default:{len(phrase)}", "phrase": phrase, "density": density}

    members = [hit("children, child, baby", 0.02), hit("linux, computer, yoga", 0.29),
               hit("child, children, child's", 0.0003), hit("lords, sirs, griefs", 0.22)]
    assert group_label(members) == ("together: children, child, baby; child, children, child's; "
                                    "+ 2 broad features (on 22-29 % of tokens)")
    assert group_label(members[1:3]) == "together: linux, computer, yoga; child, children, child's"
    assert group_label(members[:2]) == "together: children, child, baby; + 1 broad feature (on 29 % of tokens)"
    searched = [dict(members[0], word=0.3), dict(members[2], word=1.0)]  # search knows what reads the query
    assert group_label(searched) == "together: child, children, child's; children, child, baby"
