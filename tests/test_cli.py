"""The `tinymorph` CLI as a user runs it: real subprocesses, real exit codes and messages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("tinymorph", path=str(Path(sys.executable).parent))
    return subprocess.run([exe, *args], input=stdin, text=True,
                          capture_output=True, timeout=600, env=env)


def test_complete_json_on_tiny_model(tiny_model_dir, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("First line.\nThe second line is where 🎉 we stop", encoding="utf-8")
    out = run("complete", str(doc), "--at", "2:20", "--max-tokens", "5", "--stop", "none", "--json",
              "--model", str(tiny_model_dir), "--dtype", "float32")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["timings"]["tokens_generated"] == 5
    assert result["timings"]["tokens_prefilled"] > 3 and result["timings"]["ttft_ms"] > 0
    assert result["stop_reason"] == "max-tokens"


def test_complete_reads_stdin_and_prints_timings(tiny_model_dir):
    out = run("complete", "-", "--max-tokens", "3", "--stop", "none", "--model", str(tiny_model_dir),
              "--quiet", stdin="Once upon a time")
    assert out.returncode == 0, out.stderr
    assert "ttft" in out.stderr and "tok/s" in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("complete", "/no/such/file.txt"), "no such file"),
        (("complete", "-", "--at", "9:1"), "past the end"),
        (("complete", "-", "--at", "x"), "expected LINE:COL"),
        (("complete", "-", "--model", "/no/such/model"), "not found"),
        (("complete", "-", "--model", "nobody/not-a-cached-model"), "not in the local Hugging Face cache"),
        (("complete", "-", "--max-tokens", "0"), "max_tokens"),
        (("sae", "train", "README.md", "--out", "/tmp/x", "--device", "gpu0"), "not a torch device"),
        (("sae", "train", "README.md", "--out", "/tmp/x", "--device", "meta"), "only cpu and cuda"),
    ],
)
def test_friendly_errors(args, message):
    out = run(*args, stdin="hello")
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_hf_id_from_local_cache(tiny_model_dir, tmp_path):
    """An HF id resolves to a snapshot already in the local Hugging Face cache, without network."""
    snapshot = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    import os

    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = run("complete", "-", "--model", "acme/tiny-llama", "--max-tokens", "2", "--stop", "none", "--json",
              stdin="Hello there", env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["timings"]["tokens_generated"] == 2


def test_gguf_path_uses_the_converted_cache(default_model_dir):
    from tinymorph.steering.model import default_gguf_path, local_folder, resolve_source

    source = resolve_source(str(default_gguf_path()))
    assert source.is_gguf
    assert local_folder(str(default_gguf_path())) == default_model_dir


def test_model_info_json():
    out = run("model", "info", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["layers"] == 30 and info["d_model"] == 576 and info["vocab"] == 49152


def test_bench_writes_table_json_and_plot(tiny_model_dir, tmp_path):
    out = run("bench", "--quick", "--sizes", "32,64", "--keystrokes", "4", "--no-llama-cpp", "--quiet",
              "--model", str(tiny_model_dir), "--dtype", "float32", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "tinymorph" in out.stdout and "transformers" in out.stdout and "bandwidth achieved" in out.stdout
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = {(r["backend"], r["tokens"]): r for r in data["rows"]}
    assert set(rows) == {("tinymorph", 32), ("tinymorph", 64), ("transformers", 32), ("transformers", 64)}
    assert all(r["cold_ttft_ms"] > 0 and r["keystroke_p95_ms"] >= r["keystroke_p50_ms"] for r in rows.values())
    assert data["decode"]["tinymorph"]["tokens_per_s"] > 0
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_steer_eval_quick_writes_table_json_and_plot(tiny_model_dir, tmp_path):
    """Every method of the eval runs end to end (the tiny model's hit rates mean nothing; the shapes do)."""
    env = {**os.environ, "TINYMORPH_CACHE_DIR": str(tmp_path / "cache")}
    out = run("steer", "eval", "--quick", "--concepts", "sea,formal", "--strengths", "1",
              "--model", str(tiny_model_dir), "--dtype", "float32", "--out", str(tmp_path), env=env)
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "steer-eval.json").read_text())
    methods = {(r["method"], r["strength"]) for r in data["results"]}
    assert {("unsteered", None), ("prompting", None), ("examples", 1.0)} <= methods
    # a random model may write the same text with and without a description: then no concept vector
    # can be made, which the eval says instead of dying or reporting an empty row
    assert ("described", 1.0) in methods or "does not change the model's activations" in out.stderr
    assert all(r["n"] == 12 and r["perplexity"] > 0 for r in data["results"])
    # "repeating" counts the continuations with any repeated 3-gram: nonzero exactly where rep3 is
    assert all(0 <= r["repeating"] <= 1 and (r["repeating"] > 0) == (r["rep3"] > 0) for r in data["results"])
    assert data["config"]["concepts"] == ["sea", "formal"]
    assert "unsteered" in out.stdout and (tmp_path / "steer-eval.png").stat().st_size > 1000
    # the default SAE is made for another width than the tiny model: search has nothing to steer
    assert not data["search_top1"]


