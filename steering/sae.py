"""Loading sparse autoencoders (sae-lens format) and exposing what steering needs from them.

Why a wrapper around `sae_lens.SAE`: the steering hooks need plain tensors in one convention that
holds for every architecture sae-lens saves (TopK with or without `rescale_acts_by_decoder_norm`,
ReLU, JumpReLU): a feature's *magnitude* ``c_i`` is the norm of its contribution to the
reconstruction, so the reconstruction is ``b_dec + Σ c_i · u_i`` with ``u_i`` the unit decoder row
and ``c_i = gate(((x - b_dec) · enc_i + benc_i))`` with the encoder rescaled accordingly. Max
activations, clamp targets and `add` strengths are all measured in that unit, so "strength 1" means
"as strong as this feature ever gets" for every SAE.

Sources: "default" (the SAE shipped in the package), a local folder with `cfg.json` +
`sae_weights.safetensors`, or ``RELEASE:SAE_ID`` from the sae-lens registry when it is already in the
local Hugging Face cache (nothing is downloaded).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_SAE = "default"
SHIPPED_DIR = Path(__file__).parent / "data" / "sae"
STATS_FILE = "labels.json"
FALLBACK_MAX_ACT = 10.0  # used when an SAE has no labels/stats yet (run `tinymorph sae label`)
SUPPORTED_NORMALIZATION = ("none", "expected_average_only_in")
SUPPORTED_ARCHITECTURES = ("standard", "topk", "jumprelu", "gated")


class SAEError(ValueError):
    """An SAE could not be found, loaded or used with this model; the message says why."""


def layer_from_hook(hook: str) -> int | None:
    """The layer index in an HF (`model.layers.15`) or TransformerLens (`blocks.15.hook_resid_post`) name."""
    m = re.search(r"(?:layers|blocks|h)\.(\d+)(?:\.|$)", hook)
    return int(m.group(1)) if m else None


@dataclass
class LoadedSAE:
    """An SAE as plain tensors in the magnitude convention described in the module docstring."""

    name: str
    path: Path | None
    hook_name: str
    layer: int
    d_in: int
    d_sae: int
    architecture: str
    enc: torch.Tensor  # [d_in, d_sae] encoder, rescaled so that enc output is in magnitude units
    b_enc: torch.Tensor  # [d_sae]
    directions: torch.Tensor  # [d_sae, d_in] unit decoder rows
    b_dec: torch.Tensor  # [d_in] (subtracted from the input before encoding when the SAE does)
    sub_b_dec: bool
    k: int | None
    max_act: torch.Tensor  # [d_sae] max magnitude seen on the labelling corpus (or a fallback)
    has_stats: bool
    model_name: str | None = None
    act_to_mag: torch.Tensor | None = None  # sae-lens activation -> magnitude factor per feature
    resid_norm: float | None = None  # typical residual norm at the SAE's layer (from the labels)
    dead: torch.Tensor | None = None  # [d_sae] bool: never active on the labelling corpus
    positional: torch.Tensor | None = None  # [d_sae] bool: tracks positions/sinks, not meaning
    _sae: object | None = field(default=None, repr=False)
    _fingerprint: str | None = field(default=None, repr=False)

    def feature_reader(self, i: int):
        """x [..., d_in] → the value of feature `i` as the SAE itself encodes it (its TopK, JumpReLU
        threshold or gate included): exactly 0 where the feature is off."""
        index = self._check(i)

        def read(x: torch.Tensor) -> torch.Tensor:
            return self.encode(x)[..., index]

        return read

    def fingerprint(self) -> str:
        """A short id of these weights: calibrations stored for `name:i` must not outlive the SAE they
        were measured on (a new shipped SAE reuses the same ids for other features)."""
        if self._fingerprint is None:
            import hashlib

            weights = self.path / "sae_weights.safetensors" if self.path is not None else None
            h = hashlib.sha1(f"{self.hook_name}|{self.d_in}|{self.d_sae}".encode())
            if weights is not None and weights.is_file():
                with open(weights, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
            else:
                h.update(self.directions.numpy().tobytes())
            self._fingerprint = h.hexdigest()[:12]
        return self._fingerprint

    def usable(self, i: int) -> bool:
        """False for dead and positional features (never offered in search or suggestions)."""
        return not ((self.dead is not None and bool(self.dead[i]))
                    or (self.positional is not None and bool(self.positional[i])))

    def encoder_column(self, i: int) -> torch.Tensor:
        return self.enc[:, self._check(i)]

    def encoder_bias(self, i: int) -> float:
        return float(self.b_enc[self._check(i)])

    def direction(self, i: int) -> torch.Tensor:
        """Unit decoder direction of feature `i` (what `add` steering pushes along)."""
        return self.directions[self._check(i)]

    def decoder_bias(self) -> torch.Tensor:
        return self.b_dec if self.sub_b_dec else torch.zeros_like(self.b_dec)

    def max_activation(self, i: int) -> float:
        return float(self.max_act[self._check(i)])

    def _check(self, i: int) -> int:
        if not 0 <= i < self.d_sae:
            raise SAEError(f"feature {i} out of range: SAE {self.name!r} has features 0..{self.d_sae - 1}")
        return i

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature magnitudes [..., d_sae] for residual activations x [..., d_in] (the SAE's own gate)."""
        x = x.float()
        if self._sae is not None:
            acts = self._sae.encode(x)  # type: ignore[attr-defined]
            return acts * self.act_to_mag if self.act_to_mag is not None else acts
        pre = (x - self.decoder_bias()) @ self.enc + self.b_enc
        acts = torch.relu(pre)
        if self.k is not None and self.k < self.d_sae:
            top = acts.topk(self.k, dim=-1)
            acts = torch.zeros_like(acts).scatter_(-1, top.indices, top.values)
        return acts

    @torch.no_grad()
    def decode(self, mags: torch.Tensor) -> torch.Tensor:
        return mags @ self.directions + self.b_dec

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def shipped_path(name: str = DEFAULT_SAE) -> Path:
    return SHIPPED_DIR / name


