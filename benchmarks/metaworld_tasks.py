"""Single-task Meta-World success of a policy trained from scripted demos (state observations).

    python benchmarks/metaworld_tasks.py --out benchmarks/metaworld_tasks.json [--tasks reach push ...] [override ...]

Trains one policy per task with train.py's config plus the given Hydra overrides (default: the
DDPM-100 head), evaluates >= 50 episodes each, prints one table and writes JSON rows
(head, task, episodes, success, ci95, chunk_ms_p50, train_seconds). Resumable: a task whose run
already has results.json is read back, not retrained.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "osmesa")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from rtpolicy.factory import compose  # noqa: E402
from rtpolicy.training import train  # noqa: E402

TASKS = ["reach", "push", "pick_place", "drawer_open", "button_press_topdown"]
DEFAULT = ["policy.sampler=ddpm", "policy.num_inference_steps=100", "eval.episodes=50", "eval.num_envs=2"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--out", default="benchmarks/metaworld_tasks.json")
    ap.add_argument("--runs", default="benchmarks/runs/metaworld_tasks")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every task")
    args = ap.parse_args()
    rows = []
    for task in args.tasks:
        run_dir = Path(args.runs) / task
        done = run_dir / "results.json"
        if done.exists():
            res = json.loads(done.read_text())
        else:
            over = [f"task={task}", *DEFAULT, *args.overrides, f"run_dir={run_dir}", f"resume={(run_dir / 'checkpoints' / 'last.safetensors').exists()}"]
            cfg = compose(over)
            res = train(cfg)
        rows.append({"head": res["head"], "task": task, "episodes": res["episodes"], "success": res["success"], "ci95": res["ci95"],
                     "chunk_ms_p50": res["chunk_ms_p50"], "train_seconds": res["train_seconds"]})
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"\n{'task':24s} {'episodes':>8s} {'success':>8s} {'95% CI':>13s} {'chunk ms':>9s} {'train s':>8s}")
    for r in rows:
        print(f"{r['task']:24s} {r['episodes']:8d} {r['success']:8.2f}  [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] "
              f"{r['chunk_ms_p50']:9.1f} {r['train_seconds']:8.0f}")


if __name__ == "__main__":
    main()
