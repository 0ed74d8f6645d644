#!/bin/bash
# 2-hour direct recipe, split like the chain's first stage: 1,000 steps at the default rates, then 4,000 at 0.3x.
set -e
cd /work/main
COMMON="--recipe multi --hidden-size 96 --intermediate-size 288 --lm-steps 600 --doc-tokens 192 \
  --mix needle:0,needle:3,needle:7,qa1,qa1,qa2,records_recall,records_recall --doc-mix 64,128,256 \
  --eval-tasks needle:0,needle:3,qa1,qa2,records_recall --perk {\"lora_rank\":16,\"shuffle_docs\":false} \
  --ranks 2 --eval-n 30 --dev-n 40"
python -m perk_fast.demo_train $COMMON --warmup-mix needle:0 --warmup-meta-steps 300 \
  --meta-steps 1000 --meta-lr 1e-3 --base-lr 3e-4 --lr-lr 5e-5 --icr-long-steps 2000 --dev-every 500 \
  --checkpoint-dir bench/results/demo_direct2a/ckpt \
  --out bench/results/demo_direct2a/assets --eval-out bench/results/demo_direct2a/eval \
  > bench/results/demo_direct2a/train.log 2>&1
python -m perk_fast.demo_train $COMMON --init-from bench/results/demo_direct2a/assets \
  --meta-steps 4000 --meta-lr 3e-4 --base-lr 9e-5 --lr-lr 1.5e-5 --icr-long-steps 8000 --dev-every 1000 \
  --checkpoint-dir bench/results/demo_direct2/ckpt \
  --out bench/results/demo_direct2/assets --eval-out bench/results/demo_direct2/eval \
  > bench/results/demo_direct2/train.log 2>&1
