"""Feature labels: what each SAE feature reacts to and what it makes the model say.

Why: a user steers features by meaning, so every feature needs a searchable description. We have no
LLM to write explanations, so a label is built from evidence: the whole words a feature fires on most
(top-activating contexts, the token marked «like this») and the tokens steering it makes the model
say (the direction added on a few neutral openings, read through the remaining layers; the logit
lens — unit decoder row → final RMSNorm weight → unembedding — only where no residual norm was
measured). Per-feature max activation and density come from the same pass; max activation is also
the unit of `clamp`.

Stored as ``labels.json`` beside the SAE (see `sae.STATS_FILE`).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .files import write_atomically
from .library import ADD_FRACTION
from .sae import STATS_FILE, LoadedSAE

N_CONTEXTS = 8
N_TOKENS = 10
TOP_ACTIVATIONS = 200  # a feature's strongest activations whose tokens and whole words are counted
LEFT, RIGHT = 14, 4  # tokens of context each side of the marked token


class _Stop(Exception):
    pass


@torch.no_grad()
def batch_activations(hf_model, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Residual after decoder layer `layer` of a transformers model for a batch [B, T] → [B, T, d]."""
    captured: list[torch.Tensor] = []

    def hook(_m, _i, out):
        captured.append((out[0] if isinstance(out, tuple) else out).detach())
        raise _Stop

    handle = hf_model.model.layers[layer].register_forward_hook(hook)
    try:
        hf_model(ids)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0].float()


def unembed_parts(hf_model) -> tuple[torch.Tensor, torch.Tensor]:
    """(final norm weight [d], unembedding [vocab, d]) of a transformers causal LM, fp32."""
    return (hf_model.model.norm.weight.detach().float(), hf_model.lm_head.weight.detach().float())


@torch.no_grad()
def promoted_tokens(directions: torch.Tensor, norm_w: torch.Tensor, unembed: torch.Tensor, tokenizer,
                    n: int = N_TOKENS, chunk: int = 512) -> tuple[list[list[str]], list[list[str]]]:
    """Top promoted and suppressed tokens for each unit direction [F, d]."""
    promoted, suppressed = [], []
    for start in range(0, directions.shape[0], chunk):
        logits = (directions[start : start + chunk] * norm_w) @ unembed.T  # [f, vocab]
        top = logits.topk(n, dim=-1).indices.tolist()
        bottom = (-logits).topk(n, dim=-1).indices.tolist()
        promoted += [[tokenizer.decode([t]) for t in row] for row in top]
        suppressed += [[tokenizer.decode([t]) for t in row] for row in bottom]
    return promoted, suppressed


EFFECT_CONTEXTS = ("I think that", "The next day, we", "She told me about the", "It was a")  # neutral openings


@torch.no_grad()
def steered_tokens(hf_model, tokenizer, layer: int, directions: torch.Tensor, push: float, n: int = N_TOKENS,
                   chunk: int = 128) -> tuple[list[list[str]], list[list[str]]]:
    """Tokens whose next-token log-probability rises (falls) most when each unit direction [F, d] is
    added at `push` after decoder layer `layer`, at every position but BOS, averaged over a few neutral
    openings. Why not the logit lens alone: halfway up the model a direction's own logits say little
    ("says augusta, based" for a plant feature); this reads what the remaining layers make of it."""
    delta: dict[str, torch.Tensor | None] = {"add": None}

    def hook(_m, _i, out):
        if delta["add"] is None:
            return None
        hidden = out[0] if isinstance(out, tuple) else out
        hidden = hidden.clone()
        hidden[:, 1:] += delta["add"].to(hidden.dtype)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
    contexts = [[bos, *tokenizer(c, add_special_tokens=False)["input_ids"]] for c in EFFECT_CONTEXTS]
    handle = hf_model.model.layers[layer].register_forward_hook(hook)
    try:
        base = [torch.log_softmax(_last_logits(hf_model, torch.tensor([c]))[0].float(), -1) for c in contexts]
        change = torch.zeros(directions.shape[0], base[0].shape[0])
        for start in range(0, directions.shape[0], chunk):
            dirs = directions[start:start + chunk].float()
            delta["add"] = push * dirs[:, None, :]
            for c, b in zip(contexts, base, strict=True):
                ids = torch.tensor([c]).expand(dirs.shape[0], -1)
                change[start:start + dirs.shape[0]] += torch.log_softmax(_last_logits(hf_model, ids).float(), -1) - b
            delta["add"] = None
    finally:
        handle.remove()

    def strings(rows: list[list[int]]) -> list[list[str]]:
        return [[tokenizer.decode([t]) for t in row] for row in rows]

    return strings(change.topk(n, dim=-1).indices.tolist()), strings((-change).topk(n, dim=-1).indices.tolist())


