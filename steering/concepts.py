"""Concept vectors from a description: "about gardening", "formal", "less hedging".

Why this method: a writer thinks in descriptions, not feature ids, and should not have to write
examples. The instruct model already knows how to follow "write a short story (about gardening)":
it writes a dozen short texts on such requests and the same dozen without the description, and
the difference of its mean activations reading them back as plain documents is the direction
"this text is about gardening" (a DiffMean vector whose examples the model supplies itself).
Special tokens and attention-sink positions (norm ~100x the rest) are left out. (Measured and
dropped: the difference of activations over neutral text under the instruction vs without it,
which hit the concept in 0 % of continuations.)

Vectors are cached under the user's cache dir keyed by method, model, layers and text (building
one is two batched generations and a few dozen short forward passes). A leading "more"/"less"
sets the sign, so "less hedging" is the "hedging" vector pushed the other way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .files import write_atomically
from .vectors import drop_sinks, layers_activations

NEUTRAL_CONTEXTS = [
    "I woke up a little later than usual and made a cup of tea before anything else.",
    "The meeting started at nine, and everyone had a few things to say about the plan.",
    "She looked at the list again and decided to start with the easiest item.",
    "It was a quiet afternoon, and the street outside was almost empty.",
    "We talked for a while about what to do next, but nobody was sure.",
    "He opened the door, put his bag down and sat at the table.",
    "The report is due on Friday, so there is still some time to finish it.",
    "Last week I finally had a free evening and spent it at home.",
    "They walked to the end of the road and turned left at the corner.",
    "My sister called this morning to ask how everything was going.",
    "The new schedule will start next month, after the holidays.",
    "There were a few people waiting outside when we arrived.",
    "In the end, the decision was simpler than we had expected.",
    "I read the letter twice before putting it back in the envelope.",
    "The old building on the corner has been empty for years.",
    "After lunch we went back to work and finished the rest of the list.",
]
METHOD = "self-written-diffmean-3"  # part of the cache key: a new method never reads old vectors
SIGN_WORDS = {"more": 1.0, "less": -1.0, "fewer": -1.0}


def split_sign(description: str) -> tuple[str, float]:
    """("hedging", -1.0) for "less hedging"; the text unchanged and +1 otherwise."""
    text = " ".join(description.split())
    first, _, rest = text.partition(" ")
    if first.lower() in SIGN_WORDS and rest:
        return rest, SIGN_WORDS[first.lower()]
    return text, 1.0


def _chat_ids(tokenizer, instruction: str, text: str) -> tuple[list[int], int]:
    """Token ids of a chat turn asking for `instruction` answered with `text`; index where `text` starts."""
    msgs = [{"role": "user", "content": instruction}]
    try:
        head = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a tokenizer without a chat template: plain instruction line
        head = f"{instruction}\n\n"
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    body_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return head_ids + body_ids, len(head_ids)


FORMS = ["Write a short story", "Write a letter to a friend", "Write a diary entry", "Write a short description",
         "Write a note", "Write a short news report", "Write a blog post", "Write an email to a colleague",
         "Write a scene from a novel", "Write a short speech", "Write a text message", "Write an opinion piece"]
EXAMPLE_TOKENS = 48


def example_instructions(description: str | None) -> list[str]:
    return [f"{form} ({description})." if description else f"{form}." for form in FORMS]


@torch.no_grad()
def model_examples(model, tokenizer, description: str | None, special_ids=(), eos_ids=()) -> list[list[int]]:
    """Greedy replies of the instruct model to a few writing requests about `description` (None:
    the same requests with no concept), as token ids."""
    from .batch import BatchRunner

    prompts = [_chat_ids(tokenizer, text, "")[0] for text in example_instructions(description)]
    outs = BatchRunner(model, special_ids=special_ids).generate(prompts, EXAMPLE_TOKENS, None, sorted(eos_ids))
    return [[t for t in o if t not in eos_ids] for o in outs]


LAYER_FRACTIONS = (0.13, 0.27, 0.4, 0.53)  # where a concept is added: spread over early-middle layers


def concept_layers(n_layers: int) -> list[int]:
    """Several layers with a smaller push each: measured more fluent than one layer at the same hit rate."""
    return sorted({min(n_layers - 1, max(0, round(n_layers * f))) for f in LAYER_FRACTIONS})


@dataclass
class ConceptVector:
    """A described concept: one unit direction per layer, and the push that strength 1 gives."""

    description: str
    directions: dict[int, torch.Tensor]  # layer -> unit direction [d_model]
    resid_norms: dict[int, float]  # layer -> typical residual norm (the strength unit)
    add_fraction: float | None = None  # calibrated push as a fraction of the norm (None: library default)
    meta: dict = field(default_factory=dict)

    def pushes(self, fraction: float) -> dict[int, torch.Tensor]:
        """Residual delta per layer at strength 1 (the push is shared out over the layers)."""
        n = len(self.directions)
        return {layer: fraction * self.resid_norms[layer] * d / n for layer, d in self.directions.items()}


@torch.no_grad()
def mean_text_activations(model, texts: Sequence[Sequence[int]], layers: Sequence[int], bos: int | None
                          ) -> tuple[dict[int, torch.Tensor], dict[int, float]]:
    """Mean residual per layer over every text read as a plain document (sinks dropped), and the
    median residual norm per layer."""
    sums: dict[int, torch.Tensor] = {}
    norms: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    count = 0
    for ids in texts:
        if not ids:
            continue
        seq = ([bos] if bos is not None else []) + list(ids)
        for layer, acts in layers_activations(model, seq, layers).items():
            acts = drop_sinks(acts[1:])
            sums[layer] = acts.sum(0) if layer not in sums else sums[layer] + acts.sum(0)
            norms[layer].append(acts.norm(dim=-1))
            if layer == layers[0]:
                count += acts.shape[0]
    if not count:
        raise ValueError("the model wrote nothing")
    return ({layer: total / count for layer, total in sums.items()},
            {layer: float(torch.cat(n).median()) for layer, n in norms.items()})


_TEXTS: dict[tuple, list[list[int]]] = {}


def concept_texts(model, tokenizer, description: str | None, special_ids=(), eos_ids=(), model_key: str | None = None
                  ) -> list[list[int]]:
    """The model's own short texts written on request about `description` (None: the same requests
    with no concept), as token ids; kept in memory and, with a `model_key`, in the user's cache
    (search and concept building both read them, and the generation is the slow part)."""
    special = set(special_ids) | set(getattr(tokenizer, "all_special_ids", []) or [])
    eos = set(eos_ids) | {i for i in (tokenizer.eos_token_id,) if i is not None}
    text = None if description is None else " ".join(description.split())
    key = (id(model), (text or "").lower())
    if key in _TEXTS:
        return _TEXTS[key]
    path = None
    if model_key is not None:
        digest = hashlib.sha1(f"texts-{METHOD}\n{model_key}\n{(text or '').lower()}".encode()).hexdigest()[:16]
        path = concepts_dir() / f"texts-{slug(text or 'neutral')}-{digest}.json"
        try:
            found = json.loads(path.read_text())
            if isinstance(found, list) and all(isinstance(t, list) for t in found):
                _TEXTS[key] = found
                return found
        except (OSError, ValueError):
            pass
    texts = model_examples(model, tokenizer, text, special, eos)
    _TEXTS[key] = texts
    if path is not None:
        try:
            write_atomically(path, lambda tmp: tmp.write_text(json.dumps(texts)))
        except OSError:
            pass  # a read-only cache only costs the generation next time
    return texts


_NEUTRAL: dict[tuple, tuple[dict[int, torch.Tensor], dict[int, float]]] = {}


@torch.no_grad()
def build_concept(model, tokenizer, description: str, layers: Sequence[int], special_ids=(), eos_ids=(),
                  model_key: str | None = None) -> ConceptVector:
    """DiffMean of `description` from the model's own writing (sign words stripped; the caller
    applies the sign): texts written on request "about X" minus texts written on the same requests
    without X, both read back as plain documents, at every layer in `layers`."""
    core, _sign = split_sign(description)
    bos = tokenizer.bos_token_id
    layers = sorted(layers)
    key = (id(model), tuple(layers))
    if key not in _NEUTRAL:  # the neutral side is the same for every description
        neutral = concept_texts(model, tokenizer, None, special_ids, eos_ids, model_key)
        _NEUTRAL[key] = mean_text_activations(model, neutral, layers, bos)
    neg, norms = _NEUTRAL[key]
    pos_texts = concept_texts(model, tokenizer, core, special_ids, eos_ids, model_key)
    pos, _ = mean_text_activations(model, pos_texts, layers, bos)
    directions = {}
    for layer in layers:
        diff = pos[layer] - neg[layer]
        if float(diff.norm()) == 0.0:
            raise ValueError(f"the description {core!r} does not change the model's activations")
        directions[layer] = diff / diff.norm()
    meta = {"description": core, "method": METHOD, "examples": [tokenizer.decode(t) for t in pos_texts[:3]]}
    return ConceptVector(core, directions, norms, None, meta)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "concept"


def concepts_dir() -> Path:
    env = os.environ.get("TINYMORPH_CACHE_DIR")
    if env:
        return Path(env) / "concepts"
    import platformdirs

    return Path(platformdirs.user_cache_dir("tinymorph")) / "concepts"


def concept_path(model_key: str, description: str, layers: Sequence[int]) -> Path:
    core, _ = split_sign(description)
    digest = hashlib.sha1(f"{METHOD}\n{model_key}\n{list(layers)}\n{core.lower()}".encode()).hexdigest()[:16]
    return concepts_dir() / f"{slug(core)}-{digest}.safetensors"


def save_concept(vec: ConceptVector, path: Path) -> Path:
    from safetensors.torch import save_file

    meta = {"description": vec.description, "resid_norms": json.dumps({str(k): v for k, v in vec.resid_norms.items()}),
            "add_fraction": json.dumps(vec.add_fraction), "meta": json.dumps(vec.meta)}
    tensors = {f"L{k}": d.float().contiguous() for k, d in vec.directions.items()}
    return write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_concept(path: Path) -> ConceptVector:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            directions = {int(k[1:]): f.get_tensor(k).float() for k in f.keys()}
        norms = {int(k): float(v) for k, v in json.loads(meta["resid_norms"]).items()}
        return ConceptVector(meta["description"], directions, norms, json.loads(meta.get("add_fraction", "null")),
                             json.loads(meta.get("meta", "{}")))
    except Exception as exc:  # noqa: BLE001 - any damage means: rebuild
        raise ValueError(f"concept file {path} is damaged: {exc}") from exc


def cached_concept(model, tokenizer, model_key: str, description: str, layers: Sequence[int],
                   special_ids=(), eos_ids=()) -> tuple[ConceptVector, Path]:
    """`build_concept`, read from / written to the user's cache (keyed by method, model, layers, text)."""
    path = concept_path(model_key, description, layers)
    if path.is_file():
        try:
            return load_concept(path), path
        except ValueError:
            pass
    vec = build_concept(model, tokenizer, description, layers, special_ids, eos_ids, model_key)
    vec.meta["model"] = model_key
    save_concept(vec, path)
    return vec, path
