"""robosuite env steps/s without and with robomimic's two cameras (agentview + robot0_eye_in_hand, 84x84).

    MUJOCO_GL=osmesa python benchmarks/robosuite_speed.py --steps 300 --rounds 3 --out benchmarks/robosuite_speed.json

Per task, one env without cameras and one with the two offscreen cameras (``rgb_agentview``,
``rgb_robot0_eye_in_hand`` at ``--size``) step the same uniform random actions (episodes of 200 steps,
resets counted in the time), ``--rounds`` times alternately (plain, cameras, plain, ...), so that the
ratio is measured side by side. Reports per task the median steps/s of each and their ratio; every
round's figure goes to the JSON. One process, one thread of stepping: a single env, not a vectorized
runner. Time it on an otherwise idle machine (on a shared one: under its CPU lock).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

CAMERAS = ["agentview", "robot0_eye_in_hand"]


def timed_steps(env, actions: np.ndarray, seed: int) -> float:
    """Steps/s over ``actions`` (T, 7) from the start of ``seed`` (resets when an episode ends are included)."""
    env.reset(seed=seed)
    t0 = time.perf_counter()
    for a in actions:
        _, _, terminated, truncated, _ = env.step(a)
        if terminated or truncated:
            env.reset()
    return len(actions) / (time.perf_counter() - t0)


def measure(task: str, steps: int, rounds: int, size: int, seed: int) -> dict[str, Any]:
    from rtpolicy.envs import make_env

    cfg = {"env": "robosuite", "name": task, "max_episode_steps": 200, "image_size": size}
    plain = make_env(cfg | {"obs_keys": ["state"]}, seed=seed)
    cams = make_env(cfg | {"obs_keys": ["state"] + [f"rgb_{c}" for c in CAMERAS]}, seed=seed)
    try:
        obs, _ = cams.reset(seed=seed)
        assert all(obs[f"rgb_{c}"].shape == (size, size, 3) for c in CAMERAS)
        rng = np.random.default_rng(seed)
        out: dict[str, list[float]] = {"no_cameras": [], "cameras": []}
        for r in range(rounds):
            actions = rng.uniform(-1, 1, size=(steps, 7))
            timed_steps(plain, actions[:5], seed + r)  # warm caches
            out["no_cameras"].append(timed_steps(plain, actions, seed + r))
            out["cameras"].append(timed_steps(cams, actions, seed + r))
    finally:
        plain.close()
        cams.close()
    ratios = [p / c for p, c in zip(out["no_cameras"], out["cameras"])]
    return {"task": task, "rounds": out, "no_cameras": float(np.median(out["no_cameras"])),
            "cameras": float(np.median(out["cameras"])), "slowdown": float(np.median(ratios)),
            "camera_ms_per_step": float(np.median([1e3 / c - 1e3 / p for p, c in zip(out["no_cameras"], out["cameras"])]))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="Lift,Stack,PickPlaceCan,NutAssemblySquare")
    p.add_argument("--steps", type=int, default=300, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, default=84, help="camera frame side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    import rtpolicy.envs  # noqa: F401  (first: picks MuJoCo's GL backend before robosuite's import loads it)
    from rtpolicy.envs.robosuite.env import import_robosuite

    robosuite = import_robosuite()
    import mujoco

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = ""
    result: dict[str, Any] = {
        "command": "python benchmarks/robosuite_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": commit, "mujoco_gl": os.environ["MUJOCO_GL"], "mujoco": mujoco.__version__,
        "robosuite": robosuite.__version__, "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg(), "steps": args.steps, "rounds": args.rounds, "image_size": args.size,
        "cameras": CAMERAS, "tasks": [],
    }
    for task in args.tasks.split(","):
        row = measure(task, args.steps, args.rounds, args.size, args.seed)
        result["tasks"].append(row)
        print(f"{task:18s} {row['no_cameras']:6.0f} steps/s without cameras, {row['cameras']:5.1f} with 2x{args.size}px "
              f"({row['slowdown']:.1f}x slower, +{row['camera_ms_per_step']:.1f} ms/step)", flush=True)
    result["loadavg_end"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
