#!/bin/bash
# Issue 13 ablation in one command on a 16-core GPU machine (no network): the four demo stores, then every
# setting of benchmarks/calvin_like_chains.py (two training seeds each, three for +chains) trained and
# evaluated in parallel (200 chains each), each job on one CPU thread and the GPU.
# The training steps are the same for every job: as many as fit the time left (at most STEPS_MAX), measured
# by a 150-step run of every job under the same load.
#
# Needs, in the working tree: .whl/ (cp312 wheels: mujoco, numcodecs, google-crc32c, zarr, donfig, diffusers,
# hydra-core, omegaconf, gymnasium, farama-notifications, importlib_metadata), .site/antlr4 (antlr4-python3-runtime
# 4.9.3, pure Python, no wheel on PyPI) and .calvin_old/old_experts.py (git show 06b98e0:rtpolicy/envs/calvin_like/experts.py).
# Writes $OUT/rows.tgz (one JSON per job + logs) and $OUT/summary.txt.
set -u
T0=$(date +%s)
DEADLINE=$((T0 + ${BUDGET_S:-550}))
STEPS_MAX=${STEPS_MAX:-6000}
OUT=${OUT:-/tmp/calvin_out}
W=${W:-/tmp/calvin_abl}
mkdir -p "$OUT" "$W/rows" "$W/logs" "$W/timing"
PY=${PY:-python3}  # smoke test elsewhere: PY=.venv/bin/python NO_PIP=1 DEVICE=cpu TSTEPS=3 EPISODES=2 SINGLE=1 STEPS_MAX=20 COLLECT_EXTRA="--demos 2 --max-chains 4"
DEVICE=${DEVICE:-cuda}
EPISODES=${EPISODES:-200}
SINGLE=${SINGLE:-10}
TSTEPS=${TSTEPS:-150}
[ -n "${NO_PIP:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.site:$PWD MUJOCO_GL=${MUJOCO_GL:-disable} OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1
B="$PY benchmarks/calvin_like_chains.py"
finish() {
  tar -czf "$OUT/rows.tgz" -C "$W" --exclude='timing/run*' rows logs timing 2>/dev/null
  { echo "elapsed $(( $(date +%s) - T0 )) s, steps ${STEPS:-?}"
    for f in "$W"/rows/*.json; do [ -e "$f" ] && $PY -c "import json; r = json.load(open('$f'))
print(r['setting'], r['seed'], r['avg_chain_length'], r['success_at'], r['train_seconds'], r.get('single_task'))"; done
  } > "$OUT/summary.txt" 2>&1
}
trap finish EXIT
$PY -c "import mujoco, zarr, hydra, diffusers, gymnasium, torch, rtpolicy.envs.calvin_like, rtpolicy.training, rtpolicy.datasets.collect
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'mujoco', mujoco.__version__)" || exit 1
echo "setup $(( $(date +%s) - T0 )) s"

for s in old new dart chains; do
  $B collect --dir "$W/data" --workers 4 --old-experts .calvin_old/old_experts.py --stores $s ${COLLECT_EXTRA:-} > "$W/logs/collect_$s.log" 2>&1 &
done
wait
cat "$W"/logs/collect_*.log | grep -v Warning
echo "stores $(( $(date +%s) - T0 )) s"

JOBS=("baseline 0" "baseline 1" "+normalizer 0" "+normalizer 1" "+features 0" "+features 1"
      "+reactive experts 0" "+reactive experts 1" "+DART 0" "+DART 1" "+chains 0" "+chains 1" "+chains 2"
      "+chains, 4 actions per chunk 0" "+chains, 4 actions per chunk 1")
[ -n "${ONLY:-}" ] && IFS=';' read -r -a JOBS <<< "$ONLY"  # e.g. ONLY="baseline 0;+chains 0"
i=0
for j in "${JOBS[@]}"; do
  set -- $j; seed=${!#}; setting=${j% *}
  $B run --setting "$setting" --seed "$seed" --steps $TSTEPS --episodes 0 --dir "$W/data" --run-dir "$W/timing/run$i" \
    --device "$DEVICE" --out "$W/timing/t$i.json" > "$W/logs/timing_$i.log" 2>&1 &
  i=$((i + 1))
done
wait
PER=$($PY -c "import json,glob; print(max(json.load(open(f))['train_seconds'] for f in glob.glob('$W/timing/t*.json')) / $TSTEPS)")
NOW=$(date +%s)
STEPS=$($PY -c "print(min($STEPS_MAX, max(500, int(($DEADLINE - $NOW - 210) / ($PER * 1.15)) // 250 * 250)))")
echo "timing $(( NOW - T0 )) s: $PER s/step under load -> $STEPS steps"

i=0
for j in "${JOBS[@]}"; do
  set -- $j; seed=${!#}; setting=${j% *}
  extra=""; [ "$seed" = 0 ] && case "$setting" in +features|+DART|+chains) extra="--single-tasks $SINGLE";; esac
  name=$(echo "$setting" | tr -c 'a-zA-Z0-9\n' '_')_$seed
  timeout $((DEADLINE - $(date +%s))) $B run --setting "$setting" --seed "$seed" --steps "$STEPS" --episodes "$EPISODES" \
    --dir "$W/data" --run-dir "$W/runs/$name" --device "$DEVICE" --out "$W/rows/$name.json" $extra > "$W/logs/run_$name.log" 2>&1 &
  i=$((i + 1))
done
wait
echo "done $(( $(date +%s) - T0 )) s"
grep -h '"avg_chain_length"' "$W"/logs/run_*.log | head -20
