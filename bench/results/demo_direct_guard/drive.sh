#!/usr/bin/env bash
# demo_direct's recipe (README "The issue's 2 hours in one run") with the gradient-spike guard on.
set -euo pipefail
cd "$(dirname "$0")/../../.."
export PYTHONPATH="$PWD"
D=bench/results/demo_direct_guard
python -m perk_fast.demo_train --recipe multi --hidden-size 96 --intermediate-size 288 --lm-steps 600 \
  --doc-tokens 192 --mix needle:0,needle:3,needle:7,qa1,qa1,qa2,records_recall,records_recall \
  --doc-mix 64,128,256 --warmup-mix needle:0 --warmup-meta-steps 300 \
  --eval-tasks needle:0,needle:3,qa1,qa2,records_recall \
  --perk '{"lora_rank":16,"shuffle_docs":false,"grad_spike_factor":10}' \
  --meta-steps 5000 --meta-lr 1e-3 --base-lr 3e-4 --lr-lr 5e-5 --icr-long-steps 10000 --ranks 2 \
  --eval-n 30 --dev-n 40 --dev-every 1000 --checkpoint-dir $D/ckpt \
  --out $D/assets --eval-out $D/eval "$@"   # "$@": e.g. --resume (the PERK stage from ckpt/last)
