"""Contrastive steering vectors: the mean residual difference between two sets of examples.

Why: SAE features only cover what the SAE learned; a user who wants "more like these paragraphs,
less like those" can build a direction directly. A vector is saved under the user's data dir and is
steered exactly like a feature (``vector:NAME``): strength 1 adds the whole mean difference.

Also home of `layer_activations`, the one place that reads residual activations out of a model
(both the engine's `LlamaModel` and a transformers model work), shared by labels and features.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .files import write_atomically

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class VectorError(ValueError):
    """A vector is missing, malformed, or cannot be built; the message says why."""


@dataclass
class SteeringVector:
    name: str
    layer: int
    direction: torch.Tensor  # [d_model], unit norm
    scale: float  # norm of the mean difference: what strength 1 adds
    meta: dict = field(default_factory=dict)


def vectors_dir(override: str | os.PathLike | None = None) -> Path:
    """Where vectors live: `override`, $TINYMORPH_DATA_DIR/vectors, or the platform user data dir."""
    if override is not None:
        return Path(override)
    env = os.environ.get("TINYMORPH_DATA_DIR")
    if env:
        return Path(env) / "vectors"
    import platformdirs

    return Path(platformdirs.user_data_dir("tinymorph")) / "vectors"


def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise VectorError(f"bad vector name {name!r}: use letters, digits, '_', '-', '.' (max 64)")
    return name


def save_vector_file(vec: SteeringVector, path: str | os.PathLike) -> Path:
    """Write one vector to `path` atomically (tmp + rename)."""
    from safetensors.torch import save_file

    meta = {"layer": str(vec.layer), "scale": repr(float(vec.scale)), "meta": json.dumps(vec.meta)}
    return write_atomically(path, lambda tmp: save_file({"direction": vec.direction.float().contiguous()},
                                                        str(tmp), metadata=meta))


def load_vector_file(path: str | os.PathLike, name: str | None = None) -> SteeringVector:
    """Read one vector file; `VectorError` when it is damaged."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            direction = f.get_tensor("direction").float()
        return SteeringVector(name or path.stem, int(meta["layer"]), direction, float(meta["scale"]),
                              json.loads(meta.get("meta", "{}")))
    except Exception as exc:  # noqa: BLE001 - any corruption is the same problem for the user
        raise VectorError(f"vector file {path} is damaged: {exc}") from exc


def save_vector(vec: SteeringVector, directory: str | os.PathLike | None = None) -> Path:
    """Write `<dir>/<name>.safetensors`."""
    return save_vector_file(vec, vectors_dir(directory) / f"{check_name(vec.name)}.safetensors")


def load_vector(name: str, directory: str | os.PathLike | None = None) -> SteeringVector:
    path = vectors_dir(directory) / f"{check_name(name)}.safetensors"
    if not path.is_file():
        known = ", ".join(list_vectors(directory)) or "none yet"
        raise VectorError(f"unknown vector {name!r} (known: {known}); build one with "
                          "`tinymorph vector from-examples`, or steer by a description instead")
    return load_vector_file(path, name)


def list_vectors(directory: str | os.PathLike | None = None) -> list[str]:
    d = vectors_dir(directory)
    return sorted(p.stem for p in d.glob("*.safetensors")) if d.is_dir() else []


def read_examples(path: str | os.PathLike) -> list[str]:
    """Examples in a text file: blank-line separated paragraphs, or one per line if no blank lines."""
    p = Path(path)
    if not p.is_file():
        raise VectorError(f"examples file {p} does not exist")
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise VectorError(f"examples file {p} is not UTF-8 text") from None
    parts = re.split(r"\n\s*\n", text) if re.search(r"\n\s*\n", text.strip()) else text.splitlines()
    examples = [" ".join(x.split()) for x in parts if x.strip()]
    if not examples:
        raise VectorError(f"examples file {p} has no text")
    return examples


# -- reading activations ----------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _decoder_layers(model) -> Sequence[torch.nn.Module]:
    if hasattr(model, "layers"):  # the engine's LlamaModel
        return model.layers
    return model.model.layers  # transformers *ForCausalLM


