"""Shared fixtures: the real default model (converted once) and a tiny random-weight Llama."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# tests run the real server/CLI as subprocesses: make sure they find this interpreter's scripts
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")


def _isolated_cache() -> None:
    """Concept vectors, their texts and calibrations that tests make (often on random models, some from
    fuzzed requests) go to a temporary cache, never the user's; converted models stay shared (the
    default model's conversion takes 20-40 s). Set before any server or CLI subprocess starts."""
    import atexit
    import shutil
    import tempfile

    from tinymorph.steering.model import cache_root

    models = cache_root() / "models"
    models.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tinymorph-test-cache-"))
    (tmp / "models").symlink_to(models, target_is_directory=True)
    os.environ["TINYMORPH_CACHE_DIR"] = str(tmp)
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)


_isolated_cache()


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model as a plain HF folder (converted from its GGUF on first use)."""
    from tinymorph.steering.model import local_folder

    return local_folder("default")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> Path:
    """A 2-layer random Llama with the default tokenizer: real code paths, protocol-test speed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tinymorph.steering.model import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = load_tokenizer(default_model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_runtime(tiny_model_dir):
    """A shared `Runtime` on the tiny model with one torch thread (latency-bound; CI's two cores are
    shared with the test's own clients); torch's thread count is restored afterwards."""
    import torch

    from tinymorph.server.runtime import ModelSettings, Runtime

    threads = torch.get_num_threads()
    rt = Runtime()
    rt.load(ModelSettings(model=str(tiny_model_dir), dtype="float32", threads=1))
    assert rt.wait_ready(120), rt.message
    yield rt
    rt.scheduler.stop()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_http_server(tiny_runtime):
    """The HTTP API on a free loopback port, serving `tiny_runtime`."""
    from tinymorph.server.http_server import start_http_server

    handle = start_http_server(tiny_runtime, "127.0.0.1:0", None)
    yield handle
    handle.stop()
