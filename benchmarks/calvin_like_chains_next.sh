#!/bin/bash
# Issue 13, second session: the rows still to measure on the shared 2-core CPU machine, one locked job each
# (collect ~2 min; each run ~10 min training at 3000 steps + ~10 min evaluating 200 chains and 15 block tasks x 10).
# Usage: bash benchmarks/calvin_like_chains_next.sh [JOB ...]   (default: post goal expert lang lang_only seeds)
#   post      - + rotate expert lets go at once, block goal, 10 post-success steps (store chains_goal_post)
#   goal      - the same without the post-success steps                        (store chains_goal)
#   expert    - the same store without goal_rel (the expert change alone)
#   lang      - language instead of the task id (lang_emb; target_rel / goal_rel still from the subtask)
#   lang_only - objects_rel + lang_emb only
#   seeds     - training seeds 1 and 2 of "post"
# Each run writes benchmarks/calvin_like_chains_rows/<name>.json; the table is rebuilt after each.
set -eu
cd "$(dirname "$0")/.."
export MUJOCO_GL=${MUJOCO_GL:-osmesa} HF_HUB_OFFLINE=1
D=data/calvin_like/ablation
B=".venv/bin/python benchmarks/calvin_like_chains.py"
L="flock /tmp/cpu.lock nice -n 5"
G="+ rotate expert lets go at once, block goal (goal_rel)"
P="+ rotate expert lets go at once, block goal, 10 post-success steps"
store() { [ -d "$D/$1.zarr" ] || $L $B collect --dir $D --stores "$1" --workers 2; }
run() {  # name setting seed
  [ -f "benchmarks/calvin_like_chains_rows/$1.json" ] && return 0
  $L $B run --setting "$2" --seed "$3" --steps 3000 --episodes 200 --dir $D --run-dir "runs/calvin_abl/$1" --device cpu \
    --out "benchmarks/calvin_like_chains_rows/$1.json" --single-tasks 10
  $B table benchmarks/calvin_like_chains_rows/*.json --json benchmarks/calvin_like_chains.json \
    --extra benchmarks/calvin_like_chains_experts.json
}
for job in "${@:-post goal expert lang lang_only seeds}"; do
  for j in $job; do
    case $j in
      post) store chains_goal_post; run goal_post_s0 "$P" 0 ;;
      goal) store chains_goal; run goal_s0 "$G" 0 ;;
      expert) store chains_goal; run goal_expert_only_s0 "+ rotate expert lets go at once" 0 ;;
      lang) store chains_goal_lang; run goal_lang_s0 "+ rotate expert lets go at once, block goal, language instead of task id" 0 ;;
      lang_only) store chains_goal_lang; run lang_only_s0 "language only (objects_rel + lang_emb, no task-derived slots)" 0 ;;
      seeds) store chains_goal_post; run goal_post_s1 "$P" 1; run goal_post_s2 "$P" 2 ;;
      *) echo "unknown job $j" >&2; exit 2 ;;
    esac
  done
done
