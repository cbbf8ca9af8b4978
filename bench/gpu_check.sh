#!/usr/bin/env bash
# One prepared GPU check (issue 14): training MFU and curation throughput on one H100/H200.
#
#   bash bench/gpu_check.sh                 # on the GPU machine: < 8 minutes
#   bash bench/gpu_check.sh --cpu --tiny    # the same path on CPU with the tiny model (its test)
#
# Needs python with torch and transformers (the device machine's PyTorch image has both). What is
# missing (deepspeed, peft, accelerate, pydantic, PyYAML, aiohttp ...) is installed offline from
# wheels/sdists in $HUMPBACK_WHEELS (default .cache/gpu-wheels; fill it beforehand where a registry
# is reachable with `bash bench/gpu_check.sh --download`, for the GPU machine's Python version), and
# this checkout runs from PYTHONPATH. Nothing is downloaded on the GPU machine.
#
# 1. Training: bench/train_throughput.py --gpu: a random ~1B Llama (TinyLlama's shape) in bf16,
#    ZeRO-2, attention auto (FlashAttention-2 where installed, else SDPA; packed rows example by
#    example), gradient checkpointing, the seed pairs' real lengths, padded beside packed;
#    prints tokens/s and MFU (goal: >= 45 % packed).
# 2. Curation: bench/curation_throughput.py --gpu: the in-process transformers engine on the same
#    model shape, ~1k-token prompts, logprobs vs generate mode in pairs/s (goal >= 3x), and the
#    logprobs prefill rate as a fraction of the bf16 peak (goal >= 50 %).
# Results: bench/results/gpu_check/*.json (and $OUT/ when set, for the device runner).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=gpu SIZE=1b
for arg in "$@"; do
  case "$arg" in
    --cpu) MODE=cpu ;;
    --tiny) SIZE=tiny ;;
    --download) MODE=download ;;
    *) echo "usage: $0 [--cpu] [--tiny] | --download" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python}
WHEELS=${HUMPBACK_WHEELS:-.cache/gpu-wheels}
# What the training and curation paths import beyond torch/transformers (and their own deps), by name
# only: torch, transformers, numpy and friends come from the image.
PURE=(deepspeed hjson ninja py-cpuinfo einops peft accelerate annotated-types typing-inspection typing-extensions
      aiosignal aiohappyeyeballs attrs)
BINARY=(pydantic pydantic-core pyyaml msgpack psutil aiohttp multidict yarl frozenlist propcache)
NEEDED=("${PURE[@]}" "${BINARY[@]}")

if [ "$MODE" = download ]; then
  # For the GPU machine's interpreter (GPU_PYTHON_VERSION, default 3.12) on x86-64 Linux.
  mkdir -p "$WHEELS"
  "$PY" -m pip download --no-deps --dest "$WHEELS" "${PURE[@]}"
  "$PY" -m pip download --no-deps --dest "$WHEELS" --only-binary=:all: --platform manylinux2014_x86_64 \
    --python-version "${GPU_PYTHON_VERSION:-3.12}" "${BINARY[@]}"
  du -sh "$WHEELS"
  exit 0
fi

export PYTHONPATH="$PWD:$PWD/testing${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, not installed
missing=()
for mod in deepspeed peft accelerate pydantic yaml aiohttp; do
  "$PY" -c "import $mod" 2>/dev/null || missing+=("$mod")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing offline from $WHEELS: ${missing[*]}" >&2
  "$PY" -m pip install --quiet --no-deps --no-index --find-links "$WHEELS" "${NEEDED[@]}"
fi

RESULTS=bench/results/gpu_check
mkdir -p "$RESULTS"
if [ "$MODE" = gpu ]; then
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
  TRAIN_ARGS=(--gpu --model-size "$SIZE" --zero 2 --attention auto --steps 30 --warmup 5 --batch 16 --per-device-batch 16)
  CURATE_ARGS=(--gpu --model-size "$SIZE" --pairs 186 --generate-pairs 64 --batch-size 32 --response-chars 4000)
else
  TRAIN_ARGS=(--model-size "$SIZE" --zero 2 --attention auto --steps 4 --warmup 1 --batch 4 --per-device-batch 4 --seq-len 512)
  CURATE_ARGS=(--model-size "$SIZE" --device cpu --skip-vllm --pairs 8 --max-tokens 8 --batch-size 4 --response-chars 400)
fi
start=$(date +%s)
"$PY" bench/train_throughput.py "${TRAIN_ARGS[@]}" --out "$RESULTS/train_throughput.json"
"$PY" bench/curation_throughput.py "${CURATE_ARGS[@]}" --out "$RESULTS/curation_throughput.json"
echo "gpu_check ($MODE, $SIZE): $(( $(date +%s) - start ))s; results in $RESULTS"
if [ -n "${OUT:-}" ]; then cp "$RESULTS"/*.json "$OUT"/; fi
