"""Finding features to steer: text search over labels, and ranking by contrasting examples.

Why BM25 over evidence fields rather than embeddings: no embedding model is available offline and
the labels are short token lists; weighting the token a feature fires on above the tokens it
promotes above its contexts ranks "a feature about X" before "a feature that happens to appear
near X".
"""

from __future__ import annotations

import math
import re
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .concepts import NEUTRAL_CONTEXTS, split_sign
from .labels import fired_word_shares, load_labels
from .library import FALLBACK_NORM, FeatureLibrary
from .steering import MAX_GROUP, SteeringError, parse_feature_ref
from .vectors import drop_sinks, encode_texts, layer_activations

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


_INDEX: dict[tuple, tuple[list[dict], FeatureIndex]] = {}


def feature_index(labels_by_sae: dict[str, dict]) -> FeatureIndex:
    """The BM25 index of these labels, built once per set of loaded label files (`load_labels` hands
    out the same dicts until a file changes; indexing 8192 features took ~0.9 s of every search)."""
    key = tuple((name, id(labels)) for name, labels in labels_by_sae.items())
    if key not in _INDEX:
        _INDEX.clear()  # one live set; the entry holds its labels, so their ids cannot be reused
        _INDEX[key] = (list(labels_by_sae.values()), FeatureIndex(labels_by_sae))
    return _INDEX[key][1]


QUERY_TEMPLATES = ("{q}", "I want to write about {q}.", "This is a story about {q}.", "Let me tell you about {q}:")
NEUTRAL_WORD = "something"
WEIGHTS = {"activation": 1.0, "output": 0.3, "label": 0.5, "word": 1.0}  # measured: firing on the query ranks best
WORD_SHARE_FULL = 0.25  # a feature whose strongest activations are this share on the query's words names it
# The best candidates by those signals are re-ranked by what steering them does (`effect_scores`):
# of features that fire on the query, the one that also makes the model write about it. Measured on
# the eval's 24 concepts with the previous shipped SAE (top-1 at 0.25 of the residual norm, 6 prompts,
# 40 tokens): 26 % of continuations on the concept at 1.30x perplexity before, 43 % at 1.38x after.
EFFECT_WEIGHT = 1.0  # relative to the other signals' sum normalised to 1 (3.0 measured the same)
EFFECT_CANDIDATES = 12  # how many of the best candidates are steered to measure their effect
# Search's first answer steers its best features together ("default:12+40+7"): a concept is split over a
# few features (the word, the topic, what comes next), and their summed direction turns a text to the
# concept more often at the same fluency than the best one alone (`steer eval --quick`, strength 1: the
# best feature 35 % at 1.31x unsteered perplexity, the best 4 together 50 % at 1.42x; held-out concepts
# 17 % -> 25 % at 1.30x). At the same push 3 together hit 42-45 %, 6 45 %, 8 35 %; leaving out dense
# members (> 3 % or > 10 % of tokens) or weighting members by score hit less.
GROUP_SIZE = 4
# With the engine's model, the group is fitted to what a prompt does: over the best `GROUP_CANDIDATES`
# (of the first hit's SAE), non-negative weights such that a push along their weighted sum makes
# neutral plain text continue as it does with "The following text is about <query>." in front, the
# query's own words asked for a little more (`distill.fit_weights`: the KL divergence the described
# concepts are distilled with, plus `distill.WORD_BONUS` on the words; 8 Adam steps over 16
# sentences); members are the best hit and those with at least `MIN_WEIGHT_SHARE` of the largest
# weight (at most `MAX_GROUP`), and each pushes by its weight. Measured with `steer eval` (12 prompts,
# strength 1), held-out / main set: the previous rule (the best 8 whose direction points down the
# gradient of that divergence, equal weights, no `library.WRITTEN_SHARE`) 38 % at 1.49x / 48 % at
# 1.44x; fitted over the best 8, with the written share: 49 % at 1.49x / 51 % at 1.47x (a third set of
# 20 concepts neither has: 29 % at 1.43x); with the words asked for: 48 % at 1.46x / 56 % at 1.47x
# (third set: 34 % at 1.46x; a rerun with the words as `_query_tokens` reads them: 45 % at 1.49x /
# 59 % at 1.46x / 35 % at 1.45x, the noise of one run). Over 12 candidates: 45 % at 1.45x; over 16:
# 43 % at 1.45x / 51 % at 1.42x. Leaving out dense candidates (> 5 % of tokens: they get large
# weights, e.g. `linux, computer, yoga`) fell to 35 %: they carry the push that turns any text to "a
# text about something". Without the engine's model: the best `GROUP_SIZE`, equal.
GROUP_CANDIDATES = 8
MIN_WEIGHT_SHARE = 0.1
FIT_PUSH = 0.35  # the push the weights are fitted at, of the residual norm: where strength 1 lands (0.24-0.43)
FITS_KEPT = 64  # the last queries' fitted weights (~3 s each on 2 cores), by model, layer, description and candidates
_FITS: dict[tuple, tuple[weakref.ref, torch.Tensor]] = {}
_FITS_LOCK = threading.Lock()
EFFECT_POSITIONS = 4  # next-token distributions read at the last this many positions of each context


