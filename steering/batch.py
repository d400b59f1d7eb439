"""Batched greedy generation and scoring on the engine's own `LlamaModel`, for evaluation and calibration.

Why a second loop beside `generate.py`: judging a steering direction means many short continuations
(prompts x strengths x concepts) and their perplexity under the unsteered model; one sequence at a
time that is minutes, in a batch it is seconds. It runs the same decoder layers (int8 or not) and
the same steering hooks as the engine, so what it measures is what an editor gets. Rows are left
padded; each row has its own positions, attention mask and (optionally) its own `add` vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .generate import GenerationOptions, penalize_repeats
from .steering import LayerEdit, ResolvedPlan, SteeringHooks

DECODING = GenerationOptions()  # the engine's defaults: greedy with its mild repetition penalty


class _Cache:
    """The KV storage `DecoderLayer.forward` writes into and attends over, with a batch dimension.
    One tensor per layer, because a later layer's in-place write must not touch a tensor an earlier
    layer saved for backward (`hidden` with grad enabled). Attention runs in the model's dtype, with
    the per-row masks of left-padded rows."""

    def __init__(self, model, batch: int, width: int):
        cfg = model.cfg
        shape = (batch, cfg.n_kv_heads, width, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=model.dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=model.dtype) for _ in range(cfg.n_layers)]

    def store(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer][:, :, start:start + k.shape[2]] = k
        self.v[layer][:, :, start:start + v.shape[2]] = v

    def attend_new(self, *_) -> None:
        return None  # no fused kernel for batches: per-row positions and masks (`store` and `attend` run)

    def attend_prefill(self, *_) -> None:
        return None  # likewise: left padding needs the mask `attend` is given

    def attend(self, layer: int, q: torch.Tensor, end: int, mask: torch.Tensor | None) -> torch.Tensor:
        keys, values = self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        return F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, attn_mask=mask, enable_gqa=True)


@dataclass
class Prefix:
    """Left-padded rows run through the model's first `layer` layers (`BatchRunner.prefix`)."""

    layer: int
    x: torch.Tensor  # [B, W, d]: the residual entering layer `layer`
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor  # [B, 1, W, W] attention mask
    steer: torch.Tensor  # [B, W]: the positions steering may edit


