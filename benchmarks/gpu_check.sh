#!/usr/bin/env bash
# The benchmark in bf16 on one GPU: GPT-2 small and a ~1B Llama (random init), ezmia's
# scoring path against the reference code's path, with the GPU's matmul peak measured in the
# same run. Goals: >= 50% MFU (bf16) and >= 10x the baseline's throughput.
#
#   bash benchmarks/gpu_check.sh            # results in $OUT, else benchmarks/gpu-results/
#
# Needs torch (CUDA), transformers, peft, tokenizers and pyarrow; imports neither ray nor vllm.
# Finishes in under 8 minutes (killed at 7.5); results are written after each model, so a
# cut-short run still leaves the models it finished.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=true
PYTHON=${PYTHON:-python}
OUT_DIR=${OUT:-benchmarks/gpu-results}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ezmia-gpu-bench-XXXX")
trap 'rm -rf "$WORK"' EXIT

"$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device visible"'
timeout 450 "$PYTHON" benchmarks/run.py \
  --device cuda --dtype bfloat16 --batch-size 256 --repeats 1 \
  --models gpt2-small,llama-1b --targets full,lora \
  --sequences gpt2-small=8192,llama-1b=4096 --oracle-sequences 16 \
  --workdir "$WORK" --out "$OUT_DIR"
