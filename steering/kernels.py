"""C kernels for what PyTorch's CPU ops do slowly at decode sizes, built on the user's machine.

Why built here: `-march=native` vectorizes the plain C loops of `csrc/*.c` for the CPU at hand
(AVX-512 here, AVX2 elsewhere; intrinsics where the CPU has AVX512-BF16), and a C compiler is there on
most machines a developer types on. Every source is compiled once per machine (`cc`, `gcc` or
`clang`; `-O3 -fopenmp -march=native` and `OPTIMIZE`, falling back to fewer flags) into one shared
library in the user cache dir and loaded with ctypes. `-fopenmp` links `libgomp.so.1`, which is
torch's own copy once torch is loaded: the kernels run on the threads torch keeps warm between its
ops. Users of a kernel check it against PyTorch before its first use (`attention.py`, `quant.py`,
`llama.py` for the whole layers of `fused_layer.py`). Without a compiler, or when the build fails,
`library()` is None and PyTorch's ops run as before. `TINYMORPH_KERNELS=0` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")

# -ffast-math without what it does to the whole process: a shared library linked with it sets the
# CPU's flush-to-zero/denormals-are-zero flags when loaded, and then `5e-324 > 0` is False in Python
# (an HTTP request with top_p=5e-324 was refused as "not greater than 0"). Reassociation is what
# vectorizes the sums.
OPTIMIZE = ("-O3", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
            "-freciprocal-math")
_lock = threading.RLock()  # a kernel's check may load the kernels it calls
_state: dict[str, object] = {}
_kernels: dict[str, object] = {}


def library() -> ctypes.CDLL | None:
    """The kernels' shared library, built on first call (None where it cannot be; see `reason`)."""
    with _lock:
        return _library()


def _library() -> ctypes.CDLL | None:
    if "library" not in _state:
        _state["library"] = None
        if os.environ.get("TINYMORPH_KERNELS", "1") == "0":
            _state["reason"] = "TINYMORPH_KERNELS=0"
        else:
            try:
                _state["library"] = ctypes.CDLL(str(_build()))
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _state["reason"] = f"not built: {exc}"
    return _state["library"]  # type: ignore[return-value]


def load(name: str, make: Callable[[ctypes.CDLL], T], check: Callable[[T], bool]) -> T | None:
    """Kernel `name`: `make(library)` wraps the library's function, `check` compares it with PyTorch.
    Done once per process; None (and `reason()` says why) where the library or the check fails."""
    with _lock:
        if name not in _kernels:
            _kernels[name] = None
            library = _library()
            if library is not None:
                kernel = make(library)
                if check(kernel):
                    _kernels[name] = kernel
                else:
                    _state["reason"] = f"the {name} kernel's output differs from PyTorch's on this machine"
        return _kernels[name]


class Scratch:
    """A kernel's float32 work buffer, one per thread (forwards may run in several), grown
    geometrically and kept between calls: `scratch(n)` has at least n elements."""

    def __init__(self):
        self._local = threading.local()

    def __call__(self, n: int) -> torch.Tensor:
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or buffer.numel() < n:
            buffer = self._local.buffer = torch.empty(max(n, 2 * (0 if buffer is None else buffer.numel())))
        return buffer


def reason() -> str | None:
    """Why `library()` is None, or why a kernel's check failed (`disable`)."""
    return _state.get("reason")  # type: ignore[return-value]


def _sources() -> list[tuple[str, bytes]]:
    """The C sources and their headers (both part of the build's cache key)."""
    folder = resources.files("tinymorph.steering") / "csrc"
    return sorted((f.name, f.read_bytes()) for f in folder.iterdir() if f.name.endswith((".c", ".h")))


def compiler() -> str | None:
    """The C compiler kernels are built with: $CC, else the first of cc, gcc, clang on PATH."""
    return next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)


def compile_library(cc: str, sources: list[str], flags: list[str], target: Path) -> subprocess.CompletedProcess:
    """One build of `sources` into the shared library `target` with `OPTIMIZE` and `flags`."""
    cmd = [cc, *OPTIMIZE, *flags, "-shared", "-fPIC", *sources, "-o", str(target), "-lm"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _build() -> Path:
    sources = _sources()
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    digest = hashlib.sha256((_machine_id() + " ".join(OPTIMIZE)).encode())
    for name, text in sources:
        digest.update(name.encode() + text)
    target = _cache_dir() / f"tinymorph-kernels-{digest.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        paths = []
        for name, text in sources:
            (Path(tmp) / name).write_bytes(text)
            if name.endswith(".c"):
                paths.append(str(Path(tmp) / name))
        built = Path(tmp) / target.name
        errors = ""
        for flags in (["-fopenmp", "-march=native"], ["-fopenmp"], ["-march=native"], []):
            run = compile_library(cc, paths, flags, built)
            if run.returncode == 0:
                break
            errors = run.stderr.strip()[-300:]
        else:
            raise RuntimeError(f"{cc} failed: {errors}")
        os.replace(built, target)  # atomic: another process may be building it too
    return target


def _machine_id() -> str:
    """What a -march=native build depends on: a cache dir shared by machines with other CPUs must not
    hand one of them a build with instructions it lacks."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = "".join(line for line in fh if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        pass
    return f"{platform.machine()}|{platform.node()}|{platform.processor()}|{cpu}"


def _cache_dir() -> Path:
    env = os.environ.get("TINYMORPH_CACHE_DIR")
    if env:
        return Path(env) / "kernels"
    import platformdirs

    return Path(platformdirs.user_cache_dir("tinymorph")) / "kernels"