@torch.no_grad()
def layers_activations(model, ids: Sequence[int], wanted: Sequence[int]) -> dict[int, torch.Tensor]:
    """Residual stream after each decoder layer in `wanted` for one token sequence, in one forward
    that stops right after the last of them: layer -> [len(ids), d_model] fp32.

    Works with the engine's `LlamaModel` (list of ids + KV cache) and with a transformers causal LM.
    """
    layers = _decoder_layers(model)
    for layer in wanted:
        if not 0 <= layer < len(layers):
            raise VectorError(f"layer {layer} out of range: the model has layers 0..{len(layers) - 1}")
    last = max(wanted)
    captured: dict[int, torch.Tensor] = {}
    owner = threading.get_ident()

    def make_hook(index: int):
        def hook(_m, _i, out):
            # a module's hooks fire in every thread's forward: an editor's completion running beside
            # a feature search must neither be stopped by it nor be what it reads
            if threading.get_ident() != owner:
                return None
            captured[index] = (out[0] if isinstance(out, tuple) else out).detach()[0].float()
            if index == last:
                raise _Stop

        return hook

    handles = [layers[layer].register_forward_hook(make_hook(layer)) for layer in set(wanted)]
    try:
        if hasattr(model, "new_cache"):
            model(list(ids), model.new_cache(len(ids) + 8))
        else:
            model(torch.tensor([list(ids)]))
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


def layer_activations(model, ids: Sequence[int], layer: int) -> torch.Tensor:
    """Residual stream after decoder layer `layer` for one token sequence: [len(ids), d_model] fp32."""
    return layers_activations(model, ids, [layer])[layer]


SINK_FACTOR = 8.0  # a position whose norm is this many times the median is an attention sink


def drop_sinks(acts: torch.Tensor) -> torch.Tensor:
    """Rows of `acts` [T, d] without attention-sink positions (norm ~100x the rest at middle layers).

    Why: the first position of a text (and sometimes a later delimiter) carries a residual norm of
    ~24,000 against ~170 elsewhere in SmolLM2; one such row dominates any mean or ranking.
    """
    if acts.shape[0] < 2:
        return acts
    norms = acts.norm(dim=-1)
    return acts[norms <= SINK_FACTOR * norms.median()]


def encode_texts(tokenizer, texts: Iterable[str], max_tokens: int = 256) -> list[list[int]]:
    """Token ids with BOS first (position 0 is an attention sink: callers drop it)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"][: max_tokens - 1]
        if ids:
            out.append([bos, *ids])
    return out


def mean_activation(model, tokenizer, texts: Sequence[str], layer: int) -> torch.Tensor:
    """Mean residual activation at `layer` over all (non-BOS) token positions of `texts`."""
    total, count = None, 0
    for ids in encode_texts(tokenizer, texts):
        acts = drop_sinks(layer_activations(model, ids, layer)[1:])
        total = acts.sum(0) if total is None else total + acts.sum(0)
        count += acts.shape[0]
    if total is None or count == 0:
        raise VectorError("no tokens in the examples")
    return total / count


@torch.no_grad()
def typical_norm(model, tokenizer, texts: Sequence[str], layer: int) -> float:
    """Median residual norm at `layer` over `texts` (sinks excluded): the unit of steering strength."""
    norms = [drop_sinks(layer_activations(model, ids, layer)[1:]).norm(dim=-1)
             for ids in encode_texts(tokenizer, texts)]
    if not norms:
        raise VectorError("no tokens to measure the residual norm on")
    return float(torch.cat(norms).median())


def vector_from_examples(name: str, model, tokenizer, positive: Sequence[str], negative: Sequence[str],
                         layer: int, model_name: str = "default") -> SteeringVector:
    """Mean difference (positive − negative) at `layer`, stored as unit direction + norm."""
    check_name(name)
    pos = mean_activation(model, tokenizer, positive, layer)
    diff = pos - mean_activation(model, tokenizer, negative, layer)
    norm = float(diff.norm())
    if norm == 0.0:
        raise VectorError("positive and negative examples give the same mean activation")
    meta = {"model": model_name, "n_positive": len(positive), "n_negative": len(negative),
            "resid_norm": typical_norm(model, tokenizer, list(positive) + list(negative), layer)}
    return SteeringVector(name, layer, diff / norm, norm, meta)
