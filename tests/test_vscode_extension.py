"""The VS Code extension's own unit tests (node --test on its plain modules), built from source."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

EXTENSION = Path(__file__).resolve().parents[1] / "editor-clients" / "vscode"


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
def test_vscode_extension_unit_tests():
    if not (EXTENSION / "node_modules").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=EXTENSION, check=True, timeout=600,
                       capture_output=True)
    out = subprocess.run(["npm", "test"], cwd=EXTENSION, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "# fail 0" in out.stdout and "# pass" in out.stdout