def resolve_sae_path(spec: str | os.PathLike) -> tuple[str, Path | None, str | None]:
    """(display name, local folder or None, registry 'RELEASE:ID' or None) for what the user wrote."""
    text = str(spec)
    if text == DEFAULT_SAE:
        path = shipped_path()
        if not (path / "cfg.json").is_file():
            raise SAEError(f"the shipped default SAE is missing at {path}: reinstall tinymorph")
        return DEFAULT_SAE, path, None
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "cfg.json").is_file() or not (path / "sae_weights.safetensors").is_file():
            raise SAEError(f"{path} is not an sae-lens SAE folder "
                           "(needs cfg.json and sae_weights.safetensors)")
        return path.name, path, None
    if path.exists():
        raise SAEError(f"{path} is a file; give the SAE's folder (with cfg.json and sae_weights.safetensors)")
    if ":" in text and not text.startswith((".", "/", "~")):
        return text, None, text
    raise SAEError(f"SAE {text!r} not found: no such folder, and not a sae-lens RELEASE:SAE_ID")


def _load_sae_lens(path: Path | None, registry: str | None):
    import warnings

    with warnings.catch_warnings():  # sae-lens warns about TransformerLens loading hints: not for us
        warnings.simplefilter("ignore")
        return _load_sae_lens_quiet(path, registry)