def _last_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits at the last position only [B, vocab] (the unembedding of the others is wasted)."""
    return hf_model(ids, logits_to_keep=1).logits[:, -1]


def snippet(tokenizer, ids: Sequence[int], pos: int) -> str:
    """Context around `pos` with the token marked «like this» (newlines shown as ⏎)."""
    left = tokenizer.decode(list(ids[max(1, pos - LEFT) : pos]))
    tok = tokenizer.decode([ids[pos]])
    right = tokenizer.decode(list(ids[pos + 1 : pos + 1 + RIGHT]))
    return f"{left}«{tok}»{right}".replace("\n", "⏎")


def make_label(top_acts: list[str], promoted: list[str]) -> str:
    """A one-line label: the most frequent activating tokens, then what the feature promotes."""
    acts = ", ".join(repr(t.strip() or t) for t in top_acts[:4]) or "(never active)"
    prom = ", ".join(repr(t.strip() or t) for t in promoted[:5])
    return f"on {acts} → {prom}"


# -- labels people read ---------------------------------------------------------------------------

WORD_RE = re.compile(r"[A-Za-z][A-Za-z'-]*[A-Za-z]|[A-Za-z]")
STOPWORDS = frozenset("""a an the and or but of to in on at by for with from as is are was were be been being it its
this that these those he she they we you i me my your his her their our them him us not no so if then than
do does did have has had will would shall should can could may might must there here what which who whom
whose when where why how all any some such only own same too very just also into out up down over under
again further once about against between through during before after above below off s t""".split())
POSITIONAL_DENSITY = 0.3  # a feature on for more than this share of tokens tracks form, not meaning
POSITIONAL_MAX_FACTOR = 6.0  # max activation this many times the median: it rides the attention sink


def _marked_word(text: str) -> tuple[str, list[str]]:
    """The whole word containing the «marked» token, and the whole words near it."""
    i, j = text.find("«"), text.find("»")
    if i < 0 or j < i:
        return "", []
    left, mid, right = text[:i], text[i + 1:j], text[j + 1:]
    lw = "" if mid[:1].isspace() else re.search(r"[A-Za-z'-]*$", left).group(0)
    rw = re.match(r"^[A-Za-z'-]*", right).group(0)
    word = re.sub(r"[^A-Za-z'-]", "", lw + mid.strip() + rw) if mid.strip() else ""
    near = WORD_RE.findall(left[-40:].replace("⏎", " ")) + WORD_RE.findall(right[:30].replace("⏎", " "))
    return word.strip("'-"), near


def _word_at(tokenizer, ids: Sequence[int], pos: int, token: str) -> str:
    """The whole word that token `pos` of `ids` (decoded: `token`) is part of ("fire" of «fire»clay
    is "fireclay")."""
    left = tokenizer.decode(list(ids[max(1, pos - 3) : pos]))
    right = tokenizer.decode(list(ids[pos + 1 : pos + 4]))
    return _marked_word(f"{left}«{token}»{right}")[0]


def _content_word(word: str) -> bool:
    return len(word) > 1 and word.lower() not in STOPWORDS and any(c.isalpha() for c in word)


MIN_WORD_SHARE = 0.04  # a fired-on word names a feature once it is this share of its strongest activations


def fired_word_shares(feature: dict) -> dict[str, float]:
    """Share of a feature's strongest activations that fell on each of its top whole words
    (empty for labels made before `top_words` existed)."""
    top = feature.get("top_words") or []
    total = max(1, feature.get("n_top") or sum(c for _, c in top))
    return {w: c / total for w, c in top}


def _fired_words(features: list[dict]) -> list[list[str]]:
    """Per feature, up to three whole words it fires on most, each weighted by how few other features
    fire on it most ("space, location, home" for a feature whose contexts are rare dictionary words)."""
    shares = [fired_word_shares(f) for f in features]
    background: Counter = Counter()
    for share in shares:
        background.update(share.keys())
    n = max(1, len(features))
    out = []
    for share in shares:
        scored = {w: x * math.log(n / (1 + background[w]) + 1) for w, x in share.items() if x >= MIN_WORD_SHARE}
        out.append([w for w, _ in sorted(scored.items(), key=lambda kv: -kv[1])[:3]])
    return out


def readable_labels(features: list[dict]) -> list[dict]:
    """Per feature: `phrase` (up to three whole words: first the words it fires on most, then
    words that distinguish its top contexts, by lift over all features' contexts), `promotes` (whole
    words its direction pushes the model to say), and `dead` / `positional` flags. Works from the
    evidence `compute_labels` stores."""
    from statistics import median

    per_feature: list[Counter] = []
    recurring: list[Counter] = []
    background: Counter = Counter()
    for f in features:
        counts: Counter = Counter()
        seen: Counter = Counter()  # in how many distinct contexts a word occurs
        texts = dict.fromkeys(c["text"] if isinstance(c, dict) else str(c) for c in f.get("contexts") or [])
        for text in texts:  # a context read twice (overlapping training windows) counts once
            word, near = _marked_word(text)
            found = set()
            if word and word.lower() not in STOPWORDS and len(word) > 1:
                counts[word.lower()] += 3
                found.add(word.lower())
            for w in near:
                if w.lower() not in STOPWORDS and len(w) > 2:
                    counts[w.lower()] += 1
                    found.add(w.lower())
            seen.update(found)
        per_feature.append(counts)
        recurring.append(seen)
        background.update(set(counts))
    n = max(1, len(features))
    live = [f.get("max_act", 0.0) for f in features if f.get("max_act", 0.0) > 0]
    med = median(live) if live else 0.0
    out = []
    fired = _fired_words(features)
    for f, counts, seen, words in zip(features, per_feature, recurring, fired, strict=True):
        # lift, times the number of contexts a word occurs in: a word that recurs over the feature's
        # contexts says more about it than one context's odd name ("shelterdeals")
        lift = {w: c * seen[w] * math.log(n / (1 + background[w])) for w, c in counts.items() if c >= 2}
        for w, _ in sorted(lift.items(), key=lambda kv: -kv[1]):
            if len(words) >= 3:
                break
            if w not in words:
                words = [*words, w]
        promotes = []
        for t in f.get("top_tokens") or []:
            w = t.strip()
            whole = t.startswith(" ") or (t[:1].isupper() and len(w) > 3)  # not a word fragment
            known = w.lower() in background  # seen as a whole word in some feature's contexts
            if whole and known and len(w) >= 3 and w.isalpha() and w.lower() not in STOPWORDS \
                    and w.lower() not in promotes:
                promotes.append(w.lower())
        dead = not f.get("max_act", 0.0)
        positional = (not dead) and (f.get("density", 0.0) > POSITIONAL_DENSITY
                                     or (med > 0 and f.get("max_act", 0.0) > POSITIONAL_MAX_FACTOR * med))
        out.append({"phrase": ", ".join(words), "promotes": promotes[:6], "dead": dead, "positional": positional})
    return out


def add_readable_labels(labels: dict) -> dict:
    """Add `phrase`/`promotes`/`dead`/`positional` to every feature and a readable `label`."""
    extra = readable_labels(labels["features"])
    for f, e in zip(labels["features"], extra, strict=True):
        f.update(e)
        if e["dead"]:
            f["label"] = "dead (never active on the labelling corpus)"
        elif e["positional"]:
            f["label"] = "positional (fires on a text's form, not its meaning)"
        else:
            phrase = e["phrase"] or ", ".join(w.strip() for w in f.get("top_act_tokens", [])[:3])
            prom = ", ".join(e["promotes"][:3])
            f["label"] = f"{phrase}" + (f" → says {prom}" if prom else "") + f" ({f.get('density', 0.0):.2%} of tokens)"
    labels["positional"] = [bool(f["positional"]) for f in labels["features"]]
    labels["n_dead"] = sum(bool(f["dead"]) for f in labels["features"])
    return labels


def _fixed_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """Make glibc serve every block of `nbytes` or more with its own mmap, returned on free.

    Why: labelling allocates a dense [tokens, d_sae] block per batch and keeps small slices of it.
    glibc's adaptive threshold moves such blocks onto the heap, where the kept slices pin them:
    with 8192 features the process grew by ~14 MB per batch and filled 23 GB halfway through 1M
    tokens (measured). With the threshold fixed it grows only by what it keeps. No-op off glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


