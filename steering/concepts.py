"""Concept vectors from a description: "about gardening", "formal", "less hedging".

Why this method: a writer thinks in descriptions, not feature ids, and should not have to write
examples. The instruct model already knows how to follow "write about gardening"; the difference
between its residual stream when it has that instruction and when it has a neutral one, read over
the same neutral text, is the direction "this text should be about gardening" (a DiffMean vector
whose examples the model supplies itself). Only the positions of the neutral text are read (not
the instruction, not special tokens, not attention-sink positions whose norm is ~100x the rest),
so the vector carries the intent rather than the instruction's words.

Vectors are cached under the user's cache dir keyed by model, layer and text (building one is a
few dozen short forward passes). A leading "more"/"less" sets the sign, so "less hedging" is the
"hedging" vector pushed the other way.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from .vectors import (
    SteeringVector,
    drop_sinks,
    layer_activations,
    load_vector_file,
    save_vector_file,
    typical_norm,
)

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
METHOD = "self-written-diffmean-2"  # part of the cache key: a new method never reads old vectors
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
    runner = BatchRunner(model, special_ids=special_ids)
    try:
        outs = runner.generate(prompts, EXAMPLE_TOKENS, None, sorted(eos_ids))
    finally:
        runner.hooks.remove()
    return [[t for t in o if t not in eos_ids] for o in outs]


@torch.no_grad()
def mean_text_activation(model, texts: Sequence[Sequence[int]], layer: int, bos: int | None) -> torch.Tensor:
    """Mean residual at `layer` over every text read as a plain document (sinks dropped)."""
    total, count = None, 0
    for ids in texts:
        if not ids:
            continue
        seq = ([bos] if bos is not None else []) + list(ids)
        acts = drop_sinks(layer_activations(model, seq, layer)[1:])
        total = acts.sum(0) if total is None else total + acts.sum(0)
        count += acts.shape[0]
    if total is None:
        raise ValueError("the model wrote nothing")
    return total / count


@torch.no_grad()
def build_concept_vector(model, tokenizer, description: str, layer: int, name: str | None = None,
                         special_ids=(), eos_ids=()) -> SteeringVector:
    """DiffMean of `description` from the model's own writing (sign words stripped; the caller
    applies the sign): texts written on request "about X" minus texts written on the same requests
    without X, both read back as plain documents."""
    core, _sign = split_sign(description)
    special = set(special_ids) | set(getattr(tokenizer, "all_special_ids", []) or [])
    eos = set(eos_ids) | {i for i in (tokenizer.eos_token_id,) if i is not None}
    pos = model_examples(model, tokenizer, core, special, eos)
    neg = model_examples(model, tokenizer, None, special, eos)
    bos = tokenizer.bos_token_id
    diff = mean_text_activation(model, pos, layer, bos) - mean_text_activation(model, neg, layer, bos)
    norm = float(diff.norm())
    if norm == 0.0:
        raise ValueError(f"the description {core!r} does not change the model's activations")
    texts = [tokenizer.decode(t) for t in pos]
    meta = {"description": core, "method": "self-written-diffmean", "n_examples": len(pos),
            "resid_norm": typical_norm(model, tokenizer, NEUTRAL_CONTEXTS, layer), "examples": texts[:3]}
    return SteeringVector(name or slug(core), layer, diff / norm, norm, meta)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "concept"


def concepts_dir() -> Path:
    env = os.environ.get("TINYMORPH_CACHE_DIR")
    if env:
        return Path(env) / "concepts"
    import platformdirs

    return Path(platformdirs.user_cache_dir("tinymorph")) / "concepts"


def concept_path(model_key: str, description: str, layer: int) -> Path:
    core, _ = split_sign(description)
    digest = hashlib.sha1(f"{METHOD}\n{model_key}\n{layer}\n{core.lower()}".encode()).hexdigest()[:16]
    return concepts_dir() / f"{slug(core)}-L{layer}-{digest}.safetensors"


def cached_concept_vector(model, tokenizer, model_key: str, description: str, layer: int,
                          special_ids=(), eos_ids=()) -> SteeringVector:
    """`build_concept_vector`, read from / written to the user's cache."""
    path = concept_path(model_key, description, layer)
    if path.is_file():
        try:
            return load_vector_file(path)
        except ValueError:
            pass  # damaged: rebuild
    vec = build_concept_vector(model, tokenizer, description, layer, special_ids=special_ids, eos_ids=eos_ids)
    vec.meta["model"] = model_key
    save_vector_file(vec, path)
    return vec


def update_cached(vec: SteeringVector, model_key: str, description: str) -> None:
    """Write back a cached concept vector whose metadata changed (e.g. its calibration)."""
    save_vector_file(vec, concept_path(model_key, description, vec.layer))