def _load_sae_lens_quiet(path: Path | None, registry: str | None):
    from sae_lens import SAE

    if path is not None:
        try:
            return SAE.load_from_disk(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - sae-lens raises many kinds; the user needs one line
            raise SAEError(f"could not load the SAE in {path}: {exc}") from exc
    assert registry is not None
    release, _, sae_id = registry.partition(":")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return SAE.from_pretrained(release, sae_id, device="cpu")
    except Exception as exc:  # noqa: BLE001
        raise SAEError(
            f"sae-lens SAE {registry!r} is not available offline (not in the local Hugging Face cache, or "
            f"unknown release/id): {exc}"
        ) from exc


def load_sae(spec: str | os.PathLike = DEFAULT_SAE, name: str | None = None) -> LoadedSAE:
    """Load an SAE and convert it to the magnitude convention (see module docstring)."""
    display, path, registry = resolve_sae_path(spec)
    sae = _load_sae_lens(path, registry)
    cfg = sae.cfg
    norm = getattr(cfg, "normalize_activations", "none")
    if norm not in SUPPORTED_NORMALIZATION:
        raise SAEError(f"SAE {display!r} normalises its input with {norm!r}: only "
                       f"{', '.join(SUPPORTED_NORMALIZATION)} can be steered")
    if getattr(cfg, "reshape_activations", "none") != "none":
        raise SAEError(f"SAE {display!r} reads attention heads (hook_z); "
                       "only residual-stream SAEs are supported")
    arch = str(cfg.architecture())
    if arch not in SUPPORTED_ARCHITECTURES:
        raise SAEError(f"SAE {display!r} has architecture {arch!r}: only "
                       f"{', '.join(SUPPORTED_ARCHITECTURES)} SAEs can be steered")
    meta = getattr(cfg, "metadata", None)
    hook = getattr(meta, "hook_name", None) or ""
    layer = layer_from_hook(hook)
    if layer is None:
        raise SAEError(f"SAE {display!r}: cannot tell the layer from its hook name {hook!r}")
    with torch.no_grad():
        W_enc = sae.W_enc.detach().float()
        W_dec = sae.W_dec.detach().float()
        # gated SAEs have no b_enc: their magnitude path is W_enc·exp(r_mag) + b_mag (informational
        # here; values are always read through the SAE's own `encode`)
        if getattr(sae, "b_enc", None) is not None:
            b_enc = sae.b_enc.detach().float()
        else:
            b_enc = sae.b_mag.detach().float()
            W_enc = W_enc * torch.exp(sae.r_mag.detach().float())
        b_dec = sae.b_dec.detach().float()
        dec_norm = W_dec.norm(dim=-1).clamp_min(1e-8)
        rescale = bool(getattr(cfg, "rescale_acts_by_decoder_norm", False))
        # encode() already multiplies by the decoder norm when `rescale`; decode then uses the unit
        # rows. Without it, decode uses the raw rows, so the contribution magnitude is act * norm.
        act_to_mag = torch.ones_like(dec_norm) if rescale else dec_norm
        loaded = LoadedSAE(
            name=name or display,
            path=path,
            hook_name=hook,
            layer=layer,
            d_in=int(cfg.d_in),
            d_sae=int(cfg.d_sae),
            architecture=arch,
            enc=W_enc * dec_norm,
            b_enc=b_enc * dec_norm,
            directions=W_dec / dec_norm[:, None],
            b_dec=b_dec,
            sub_b_dec=bool(getattr(cfg, "apply_b_dec_to_input", True)),
            k=getattr(cfg, "k", None),
            max_act=torch.full((int(cfg.d_sae),), FALLBACK_MAX_ACT),
            has_stats=False,
            model_name=getattr(meta, "model_name", None),
            act_to_mag=act_to_mag,
            _sae=sae,
        )
    if path is not None:
        _attach_stats(loaded, path)
    return loaded


def _attach_stats(sae: LoadedSAE, path: Path) -> None:
    """Read per-feature max activations from the labels file next to the SAE, if there is one."""
    stats = path / STATS_FILE
    if not stats.is_file():
        return
    try:
        data = json.loads(stats.read_text())
        max_act = data["max_act"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if len(max_act) == sae.d_sae:
        t = torch.tensor(max_act, dtype=torch.float32)
        # dead features have max 0: steering them still needs a scale, use the median of live ones
        live = t[t > 0]
        fill = float(live.median()) if live.numel() else FALLBACK_MAX_ACT
        sae.max_act = torch.where(t > 0, t, torch.full_like(t, fill))
        sae.has_stats = True
        sae.dead = t <= 0
        norm = data.get("resid_norm")
        sae.resid_norm = float(norm) if isinstance(norm, (int, float)) and norm > 0 else None
        flags = data.get("positional")
        if isinstance(flags, list) and len(flags) == sae.d_sae:
            sae.positional = torch.tensor([bool(f) for f in flags])


def validate_for_model(sae: LoadedSAE, d_model: int, n_layers: int, layer: int | None = None) -> None:
    """Raise `SAEError` when the SAE cannot read this model's residual stream."""
    if sae.d_in != d_model:
        raise SAEError(f"SAE {sae.name!r} reads {sae.d_in}-dim activations but the model's residual stream "
                       f"has {d_model} dims: it was trained on a different model")
    target = sae.layer if layer is None else layer
    if not 0 <= target < n_layers:
        raise SAEError(f"SAE {sae.name!r} hooks layer {target} but the model has layers 0..{n_layers - 1}")