@torch.no_grad()
def compute_labels(sae: LoadedSAE, hf_model, tokenizer, rows: Sequence[Sequence[int]], batch_size: int = 8,
                   progress: Callable[[int, int], None] | None = None) -> dict:
    """Run `rows` (each starting with BOS, which is skipped) through the model and the SAE."""
    _fixed_mmap_threshold()
    n_feat = sae.d_sae
    max_act = torch.zeros(n_feat)
    fires = torch.zeros(n_feat, dtype=torch.long)
    feats_all, vals_all, where_all = [], [], []
    n_tokens = 0
    norms: list[torch.Tensor] = []
    ctx = len(rows[0])
    for b in range(0, len(rows), batch_size):
        batch = torch.tensor([list(r) for r in rows[b : b + batch_size]])
        acts = batch_activations(hf_model, batch, sae.layer)[:, 1:]  # drop the BOS sink
        norms.append(acts.reshape(-1, sae.d_in).norm(dim=-1))
        mags = sae.encode(acts.reshape(-1, sae.d_in))  # [N, F]
        nz = mags.nonzero(as_tuple=False)
        vals = mags[nz[:, 0], nz[:, 1]]
        max_act = torch.maximum(max_act, mags.max(dim=0).values)
        fires += torch.bincount(nz[:, 1], minlength=n_feat)
        # global token index: row * ctx + position (position counted with BOS included)
        row_idx = b + nz[:, 0] // (ctx - 1)
        pos = nz[:, 0] % (ctx - 1) + 1
        feats_all.append(nz[:, 1].int())
        vals_all.append(vals.float())
        where_all.append((row_idx * ctx + pos).int())
        n_tokens += mags.shape[0]
        if progress:
            progress(min(b + batch_size, len(rows)), len(rows))
    feats = torch.cat(feats_all)
    vals = torch.cat(vals_all)
    where = torch.cat(where_all)
    order = vals.argsort(descending=True)
    order = order[feats[order].argsort(stable=True)]
    feats, vals, where = feats[order], vals[order], where[order]
    counts = torch.bincount(feats.long(), minlength=n_feat).tolist()

    resid_norm = round(float(torch.cat(norms).median()), 3) if norms else None
    if resid_norm:  # what steering a feature at the default push makes the model say
        promoted, suppressed = steered_tokens(hf_model, tokenizer, sae.layer, sae.directions,
                                              ADD_FRACTION * resid_norm)
    else:
        norm_w, unembed = unembed_parts(hf_model)
        promoted, suppressed = promoted_tokens(sae.directions, norm_w, unembed, tokenizer)

    features = []
    start = 0
    flat_rows = [list(r) for r in rows]
    for f in range(n_feat):
        end = start + counts[f]
        contexts, used_rows, act_tokens, act_words = [], set(), Counter(), Counter()
        for j in range(start, min(end, start + 400)):  # the strongest activations only
            r, p = divmod(int(where[j]), ctx)
            if j - start < TOP_ACTIVATIONS:
                token = tokenizer.decode([flat_rows[r][p]])
                act_tokens[token] += 1
                word = _word_at(tokenizer, flat_rows[r], p, token)
                if _content_word(word):
                    act_words[word.lower()] += 1
            if r not in used_rows and len(contexts) < N_CONTEXTS:
                used_rows.add(r)
                text = snippet(tokenizer, flat_rows[r], p)
                contexts.append({"text": text, "act": round(float(vals[j]), 3)})
        start = end
        top_act_tokens = [t for t, _ in act_tokens.most_common(8)]
        features.append({
            "id": f,
            "label": make_label(top_act_tokens, promoted[f]),
            "max_act": round(float(max_act[f]), 4),
            "density": float(fires[f]) / max(1, n_tokens),
            "top_act_tokens": top_act_tokens,
            "top_words": [[w, n] for w, n in act_words.most_common(12)],
            "n_top": min(counts[f], TOP_ACTIVATIONS),
            "top_tokens": promoted[f],
            "bottom_tokens": suppressed[f],
            "contexts": contexts,
        })
    return add_readable_labels({
        "sae": sae.name,
        "layer": sae.layer,
        "n_tokens": n_tokens,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "max_act": [round(float(x), 4) for x in max_act],
        "resid_norm": resid_norm,
        "features": features,
    })


def save_labels(labels: dict, sae_dir: str | os.PathLike) -> Path:
    """Write labels.json atomically beside the SAE."""
    text = json.dumps(labels, ensure_ascii=False, separators=(",", ":"))
    return write_atomically(Path(sae_dir) / STATS_FILE, lambda tmp: tmp.write_text(text))


_LOADED: dict[Path, tuple[tuple[int, int], dict | None]] = {}


def load_labels(sae_dir: str | os.PathLike) -> dict | None:
    """The labels beside an SAE, read again only when labels.json changes (callers share the dict:
    read it, don't change it). Why: with 8192 features the file is 13 MB and every search, `features
    show` and steering change that looks a feature up re-read it (~0.5 s each)."""
    path = Path(sae_dir) / STATS_FILE
    try:
        stat = path.stat()
    except OSError:
        return None
    key = (stat.st_mtime_ns, stat.st_size)
    hit = _LOADED.get(path)
    if hit is None or hit[0] != key:
        try:
            labels = json.loads(path.read_text())
        except (OSError, ValueError):
            labels = None
        hit = _LOADED[path] = (key, labels)
    return hit[1]