@dataclass
class _Unembed:
    """What the model says when a direction is added: the final norm weight, the unembedding, and
    the mean/covariance of its rows (so a direction's logit z-scores over the vocabulary are cheap)."""

    norm_w: torch.Tensor
    rows: Callable[[torch.Tensor], torch.Tensor]  # token ids -> unembedding rows [n, d]
    mean: torch.Tensor  # [d]
    cov: torch.Tensor  # [d, d]
    neighbours: Callable[[list[int], int], list[int]]


_UNEMBED: dict[int, _Unembed] = {}


def _unembed(model) -> _Unembed:
    """Cached per model: works for the engine's `LlamaModel` (int8 or not) and a transformers model."""
    key = id(model)
    if key not in _UNEMBED:
        head = model.lm_head
        if hasattr(head, "scales"):  # int8 rows + per-row scales
            full = head.weight.float() * head.scales.float()[:, None]
        else:
            full = head.weight.detach().float()
        norm = getattr(model, "norm", None) or model.model.norm
        unit = full / full.norm(dim=-1, keepdim=True).clamp_min(1e-6)

        def neighbours(ids: list[int], k: int) -> list[int]:
            sims = unit[ids] @ unit.T
            return sims.topk(k, dim=-1).indices.flatten().tolist()

        mean = full.mean(0)
        centered = full - mean
        _UNEMBED[key] = _Unembed(norm.weight.detach().float(), lambda ids: full[ids], mean,
                                 centered.T @ centered / full.shape[0], neighbours)
    return _UNEMBED[key]


