#!/bin/bash
# Issue 13: the runs behind benchmarks/RESULTS.md's CALVIN-style table (third session), one job per name.
# Each run writes benchmarks/calvin_like_chains_rows/<name>.json; the table is rebuilt after each.
# Usage: bash benchmarks/calvin_like_chains_next.sh [JOB ...]   (default: every job, in this order)
#   post6000  - the best state recipe, training seeds 0 1 2, 6000 steps (store chains_goal_post)
#   x2        - the same recipe at 3000 steps on twice the data (store chains_goal_post_x2)
#   lang      - language instead of the task id on the x2 store (target_rel / goal_rel still from the subtask)
#   lang_only - objects_rel + lang_emb only, x2 store
#   camera    - static + gripper cameras (64 px), proprio, language; no object state (store chains_cam)
#   mt10      - MT10 with the same normalizer, 3 training seeds, unseen evaluation seeds (benchmarks/success.py)
#   one_change    - 3000-step rows that differ from the baseline (previous experts, state, 2 obs steps, no hygiene)
#                   in one thing each (needs OLD_EXPERTS=<the previous experts.py>: git show 06b98e0:rtpolicy/envs/calvin_like/experts.py)
#   leave_one_out - 3000-step rows that take one thing out of the 3.23 recipe (store chains_goal_post)
#   nodart    - the recipe without DART (store chains_goal_post_clean) and with DART, 3000 steps, training seeds 0 1 2
#   slots     - object slots instead of target_rel / goal_rel: task id (seeds 0 1 2), language (seed 0)
# A 6000-step run takes ~20 min of one core; the whole list is ~4 hours of one core.
set -eu
cd "$(dirname "$0")/.."
export MUJOCO_GL=${MUJOCO_GL:-osmesa} HF_HUB_OFFLINE=1
D=data/calvin_like/ablation
B="python benchmarks/calvin_like_chains.py"
P="+ rotate expert lets go at once, block goal, 10 post-success steps"
store() { [ -d "$D/$1.zarr" ] || $B collect --dir $D --stores "$1" --workers "${WORKERS:-2}" ${OLD_EXPERTS:+--old-experts "$OLD_EXPERTS"}; }
run() {  # name setting seed steps [single-task episodes]
  [ -f "benchmarks/calvin_like_chains_rows/$1.json" ] && return 0
  $B run --setting "$2" --seed "$3" --steps "$4" --episodes 200 --dir $D --run-dir "runs/calvin_abl/$1" --device cpu \
    --out "benchmarks/calvin_like_chains_rows/$1.json" --single-tasks "${5:-10}"
  $B table benchmarks/calvin_like_chains_rows/*.json --json benchmarks/calvin_like_chains.json \
    --extra benchmarks/calvin_like_chains_experts.json
}
for j in ${@:-post6000 x2 lang lang_only camera mt10}; do
  case $j in
    post6000) store chains_goal_post; for s in 0 1 2; do run goal_post_s${s}_6000 "$P" $s 6000; done ;;
    x2) store chains_goal_post_x2; run x2_s0 "+ twice the data" 0 3000 ;;
    lang) store chains_goal_post_x2; run x2_lang_s0 "+ twice the data, language instead of task id" 0 3000 ;;
    lang_only) store chains_goal_post_x2
      run x2_lang_only_s0 "language only, twice the data (objects_rel + lang_emb, no task-derived slots)" 0 3000 ;;
    camera) store chains_cam; run cam_s0 "camera (static + gripper 64 px, proprio, language; no object state)" 0 3000 0 ;;
    mt10) python benchmarks/success.py --out benchmarks/success_issue13_mt10.json --runs runs/success_issue13 \
            --heads truncated --steps 4000 --episodes 50 --num-envs 2 --threads 1 --train-seeds 3 --eval-seed 400000 ;;
    one_change)
      store old_keys; run oc_features_s0 "one change: features (objects_rel + target_rel + goal_rel)" 0 3000 0
      store old; run oc_baseline_s0 baseline 0 3000 0
      run oc_normalizer_s0 +normalizer 0 3000 0
      run oc_obs1_s0 "baseline, 1 obs step" 0 3000 0
      store new_clean; run oc_experts_s0 "one change: re-planning experts" 0 3000 0
      store old_post; run oc_post_s0 "one change: 10 post-success steps" 0 3000 0
      store old_chains; run oc_chains_s0 "one change: chain data" 0 3000 0
      store old_dart; run oc_dart_s0 "one change: DART 0.2" 0 3000 0 ;;
    leave_one_out) store chains_goal_post
      run loo_nogoal_s0 "best without goal_rel" 0 3000 0
      run loo_notarget_s0 "best without target_rel" 0 3000 0
      run loo_nohyg_s0 "best without normalizer hygiene" 0 3000 0
      run loo_obs2_s0 "best with 2 obs steps" 0 3000 0
      store chains_goal_post_clean; run loo_nodart_s0 "best without DART" 0 3000 0
      store goal_post_nochains; run loo_nochains_s0 "best without chain data" 0 3000 0
      store chains_goal; run loo_nopost_s0 "best without post-success steps" 0 3000 0 ;;
    nodart) store chains_goal_post_clean; for s in 0 1 2; do run loo_nodart_s$s "best without DART" $s 3000 0; done
      store chains_goal_post; for s in 1 2; do run goal_post_s$s "$P" $s 3000 0; done ;;  # seed 0: goal_post_s0
    slots) store chains_goal_post
      for s in 0 1 2; do run slots_task_s$s "task id, object slots, no target_rel / goal_rel" $s 3000 0; done
      store chains_goal_post_clean; run slots_nodart_s0 "task id, object slots, no target_rel / goal_rel, without DART" 0 3000 0
      store chains_goal_post_x2
      run x2_lang_slots_s0 "language only, object slots (objects_rel + lang_emb, twice the data)" 0 3000 0
      run x2_words_slots_s0 "language only, object slots, word embeddings (objects_rel + lang_tokens, twice the data)" 0 3000 0
      for s in 0 1 2; do run x2_lang_slots_norm_s$s "language only, object slots, normalized language token (twice the data)" $s 3000 0; done ;;
    *) echo "unknown job $j" >&2; exit 2 ;;
  esac
done
