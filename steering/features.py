"""Finding features to steer: text search over labels, and ranking by contrasting examples.

Why BM25 over evidence fields rather than embeddings: no embedding model is available offline and
the labels are short token lists; weighting the token a feature fires on above the tokens it
promotes above its contexts ranks "a feature about X" before "a feature that happens to appear
near X".
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .labels import load_labels
from .library import FeatureLibrary
from .steering import SteeringError, parse_feature_ref
from .vectors import encode_texts, layer_activations

FIELD_WEIGHTS = {"top_act_tokens": 3.0, "top_tokens": 2.0, "contexts": 1.0}
WORD_RE = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return WORD_RE.findall(text.lower())


@dataclass
class _Doc:
    ref: str
    info: dict
    fields: dict[str, Counter]  # field name -> term counts
    lengths: dict[str, int]


class FeatureIndex:
    """Per-field BM25 (summed with `FIELD_WEIGHTS`) over one or more SAEs' labels."""

    def __init__(self, labels_by_sae: dict[str, dict], k1: float = 1.2, b: float = 0.5):
        self.k1, self.b = k1, b
        self.docs: list[_Doc] = []
        for sae_name, labels in labels_by_sae.items():
            for feat in labels.get("features", []):
                fields: dict[str, Counter] = {}
                for fld in FIELD_WEIGHTS:
                    value = feat.get(fld) or []
                    texts = [c["text"] if isinstance(c, dict) else str(c) for c in value]
                    if fld == "contexts":  # only the marked token and its close neighbours matter
                        texts = [_near_mark(t) for t in texts]
                    fields[fld] = Counter(w for t in texts for w in words(t))
                if any(fields.values()):
                    lengths = {f: sum(c.values()) for f, c in fields.items()}
                    self.docs.append(_Doc(f"{sae_name}:{feat['id']}", feat, fields, lengths))
        n = len(self.docs)
        df: Counter = Counter()
        for d in self.docs:
            df.update(set().union(*(c.keys() for c in d.fields.values())))
        self.idf = {t: math.log(1 + (n - c + 0.5) / (c + 0.5)) for t, c in df.items()}
        self.avg = {f: (sum(d.lengths[f] for d in self.docs) / n if n else 1.0) or 1.0 for f in FIELD_WEIGHTS}

    def search(self, query: str, limit: int = 10) -> list[tuple[str, float, dict]]:
        """(feature id, score, label info) best first; empty when nothing matches."""
        q = words(query)
        if not q:
            return []
        scored = []
        for d in self.docs:
            s = 0.0
            for t in q:
                for fld, weight in FIELD_WEIGHTS.items():
                    tf = d.fields[fld].get(t, 0)
                    if tf:
                        norm = tf + self.k1 * (1 - self.b + self.b * d.lengths[fld] / self.avg[fld])
                        s += weight * self.idf[t] * tf * (self.k1 + 1) / norm
            if s > 0:
                # mild prior for features that fire often enough to have been labelled well
                s *= 1.0 + 0.05 * max(0.0, min(math.log10(1e-9 + d.info.get("density", 0.0) * 1e6), 4))
                if not d.info.get("max_act", 1.0):  # never fired while labelling: weaker evidence
                    s *= 0.5
                scored.append((d.ref, s, d.info))
        scored.sort(key=lambda x: -x[1])
        return scored[:limit]


def _near_mark(text: str) -> str:
    i = text.find("«")
    return text[max(0, i - 20) : i + 30] if i >= 0 else text


def library_labels(library: FeatureLibrary, names: Sequence[str] | None = None) -> dict[str, dict]:
    """Labels of the library's SAEs that have them (loading each SAE only to find its folder)."""
    out = {}
    for name in names or library.sae_names:
        try:
            sae = library.sae(name)
        except SteeringError:
            if names:  # asked for by name: say why it cannot be searched
                raise
            continue  # searching everything: an unavailable SAE just has no results
        labels = load_labels(sae.path) if sae.path is not None else None
        if labels:
            out[name] = labels
    return out


def search_features(library: FeatureLibrary, query: str, limit: int = 10, model=None) -> list[dict]:
    """Protocol shape (`tinymorph.features.search`): id, label, topTokens, maxActivation, score."""
    index = FeatureIndex(library_labels(library))
    return [
        {"id": ref, "label": info.get("label", ""), "topTokens": info.get("top_tokens", [])[:8],
         "maxActivation": info.get("max_act", 0.0), "score": round(score, 3)}
        for ref, score, info in index.search(query, limit)
    ]


def show_feature(library: FeatureLibrary, ref: str) -> dict:
    """Everything known about one feature or vector (`tinymorph.features.show`)."""
    source, key = parse_feature_ref(ref)
    if source == "vector":
        vec = library.vector(key)
        return {"id": ref, "kind": "vector", "layer": vec.layer, "scale": vec.scale, **vec.meta}
    sae = library.sae(source)
    index = int(key)
    if not 0 <= index < sae.d_sae:
        raise SteeringError(f"unknown feature {ref!r}: SAE {source!r} has features 0..{sae.d_sae - 1}")
    labels = load_labels(sae.path) if sae.path is not None else None
    info = dict(labels["features"][index]) if labels else {}
    info.pop("id", None)
    return {"id": ref, "kind": "sae", "sae": source, "layer": sae.layer, "index": index,
            "maxActivation": sae.max_activation(index), "labelled": labels is not None, **info}


@torch.no_grad()
def mean_feature_activations(sae, model, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Mean SAE magnitude of every feature over all non-BOS tokens of `texts` → [d_sae]."""
    total = torch.zeros(sae.d_sae)
    count = 0
    for ids in encode_texts(tokenizer, texts):
        acts = layer_activations(model, ids, sae.layer)[1:]
        total += sae.encode(acts).sum(0)
        count += acts.shape[0]
    if count == 0:
        raise SteeringError("the examples contain no tokens")
    return total / count


def rank_by_examples(library: FeatureLibrary, sae_name: str, model, tokenizer, positive: Sequence[str],
                     negative: Sequence[str], limit: int = 10) -> list[dict]:
    """Features whose mean activation is highest on `positive` relative to `negative`."""
    sae = library.sae(sae_name)
    pos = mean_feature_activations(sae, model, tokenizer, positive)
    neg = mean_feature_activations(sae, model, tokenizer, negative)
    diff = pos - neg
    labels = load_labels(sae.path) if sae.path is not None else None
    out = []
    for i in diff.topk(min(limit, sae.d_sae)).indices.tolist():
        info = labels["features"][i] if labels else {}
        out.append({"id": f"{sae_name}:{i}", "diff": round(float(diff[i]), 4),
                    "positive": round(float(pos[i]), 4),
                    "negative": round(float(neg[i]), 4), "label": info.get("label", ""),
                    "topTokens": info.get("top_tokens", [])[:8]})
    return out