def test_steer_eval_on_the_held_out_concept_set_and_a_broken_one(tiny_model_dir, tmp_path):
    """The held-out and strict sets (other concepts, the main set's prompts) run by name; a file that is no
    concept set is a one-line error, exit 2."""
    from tinymorph.steering.steer_eval import load_eval_set

    main, held, strict = load_eval_set(), load_eval_set("heldout"), load_eval_set("strict")
    for other in (held, strict):
        assert len(other.concepts) >= 20 and other.prompts == main.prompts
    names = [{c.name for c in s.concepts} for s in (main, held, strict)]
    assert not names[0] & names[1] and not names[0] & names[2] and not names[1] & names[2]
    out = run("steer", "eval", "--quick", "--concept-set", "heldout", "--concepts", "cats", "--methods",
              "unsteered,prompting", "--model", str(tiny_model_dir), "--dtype", "float32", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "steer-eval.json").read_text())
    assert data["config"]["concept_set"] == "heldout" and data["config"]["concepts"] == ["cats"]
    broken = tmp_path / "broken.json"
    broken.write_text('{"concepts": [{"name": "x"}]}')
    out = run("steer", "eval", "--concept-set", str(broken), "--model", str(tiny_model_dir))
    assert out.returncode == 2 and "not a concept set" in out.stderr and "Traceback" not in out.stderr


def test_feature_on_concept_reads_the_phrase_and_what_it_fires_on():
    from tinymorph.steering.steer_eval import Concept, feature_on_concept

    sea = Concept("sea", "topic", "about the sea", "sea", ["sea", "wave", "ocean"]).pattern()
    assert feature_on_concept({"phrase": "ocean, tide"}, sea)
    assert feature_on_concept({"phrase": "harbour", "top_act_tokens": [" sea", " waves", "Sea", " ship"]}, sea)
    assert not feature_on_concept({"phrase": "q, put", "top_act_tokens": ["Q", " sea", " put", " bulb"]}, sea)
    assert not feature_on_concept({"phrase": "perl, thread", "promotes": ["sea"]}, sea)


def test_sae_train_writes_an_sae_the_engine_loads(tiny_model_dir, tmp_path):
    """`sae train` end to end on the tiny model (sae-lens underneath): the folder loads as an SAE,
    its cfg says cpu (where the engine runs it) and training.json records the run."""
    words = "the garden grows slowly while rain falls on the old stone wall and birds sing".split()
    text = "\n\n".join(" ".join(words[(i + j) % len(words)] for j in range(60)) for i in range(300))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    out = run("sae", "train", str(corpus), "--out", str(tmp_path / "sae"), "--model", str(tiny_model_dir),
              "--layer", "1", "--tokens", "20000", "--d-sae", "128", "--k", "8", "--device", "cpu")
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert (cfg["d_sae"], cfg["k"], cfg["device"]) == (128, 8, "cpu")
    meta = json.loads((tmp_path / "sae" / "training.json").read_text())
    assert (meta["device"], meta["layer"], meta["tokens"]) == ("cpu", 1, 20000)
    from tinymorph.steering.sae import load_sae

    sae = load_sae(tmp_path / "sae")
    assert (sae.d_in, sae.d_sae, sae.layer) == (64, 128, 1)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_sae_train_on_a_missing_gpu_is_one_line(tmp_path):
    out = run("sae", "train", "README.md", "--out", str(tmp_path / "x"), "--device", "cuda")
    assert out.returncode == 2
    assert "no CUDA GPU" in out.stderr and "Traceback" not in out.stderr
