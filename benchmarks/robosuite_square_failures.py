"""Where a NutAssemblySquare policy fails: roll a checkpoint out on fresh starts and sort each failure by
how far it got.

    python benchmarks/robosuite_square_failures.py --checkpoint benchmarks/runs/robosuite/<run>/checkpoints/last.safetensors \
        --task-override task.env_kwargs.action_mode=absolute --seed 300000 --episodes 30 --out benchmarks/robosuite_square_failures.json

Chunks are executed ``--action-horizon`` steps at a time (default: the head's own, as the evaluation does).
Starts begin at ``--seed`` (300000 by default: neither demo seeds 0.. nor the table's evaluation seeds 100000..).
Each episode gets one outcome:

- ``success``: the env's ``_check_success()``;
- ``no_grasp``: the nut never rose 5 cm above where it settled after reset (a pinch that slips lifts it less);
- ``dropped``: it rose that far, but its centre never came within 1.2 cm of the peg's axis;
- ``at_peg``: its centre came within 1.2 cm of the peg's axis, but it was not lowered down the peg.

This is a diagnostic, not a success figure: its starts are few and its rows say which checkpoint they read.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

SETTLE = 10  # steps: the nut drops onto the table after reset
RISE = 0.05  # m above the settled nut: carried (the expert carries it about 15 cm up)
NEAR = 0.012  # m from the peg's axis: the hole is around the peg (the expert's own test)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--task-override", action="append", default=[], help="extra task overrides (repeatable)")
    p.add_argument("--seed", type=int, default=300000)
    p.add_argument("--episodes", type=int, default=30)
    p.add_argument("--action-horizon", type=int, default=0, help="steps executed per chunk; 0: the head's")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    import rtpolicy.envs  # noqa: F401  (GL before torch's friends)
    from dagger import rollout  # this folder: one episode, chunks executed as the evaluation does

    from rtpolicy.checkpoint import load_policy
    from rtpolicy.envs import make_env
    from rtpolicy.factory import compose

    torch.set_num_threads(1)
    policy, _ = load_policy(args.checkpoint)  # EMA weights, eval mode
    if args.action_horizon:
        policy.action_horizon = args.action_horizon
    env = make_env(compose(["task=robosuite_square", *args.task_override]).task, seed=args.seed)
    layout = env._object_layout()
    nut_pos = layout["SquareNut_pos"]
    rs = env.robosuite_env
    expert = env.expert()  # rollout() labels every state with it; unused here
    rows = []
    for seed in range(args.seed, args.seed + args.episodes):
        steps, success = rollout(policy, env, expert, seed, ["object"])
        peg = np.asarray(rs.sim.data.body_xpos[rs.peg1_body_id])[:2]
        nut = steps["object"][:, nut_pos]  # (T, 3): the observation before each executed action
        zs = nut[:, 2]
        near = float(np.linalg.norm(nut[:, :2] - peg, axis=1).min())
        rose = float(zs[SETTLE:].max() - zs[:SETTLE].min())
        outcome = ("success" if success else "no_grasp" if rose < RISE else "at_peg" if near < NEAR else "dropped")
        rows.append({"seed": seed, "outcome": outcome, "steps": len(steps["action"]), "rose_m": round(rose, 4), "nearest_to_peg_m": round(near, 4)})
        print(json.dumps(rows[-1]), flush=True)
    env.close()
    counts = Counter(r["outcome"] for r in rows)
    summary = {"checkpoint": str(args.checkpoint), "action_horizon": policy.action_horizon, "episodes": len(rows),
               "counts": dict(counts), "rows": rows}
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
