"""Shared fixtures: the real default model (converted once) and a tiny random-weight Llama."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# tests run the real server/CLI as subprocesses: make sure they find this interpreter's scripts
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")


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
