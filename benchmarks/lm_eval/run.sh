#!/usr/bin/env bash
# lm-eval's local-completions against a running `gpupool serve` (issue 33): a loglikelihood
# task (multiple choice, scored through /v1/completions with echo + logprobs, max_tokens 1)
# and a generate_until task, both from the JSON lines files here (no download). Run from the
# repository root with lm-eval installed in its own venv (install torch==2.13.0 first, then
# "lm_eval[api]" and transformers):
#   bash benchmarks/lm_eval/run.sh [BASE_URL] [MODEL] [TOKENIZER_FOLDER]
set -euo pipefail
URL=${1:-http://127.0.0.1:8000/v1/completions}
MODEL=${2:-smollm2}
TOKENIZER=${3:-${GPUPOOL_HOME:-$HOME/.cache/gpupool}/models/smollm2-135m-instruct}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
lm_eval --model local-completions \
  --model_args "model=$MODEL,base_url=$URL,num_concurrent=1,max_retries=1,tokenized_requests=False,tokenizer_backend=huggingface,tokenizer=$TOKENIZER" \
  --tasks gpupool_local_mc,gpupool_local_gen --include_path benchmarks/lm_eval --limit 10
