#!/usr/bin/env bash
# The GPU check: ezmia's torch backend (both passes, bf16) on 1B- and 8B-shaped random-init
# Llama models (128k vocabulary) against the paper's scoring path on the same GPU, MFU
# against the GPU's bf16 matmul peak measured in the same run (benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh            # results: benchmarks/RESULTS.md (GPU section)
#                                           #          and benchmarks/gpu_check.json
#   bash benchmarks/gpu_check.sh --smoke    # a tiny model on CPU: checks the script only
#   OUT=dir bash benchmarks/gpu_check.sh    # results in dir instead
#
# Needs torch (CUDA), transformers, peft, tokenizers and pyarrow; imports neither Ray nor
# vLLM and needs no network. ~1.5 min for the 1B model and ~5 min for the 8B one on an
# H100-class GPU (estimate); results are written after each model, and the run is killed
# after $TIMEOUT seconds (default 570), so a cut-short run keeps the models it finished.
# A GPU too small for two bf16 copies of the 8B model (< ~40 GB) skips it and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=true
PYTHON=${PYTHON:-python}
ARGS=("$@")
if [[ -n "${OUT:-}" ]]; then ARGS+=(--out "$OUT"); fi

if [[ " $* " != *" --smoke "* ]]; then
  "$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device visible"'
fi
timeout "${TIMEOUT:-570}" "$PYTHON" benchmarks/gpu_check.py "${ARGS[@]}"
