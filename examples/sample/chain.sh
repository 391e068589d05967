#!/usr/bin/env bash
# The whole pipeline on the sample data, from the repository root:
#   bash examples/sample/chain.sh            (runs/sample/{sft,rm,grpo,eval}; add --overwrite true to redo)
# sft: a tiny Llama (config only, examples/sample/base) learns single-digit sums from 500 answers,
# 30% of them wrong; rm: a reward model from 400 preference pairs; train: GRPO against it;
# eval: the trained policy against the SFT model on the 20 held-out problems, 8 samples each.
set -euo pipefail
extra=("$@")
time ppo-fast sft --model examples/sample/base --data examples/sample/sft.jsonl \
    --output-dir runs/sample --run-name sft "${extra[@]}"
time ppo-fast rm --model runs/sample/sft/model --data examples/sample/prefs.jsonl \
    --output-dir runs/sample --run-name rm "${extra[@]}"
time ppo-fast train --config examples/sample/train.yaml --output-dir runs/sample --run-name grpo "${extra[@]}"
time ppo-fast eval --policy runs/sample/grpo/final_policy --reference runs/sample/sft/model \
    --prompts examples/sample/eval_prompts.jsonl --samples-per-prompt 8 --max-new-tokens 12 \
    --reward runs/sample/rm/model --gold examples/sample/reward.py:exact_sum \
    --output-dir runs/sample --run-name eval "${extra[@]}"