class BatchRunner:
    """Left-padded batched forwards over a `LlamaModel` with per-row steering."""

    def __init__(self, model, hooks: SteeringHooks | None = None, special_ids: Sequence[int] = ()):
        self.model = model
        self.hooks = hooks if hooks is not None else SteeringHooks(model.layers)
        self.special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)

    def _steer_mask(self, ids: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        keep = valid & (pos > 0)
        if self.special.numel():
            keep &= ~torch.isin(ids, self.special)
        return keep

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new: int, plan: ResolvedPlan | None = None,
                 stop_ids: Sequence[int] = (), steer_prompt: bool = True, steer_new: bool = True,
                 options: GenerationOptions = DECODING) -> list[list[int]]:
        """Greedy continuations (token ids) of every prompt; `plan` may hold per-row [B, 1, d] adds (its
        `written` ones at the generated tokens, as the engine does).
        The repetition penalty of `options` applies as in the engine's `generate` (over each row's
        last `repetition_window` tokens, prompt included): what is measured is what an editor gets."""
        model = self.model
        b, width = len(prompts), max(len(p) for p in prompts)
        total = width + max_new
        ids = torch.zeros(b, width, dtype=torch.long)
        valid = torch.zeros(b, total, dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(list(p))
            valid[i, width - len(p):width] = True
        cache = _Cache(model, b, total)
        pos = (valid[:, :width].long().cumsum(-1) - 1).clamp_min(0)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        mask = causal & valid[:, None, :width]
        mask |= torch.eye(width, dtype=torch.bool)  # padded rows attend to themselves (no NaN)
        logits = self._forward(ids, pos, cache, 0, mask[:, None], plan if steer_prompt else None,
                               self._steer_mask(ids, pos, valid[:, :width]), writing=False)
        out = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool)
        stops = torch.tensor(list(stop_ids), dtype=torch.long)
        last_pos = pos[:, -1]
        history = [list(p) for p in prompts]
        penalty, window = options.repetition_penalty, options.repetition_window
        for step in range(max_new):
            if penalty != 1.0:  # each row's last `window` ids, shorter rows padded with a repeat of their own
                k = min(window, max(len(h) for h in history))
                recent = torch.tensor([h[-k:] + h[:1] * (k - len(h[-k:])) for h in history], dtype=torch.long)
                logits = penalize_repeats(logits, recent, penalty)
            nxt = logits.argmax(-1)
            for i in range(b):
                history[i].append(int(nxt[i]))
                if not done[i]:
                    out[i].append(int(nxt[i]))
            if stops.numel():
                done |= torch.isin(nxt, stops)
            if bool(done.all()) or step == max_new - 1:
                break
            at = width + step
            valid[:, at] = True
            last_pos = last_pos + 1
            tok = nxt[:, None]
            logits = self._forward(tok, last_pos[:, None], cache, at, valid[:, None, None, :at + 1],
                                   plan if steer_new else None, None, writing=True)
        return out

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, cache: _Cache, start: int, mask: torch.Tensor,
                 plan: ResolvedPlan | None, steer: torch.Tensor | None, writing: bool) -> torch.Tensor:
        model = self.model
        x = model.embed(ids)
        cos = model.rope_cos[pos].to(x.dtype).unsqueeze(1)
        sin = model.rope_sin[pos].to(x.dtype).unsqueeze(1)
        with self.hooks.active(plan, steer, writing):
            for layer in model.layers:
                x = layer(x, cache, start, cos, sin, mask)
        return model.lm_head(model.norm(x[:, -1])).float()

    def hidden(self, rows: Sequence[Sequence[int]], plan: ResolvedPlan | None = None, read_layer: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Last-layer residual [B, W, d] of left-padded `rows` (row i ends at column W-1) under `plan`
        (special tokens and first positions left unsteered), and layer `read_layer`'s output (float32).
        Not in inference mode: with grad enabled and a plan whose adds require grad, gradients reach
        the adds (`distill.py`)."""
        return self.hidden_from(self.prefix(rows, 0), plan, read_layer)

    def prefix(self, rows: Sequence[Sequence[int]], upto: int) -> Prefix:
        """`rows` run unsteered through the layers before `upto`, without grad: a search that pushes
        only at `upto` or later runs those layers once instead of at every step (`hidden_from`)."""
        model = self.model
        b, width = len(rows), max(len(r) for r in rows)
        ids = torch.zeros(b, width, dtype=torch.long)
        valid = torch.zeros(b, width, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(list(r))
            valid[i, width - len(r):] = True
        pos = (valid.long().cumsum(-1) - 1).clamp_min(0)
        mask = (torch.ones(width, width, dtype=torch.bool).tril() & valid[:, None, :]) | torch.eye(width,
                                                                                                  dtype=torch.bool)
        with torch.no_grad():  # reused by every step of a search: no graph may hang on it
            x = model.embed(ids)
            cos = model.rope_cos[pos].to(x.dtype).unsqueeze(1)
            sin = model.rope_sin[pos].to(x.dtype).unsqueeze(1)
            cache = _Cache(model, b, width) if upto > 0 else None
            for layer in model.layers[:upto]:
                x = layer(x, cache, 0, cos, sin, mask[:, None])
        return Prefix(upto, x, cos, sin, mask[:, None], self._steer_mask(ids, pos, valid))

    def hidden_from(self, start: Prefix, plan: ResolvedPlan | None = None, read_layer: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`hidden` of the rows of `start` (a `prefix`), run on from its layer; `plan` may edit only
        that layer and later ones, `read_layer` likewise."""
        if plan and min(plan) < start.layer or read_layer is not None and read_layer < start.layer:
            raise ValueError(f"the rows were run up to layer {start.layer} already")
        model = self.model
        cache = _Cache(model, start.x.shape[0], start.x.shape[1])
        x, read = start.x, None
        with self.hooks.active(plan, start.steer if plan else None):
            for i in range(start.layer, len(model.layers)):
                x = model.layers[i](x, cache, 0, start.cos, start.sin, start.mask)
                if i == read_layer:
                    read = x.float()
        return x, read

    @torch.inference_mode()
    def score(self, prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
              read_layer: int | None = None) -> tuple[list[float], list[torch.Tensor | None]]:
        """Unsteered mean negative log-likelihood of each continuation given its prefix, and (with
        `read_layer`) the residual at that layer over the continuation's positions."""
        model = self.model
        rows = [list(p) + list(c) for p, c in zip(prefixes, continuations, strict=True)]
        x, read = self.hidden(rows, read_layer=read_layer)
        width = x.shape[1]
        nll, acts = [], []
        for i, c in enumerate(continuations):
            n = len(c)
            if n == 0:
                nll.append(0.0)
                acts.append(None)
                continue
            h = x[i, width - n - 1: width - 1]
            logp = torch.log_softmax(model.lm_head(model.norm(h)).float(), -1)
            target = torch.tensor(list(c))
            nll.append(float(-logp[torch.arange(n), target].mean()))
            acts.append(read[i, width - n:] if read is not None else None)
        return nll, acts


def per_row_add(vectors: Sequence[torch.Tensor | None], d_model: int) -> torch.Tensor:
    """Stack per-row `add` deltas (None = unsteered row) into a [B, 1, d] tensor."""
    rows = [v.float() if v is not None else torch.zeros(d_model) for v in vectors]
    return torch.stack(rows)[:, None, :]


def plan_with_rows(layer: int, vectors: Sequence[torch.Tensor | None], d_model: int) -> ResolvedPlan:
    return {layer: LayerEdit(add=per_row_add(vectors, d_model))}