def _pieces(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _query_tokens(tokenizer, query: str) -> list[int]:
    """The token of each content word of the query as the model writes it — ' word', 'word' (after a
    line break or a quote), ' Word' — each form only where it is one whole token: a form the
    vocabulary splits begins with a fragment that other words share ('d' of 'dance', ' par' of
    'paris', 'b' of 'basketball'), and asking for it or scoring features by it asks for those words.
    A word with no single-token form gives the first piece of ' word' (' sarc' of ' sarcasm')."""
    out: list[int] = []
    for w in words(query):
        if w in _STOP and len(words(query)) > 1:
            continue
        forms = [_pieces(tokenizer, form) for form in (f" {w}", w, f" {w.capitalize()}")]
        whole = [ids[0] for ids in forms if len(ids) == 1] or [ids[0] for ids in forms[:1] if ids]
        out += [i for i in whole if i not in out]
    return out


def as_the_model_knows(tokenizer, query: str) -> str:
    """`query` with each word in the case the model's vocabulary knows it in: "paris" reads as the
    pieces ' par' + 'is' (and search then found `par, parolles, parley`), "Paris" as one token; a
    word is capitalized only where its lower-case form is split and its capitalized one is not."""
    def known(m: re.Match) -> str:
        w = m.group(0)
        if len(_pieces(tokenizer, f" {w}")) > 1 and len(_pieces(tokenizer, f" {w.capitalize()}")) == 1:
            return w.capitalize()
        return w
    return re.sub(r"[A-Za-z]+", known, query)


def _related_tokens(model, tokenizer, query: str) -> tuple[list[int], list[int]]:
    """(the query's word tokens, those and their nearest tokens in the unembedding): what a feature
    about the query should make the model say."""
    ids = _query_tokens(tokenizer, query)
    return ids, (list(dict.fromkeys(ids + _unembed(model).neighbours(ids, 6))) if ids else [])


_STOP = frozenset("a an the of and or to in on about with for more less very some".split())


def output_scores(sae, model, tokenizer, query: str) -> torch.Tensor | None:
    """How strongly each feature's direction promotes the query's words and their nearest tokens
    (mean z-score of their logits among all tokens) → [d_sae]."""
    ids, related = _related_tokens(model, tokenizer, query)
    if not ids:
        return None
    ue = _unembed(model)
    dirs = sae.directions * ue.norm_w  # [F, d]: what the final norm does to an added direction
    logits = dirs @ ue.rows(torch.tensor(related)).T  # [F, R]
    mu = dirs @ ue.mean
    sd = ((dirs @ ue.cov) * dirs).sum(-1).clamp_min(1e-9).sqrt()
    z = (logits - mu[:, None]) / sd[:, None]
    weights = torch.tensor([2.0 if t in ids else 1.0 for t in related])
    return (z * weights).sum(-1) / weights.sum()


@torch.no_grad()
def activation_scores(sae, model, tokenizer, query: str) -> torch.Tensor:
    """How much more each feature fires when the query is read (in a few short sentences) than when
    a neutral word stands in its place, relative to the feature's max activation → [d_sae]."""
    def mean_code(word: str) -> torch.Tensor:
        texts = [t.format(q=word) for t in QUERY_TEMPLATES]
        total = torch.zeros(sae.d_sae)
        for ids in encode_texts(tokenizer, texts):
            acts = drop_sinks(layer_activations(model, ids, sae.layer)[1:])
            total += sae.encode(acts).max(0).values
        return total / len(texts)

    return (mean_code(query) - mean_code(NEUTRAL_WORD)) / sae.max_act.clamp_min(1e-6)


@torch.inference_mode()
def effect_scores(sae, engine, query: str, candidates: Sequence[int]) -> torch.Tensor | None:
    """What steering each candidate feature does for the query: the change in log-probability the
    model gives the query's words (and their nearest tokens) at the end of a few neutral prose
    openings, with the feature added at every position at the default push (`ADD_FRACTION` of the
    residual norm) → [len(candidates)]. None without the engine's own model (a transformers model
    has no batched steering here) or without query tokens.

    Why: firing on the query says a feature *reads* the concept; steering needs one that also makes
    the model *write* it (the "output score" of Arad et al., measured through the remaining layers
    instead of the logit lens at the SAE's layer)."""
    from .batch import BatchRunner, plan_with_rows
    from .calibration import CALIBRATION_PROMPTS
    from .library import ADD_FRACTION, FALLBACK_NORM

    model, hooks = getattr(engine, "model", None), getattr(engine, "hooks", None)
    if hooks is None or not hasattr(model, "new_cache") or not candidates:
        return None
    ids, related = _related_tokens(model, engine.tokenizer, query)
    if not ids:
        return None
    contexts = [engine.tokenize(p) for p in CALIBRATION_PROMPTS[:4]]
    push = ADD_FRACTION * float(sae.resid_norm or FALLBACK_NORM)
    rows, adds = [], []
    for c in [None, *candidates]:
        rows += contexts
        adds += [None if c is None else push * sae.direction(c).float()] * len(contexts)
    runner = BatchRunner(model, hooks, getattr(engine, "special_ids", ()))
    x, _ = runner.hidden(rows, plan_with_rows(sae.layer, adds, model.cfg.dim))
    logp = torch.log_softmax(model.lm_head(model.norm(x[:, -EFFECT_POSITIONS:])).float(), -1)
    mass = logp[..., related].logsumexp(-1).view(len(candidates) + 1, -1).mean(-1)  # log P(a related token)
    return mass[1:] - mass[0]


def _stem(word: str) -> str:
    w = word.lower().removesuffix("'s")
    for suffix, repl in (("ies", "y"), ("ing", ""), ("es", ""), ("ed", ""), ("s", "")):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            return w[: len(w) - len(suffix)] + repl
    return w


def _same_word(a: str, b: str) -> bool:
    """'insects' ~ 'insect', 'painting' ~ 'paint', 'musical' ~ 'music'; 'war' !~ 'warm'."""
    a, b = _stem(a), _stem(b)
    short, long_ = sorted((a, b), key=len)
    return a == b or (len(short) >= 5 and long_.startswith(short))


def word_scores(features: Sequence[dict], query: str) -> torch.Tensor:
    """Per feature, the share of its strongest activations that fell on the query's words (any
    form), saturating at `WORD_SHARE_FULL` → [n] in 0..1. Why: a feature that fires mostly on
    "coffee" is a coffee feature, however the model's other signals rank a broader one."""
    q = [w for w in words(query) if w not in _STOP] or words(query)
    out = torch.zeros(len(features))
    for i, f in enumerate(features):
        share = sum(x for w, x in fired_word_shares(f).items() if any(_same_word(w, t) for t in q))
        out[i] = min(1.0, share / WORD_SHARE_FULL)
    return out


def _normalized(x: torch.Tensor) -> torch.Tensor:
    top = float(x.max()) if x.numel() else 0.0
    return x.clamp_min(0) / top if top > 0 else torch.zeros_like(x)


def search_features(library: FeatureLibrary, query: str, limit: int = 10, model=None,
                    superseded: Callable[[], bool] = lambda: False) -> list[dict]:
    """Protocol shape (`tinymorph.features.search`): id, label, topTokens, maxActivation, score.

    With a model (an `Engine`, or anything with `.model` and `.tokenizer`) features are ranked by
    three signals: what adding the feature makes the model say (its output effect on the query's
    words and their neighbours), how much it fires when the query is read, and its label's words;
    with the engine's own model the best few are then re-ranked by what steering them does
    (`effect_scores`). Without a model, by label words alone. Last, a feature gains up to
    `WEIGHTS["word"]` for firing mostly on the query's own words (`word_scores`), times its
    normalised steering effect where that was measured: a feature that reads "war" but, steered,
    writes no war (measured: 0 of 6 continuations) must not win on its label. Dead and positional
    features never appear. The first answer is the best `GROUP_SIZE` features as one group
    (`feature_group`), then the features one by one. `readsQuery` says whether a feature (a
    group: any member) fires on the query's own words (None for labels without their top words):
    where none does, the SAE likely has no feature for the concept ("dinosaurs" in the shipped one)
    and what search offers is only its nearest neighbours. A query that starts with a sign word
    ("less hedging", "fewer adjectives", "more formal") is searched without it, and every result
    carries the strength that steers it that way (`suggestedStrength`: -1 for "less", else 1): the
    features are those of "hedging", and "less" is the sign of the push, as it is for a description.
    `superseded` is asked between stages and fit steps: once it says a newer search has overtaken
    this one (a picker's user typed on), the stages that steer the model (the re-ranking by effect
    and the group's fit, ~4 s on 2 cores) are skipped and the answer is what the cheaper signals rank.
    """
    query, sign = split_sign(query)
    results = _ranked_features(library, query, limit, model, superseded)
    group = None
    if not superseded():
        members, weights = _group_members(library, model, query, results, superseded)
        group = None if superseded() else feature_group(members, weights)
    hits = ([group] if group else []) + results[:limit - (group is not None)]
    for hit in hits:
        hit["suggestedStrength"] = sign
    return hits


def _ranked_features(library: FeatureLibrary, query: str, limit: int, model,
                     superseded: Callable[[], bool]) -> list[dict]:
    """`search_features`' single features, best first (at least `GROUP_CANDIDATES` of them)."""
    labels_by_sae = library_labels(library)
    index = feature_index(labels_by_sae)
    lexical = {ref: score for ref, score, _ in index.search(query, limit=400)}
    net = getattr(model, "model", None)
    tokenizer = getattr(model, "tokenizer", None)
    results = []
    top_lexical = max(lexical.values(), default=0.0) or 1.0
    d_model = getattr(getattr(model, "info", None), "d_model", None)
    for name, labels in labels_by_sae.items():
        sae = library.sae(name)
        if d_model is not None and sae.d_in != d_model:
            continue  # made for another model: nothing to offer that could be steered
        feats = labels.get("features", [])
        n = sae.d_sae
        usable = torch.tensor([sae.usable(i) and bool(feats[i].get("max_act", 0.0)) if i < len(feats) else False
                               for i in range(n)])
        lex = torch.zeros(n)
        for ref, score in lexical.items():
            src, _, idx = ref.rpartition(":")
            if src == name:
                lex[int(idx)] = score
        total = WEIGHTS["label"] * lex / top_lexical  # label scores stay comparable across SAEs
        named = word_scores(feats, query)[:n] if len(feats) >= n else torch.zeros(n)
        reads = named > 0  # fires on the query's own words (before the effect re-weighs `named`)
        knows_words = any(x.get("top_words") for x in feats)  # labels from before `top_words`: unknown
        signals: dict[str, torch.Tensor] = {"word": named}
        if net is not None and tokenizer is not None and words(query):
            try:
                out = output_scores(sae, net, tokenizer, query)
                act = activation_scores(sae, net, tokenizer, as_the_model_knows(tokenizer, query))
            except (RuntimeError, ValueError, IndexError):  # a model the SAE does not fit: labels only
                out, act = None, None
            if out is not None:
                signals["output"] = out
                total = total + WEIGHTS["output"] * _normalized(out * usable)
            if act is not None:
                signals["activation"] = act
                total = total + WEIGHTS["activation"] * _normalized(act * usable)
        named = WEIGHTS["word"] * named * usable  # added last, outside the normalisations below
        total = torch.where(usable, total, torch.zeros_like(total))
        if "activation" in signals and not superseded():  # the model is there: steer the best and re-rank
            best = [i for i in (total + named).topk(min(EFFECT_CANDIDATES, n)).indices.tolist()
                    if float(total[i] + named[i]) > 0]
            effect = effect_scores(sae, model, query, best)
            if effect is not None:
                signals["effect"] = torch.zeros(n).index_put((torch.tensor(best),), effect)
                total = total / max(float(total[best].max()), 1e-9)
                writes = torch.zeros(n).index_put((torch.tensor(best),), _normalized(effect))
                total = total + EFFECT_WEIGHT * writes
                named = named * writes  # reading the word counts as far as steering writes it too
        total = total + named
        for i in total.topk(min(max(limit, GROUP_CANDIDATES), n)).indices.tolist():
            if float(total[i]) <= 0:
                continue
            info = feats[i] if i < len(feats) else {}
            results.append({
                "id": f"{name}:{i}", "label": info.get("label", ""), "phrase": info.get("phrase", ""),
                "promotes": info.get("promotes", []), "topTokens": info.get("top_tokens", [])[:8],
                "maxActivation": info.get("max_act", 0.0), "density": info.get("density", 0.0),
                "score": round(float(total[i]), 3), "readsQuery": bool(reads[i]) if knows_words else None,
                **{k: round(float(v[i]), 3) for k, v in signals.items()},
            })
    results.sort(key=lambda r: -r["score"])
    return results


def _group_members(library: FeatureLibrary, engine, query: str, results: Sequence[dict],
                   superseded: Callable[[], bool] = lambda: False) -> tuple[list[dict], list[float] | None]:
    """The hits a group is made of and their weights: with the engine's own model those of the best
    `GROUP_CANDIDATES` (of the first hit's SAE) the fit gives weight (`prompt_weights`), in search
    order, the best hit always first (at least `MIN_WEIGHT_SHARE`: what search ranks first is in what
    its first answer steers); else the best `GROUP_SIZE`, equal (None)."""
    candidates = _of_first_sae(results)[:GROUP_CANDIDATES]
    if len(candidates) > GROUP_SIZE:
        sae = library.sae(candidates[0]["id"].rpartition(":")[0])
        weights = prompt_weights(sae, engine, query, [int(h["id"].rpartition(":")[2]) for h in candidates],
                                 getattr(library, "feature_span", 1), superseded=superseded)
        if weights is not None and max(weights) > 0:
            top = max(weights)
            weights[0] = max(weights[0], MIN_WEIGHT_SHARE * top)  # the best hit is always a member
            keep = [0, *sorted(range(1, len(weights)), key=lambda i: -weights[i])[:MAX_GROUP - 1]]
            keep = sorted(i for i in keep if weights[i] >= MIN_WEIGHT_SHARE * top)
            if len(keep) >= 2:
                return [candidates[i] for i in keep], [weights[i] / top for i in keep]
    return list(results[:GROUP_SIZE]), None


def prompt_weights(sae, engine, query: str, candidates: Sequence[int], span: int = 1,
                   word_bonus: float | None = None, superseded: Callable[[], bool] = lambda: False
                   ) -> list[float] | None:
    """Per candidate feature, the non-negative weight of its decoder direction in the push (shared
    over `span` layers from the SAE's) that makes neutral plain text read most as it does with "The
    following text is about <query>." in front, the query's own words asked for a little more
    (`distill.fit_weights`, `word_bonus` default `distill.WORD_BONUS`; 0: the feature does not help).
    None without the engine's own model, or when `superseded` stopped the fit (nothing is kept then)."""
    from .distill import WORD_BONUS, fit_weights

    word_bonus = WORD_BONUS if word_bonus is None else word_bonus

    model, tokenizer = getattr(engine, "model", None), getattr(engine, "tokenizer", None)
    if not hasattr(model, "new_cache") or tokenizer is None or not candidates:
        return None
    query = as_the_model_knows(tokenizer, " ".join(query.split()))
    description = query if query.lower().startswith("about ") else f"about {query}"
    layers = list(range(sae.layer, min(sae.layer + max(1, span), model.cfg.n_layers)))
    key = (id(model), sae.layer, len(layers), description, tuple(candidates), word_bonus)
    with _FITS_LOCK:  # a picker searches again as the writer types and deletes
        owner, weights = _FITS.pop(key, (None, None))
    if weights is None or owner() is not model:  # (an id is reused once its model is gone)
        texts = [engine.tokenize(t) for t in NEUTRAL_CONTEXTS]
        directions = torch.stack([sae.direction(i).float() for i in candidates])
        budget = FIT_PUSH * float(sae.resid_norm or FALLBACK_NORM)
        weights, _ = fit_weights(model, tokenizer, description, texts, directions, layers, budget,
                                 getattr(engine, "special_ids", ()), word_ids=_query_tokens(tokenizer, query),
                                 word_bonus=word_bonus, stop=superseded)
        if weights is None:
            return None
    with _FITS_LOCK:
        _FITS[key] = (weakref.ref(model), weights)
        while len(_FITS) > FITS_KEPT:
            del _FITS[next(iter(_FITS))]
    return [float(w) for w in weights]


BROAD_DENSITY = 0.05  # a member on more than this share of tokens is named in a group's label only by count


def group_label(members: Sequence[dict]) -> str:
    """"together: garden, yard; wild, park, nature; + 1 broad feature (on 29 % of tokens)": what each
    member of a group fires on, the one that fires most on the query's own words first where search
    knows it (`word`): the best hit can be a feature that writes the concept but fires on noise
    ("ghost": `pl, leonati, columnar`, tied on score with `ghost, ghostly, horror`), and the first
    words are what a reader takes the group to be about. Why broad members are only counted: the
    fit gives weight to a dense feature or two in most groups (they turn any text into "a text about
    something", and leaving them out cost ~14 points of hits), but what they fire on most is noise
    from all over the corpus (`linux, computer, yoga`), which reads as if the group were about that;
    `features show` lists them."""
    lead = max(range(len(members)), key=lambda i: (members[i].get("word", 0.0), -i), default=0)
    members = [members[lead], *members[:lead], *members[lead + 1:]]
    named: list[dict] = []
    broad: list[float] = []  # % of tokens each broad member fires on
    for i, m in enumerate(members):
        if i == 0 or m.get("density", 0.0) <= BROAD_DENSITY:
            named.append(m)
        else:
            broad.append(100 * m["density"])
    text = "together: " + "; ".join(m.get("phrase") or m.get("label") or m["id"] for m in named)
    if broad:
        lo, hi = round(min(broad)), round(max(broad))
        share = f"{lo}" if lo == hi else f"{lo}-{hi}"
        text += f"; + {len(broad)} broad feature{'s' if len(broad) > 1 else ''} (on {share} % of tokens)"
    return text


def _of_first_sae(hits: Sequence[dict]) -> list[dict]:
    """The hits from the first hit's SAE, in order (a group steers features of one SAE)."""
    source = hits[0]["id"].rpartition(":")[0] if hits else ""
    return [h for h in hits if h["id"].rpartition(":")[0] == source]


def feature_group(hits: Sequence[dict], weights: Sequence[float] | None = None) -> dict | None:
    """Search's first answer: its best features (of the first one's SAE) as one steerable group, each
    pushing by its weight (`"default:12+40*0.5"`; none given: equal), or None when fewer than two
    qualify. Its label lists what each member fires on."""
    members = _of_first_sae(hits)
    if len(members) < 2:
        return None
    weights = list(weights) if weights is not None and len(members) == len(hits) else [1.0] * len(members)
    source = members[0]["id"].rpartition(":")[0]
    ids = [h["id"].rpartition(":")[2] + _weight_suffix(w) for h, w in zip(members, weights, strict=True)]
    return {
        "id": f"{source}:{'+'.join(ids)}", "kind": "group", "members": [h["id"] for h in members],
        "weights": [round(w, 2) for w in weights],
        "label": group_label(members),
        "phrase": members[0].get("phrase", ""),
        "promotes": [t for h in members for t in h.get("promotes", [])[:3]],
        "topTokens": [t for h in members for t in h.get("topTokens", [])[:2]],
        "maxActivation": max(h.get("maxActivation", 0.0) for h in members),
        "density": max(h.get("density", 0.0) for h in members),
        "score": members[0]["score"], "readsQuery": _any_reads(members),
    }


def _any_reads(members: Sequence[dict]) -> bool | None:
    """A group reads the query if any member does; None when that is not known for some member."""
    reads = [m.get("readsQuery") for m in members]
    return True if True in reads else (False if all(r is False for r in reads) else None)


def _weight_suffix(weight: float) -> str:
    """"*0.42" for a member's weight (two decimals, at least 0.01), "" for 1."""
    w = max(0.01, round(weight, 2))
    return "" if w == 1 else f"*{w:g}"


def show_feature(library: FeatureLibrary, ref: str) -> dict:
    """Everything known about one feature or vector (`tinymorph.features.show`)."""
    source, key = parse_feature_ref(ref)
    if source == "concept":
        vec = library.concept(key)
        core, sign = split_sign(key)
        return {"id": ref, "kind": "concept", "description": core, "sign": sign, "layers": sorted(vec.directions),
                "addFraction": vec.add_fraction, "examples": vec.meta.get("examples", []),
                "features": concept_features(library, vec.unit_directions(), sign)}
    if source == "vector":
        vec = library.vector(key)
        return {"id": ref, "kind": "vector", "layer": vec.layer, "scale": vec.scale, **vec.meta,
                "features": concept_features(library, {vec.layer: vec.direction}, 1.0)}
    sae, indices = library.sae_features(ref)
    if len(indices) > 1:
        members = [show_feature(library, f"{source}:{i}") for i in indices]
        return {"id": ref, "kind": "group", "sae": source, "layer": sae.layer, "members": members,
                "label": group_label(members),
                "phrase": members[0].get("phrase", ""), "labelled": all(m["labelled"] for m in members)}
    index = indices[0]
    labels = load_labels(sae.path) if sae.path is not None else None
    info = dict(labels["features"][index]) if labels else {}
    info.pop("id", None)
    return {"id": ref, "kind": "sae", "sae": source, "layer": sae.layer, "index": index,
            "maxActivation": sae.max_activation(index), "labelled": labels is not None, **info}


def concept_features(library: FeatureLibrary, directions: dict[int, torch.Tensor], sign: float,
                     limit: int = 8) -> list[dict]:
    """The SAE features a direction is made of: its cosine with every usable decoder direction (the
    direction at the layer nearest each SAE's own), best first."""
    out = []
    for name, labels in library_labels(library).items():
        sae = library.sae(name)
        layer = min(directions, key=lambda layer: abs(layer - sae.layer))
        if abs(layer - sae.layer) > 3:
            continue
        cos = sae.directions @ (sign * directions[layer].float())
        usable = torch.tensor([sae.usable(i) for i in range(sae.d_sae)])
        cos = torch.where(usable, cos, torch.full_like(cos, -2.0))
        feats = labels.get("features", [])
        for i in cos.topk(min(limit, sae.d_sae)).indices.tolist():
            info = feats[i] if i < len(feats) else {}
            out.append({"id": f"{name}:{i}", "cosine": round(float(cos[i]), 3), "label": info.get("label", "")})
    out.sort(key=lambda f: -f["cosine"])
    return out[:limit]


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
