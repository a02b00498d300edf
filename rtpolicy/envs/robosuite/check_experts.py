"""Measure the scripted experts: per-task success over seeded starts (and, optionally, env speed).

    python -m rtpolicy.envs.robosuite.check_experts --episodes 100 [--tasks Lift,Square] [--noise 0.1] [--out results.json]

Episode k of a task uses start seed ``seed + k``. Prints one line per task (success rate with a Wilson 95%
interval, mean and max episode length, the failed seeds); ``--speed`` also measures env steps/s with random
actions without cameras and with robomimic's two 84x84 cameras (time it on an otherwise idle machine);
``--out`` writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from rtpolicy.envs.robosuite.env import RobosuiteEnv
from rtpolicy.envs.robosuite.tasks import TASKS, check_task_name


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return float(max(0.0, c - h)), float(min(1.0, c + h))


def run_episode(env: RobosuiteEnv, expert, seed: int, noise: float = 0.0) -> dict[str, Any]:
    """One expert episode from start ``seed`` (Gaussian action noise of std ``noise``, seeded by ``seed``)."""
    rng = np.random.default_rng(seed)
    obs, info = env.reset(seed=seed)
    for _ in range(env.max_episode_steps):
        action = expert(obs)
        if noise > 0:
            action = np.clip(action + rng.normal(0.0, noise, action.shape), -1.0, 1.0)
        obs, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            break
    return info


def check_task(task: str, episodes: int, seed: int = 0, noise: float = 0.0, verbose: bool = True) -> dict[str, Any]:
    env = RobosuiteEnv({"name": task}, seed=seed)
    try:
        expert = env.expert()
        wins, lengths, failed = 0, [], []
        for k in range(episodes):
            info = run_episode(env, expert, seed + k, noise)
            wins += bool(info["success"])
            lengths.append(int(info["steps"]))
            if not info["success"]:
                failed.append(seed + k)
    finally:
        env.close()
    low, high = wilson(wins, episodes)
    out = {"episodes": episodes, "successes": wins, "success": wins / episodes, "wilson95": [low, high],
           "mean_steps": float(np.mean(lengths)), "max_steps": int(max(lengths)), "failed_seeds": failed,
           "max_episode_steps": TASKS[task].max_episode_steps}
    if verbose:
        print(f"{task:18s} success {wins}/{episodes} = {wins / episodes:.2f} [{low:.2f}, {high:.2f}]  "
              f"mean steps {np.mean(lengths):5.1f}  max {max(lengths):3d}  failed seeds {failed}", flush=True)
    return out


def measure_speed(task: str, cameras: list[str], steps: int = 400, seed: int = 0) -> float:
    """Env steps/s with uniform random actions (resets included when an episode ends)."""
    env = RobosuiteEnv({"name": task, "max_episode_steps": 200}, seed=seed, cameras=cameras)
    try:
        actions = np.random.default_rng(seed).uniform(-1, 1, size=(steps, env.action_space.shape[0]))
        env.reset(seed=seed)
        env.step(actions[0])  # renderer set-up and first-call costs
        t0 = time.perf_counter()
        for a in actions:
            _, _, terminated, truncated, _ = env.step(a)
            if terminated or truncated:
                env.reset()
        return steps / (time.perf_counter() - t0)
    finally:
        env.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m rtpolicy.envs.robosuite.check_experts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=100, help="seeded starts per task")
    p.add_argument("--tasks", default="all", help="comma-separated task names (or aliases) or 'all'")
    p.add_argument("--seed", type=int, default=0, help="first start seed")
    p.add_argument("--noise", type=float, default=0.0, help="std of Gaussian noise added to the expert's actions")
    p.add_argument("--speed", action="store_true", help="also measure env steps/s without and with cameras")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.episodes < 1:
        p.error(f"--episodes must be >= 1, got {args.episodes}")
    try:
        tasks = list(TASKS) if args.tasks == "all" else [check_task_name(t) for t in args.tasks.split(",")]
    except ValueError as e:
        p.error(str(e))
    t0 = time.perf_counter()
    result: dict[str, Any] = {"episodes": args.episodes, "seed": args.seed, "noise": args.noise, "tasks": {}}
    for task in tasks:
        result["tasks"][task] = check_task(task, args.episodes, args.seed, args.noise)
    if args.speed:
        result["steps_per_s"] = {}
        for task in tasks:
            plain = measure_speed(task, [])
            cams = measure_speed(task, ["agentview", "robot0_eye_in_hand"])
            result["steps_per_s"][task] = {"no_cameras": plain, "agentview+eye_in_hand_84": cams}
            print(f"{task:18s} env steps/s: {plain:.0f} without cameras, {cams:.0f} with two 84x84 cameras", flush=True)
    result["wall_s"] = time.perf_counter() - t0
    print(f"done in {result['wall_s']:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return result


if __name__ == "__main__":
    main()
