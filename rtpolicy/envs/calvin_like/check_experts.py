"""Measure the scripted experts: per-task success on randomized starts, N-chain success, env speed.

    python -m rtpolicy.envs.calvin_like.check_experts --episodes 100 --chains 100 --scene A --out results.json

Prints one line per task (success rate, mean episode length), the chain success rate and mean number
of completed subtasks, and the env's steps/s without rendering; ``--out`` writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import numpy as np

from rtpolicy.envs.calvin_like.env import CalvinLikeEnv
from rtpolicy.envs.calvin_like.tasks import TASKS


def run_episode(env: CalvinLikeEnv, expert, seed: int) -> dict:
    obs, info = env.reset(seed=seed)
    for _ in range(env.max_episode_steps):
        obs, _, terminated, truncated, info = env.step(expert(obs))
        if terminated or truncated:
            break
    return info


def measure_speed(scene: str = "A", steps: int = 2000, seed: int = 0) -> float:
    """Env steps per second (no rendering) with random actions, resets included when episodes end."""
    env = CalvinLikeEnv({"name": "chain5"}, seed=seed, scene=scene)
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1, 1, size=(steps, 5)).astype(np.float32)
    env.reset(seed=seed)
    t0 = time.perf_counter()
    for a in actions:
        _, _, term, trunc, _ = env.step(a)
        if term or trunc:
            env.reset()
    return steps / (time.perf_counter() - t0)


def check_tasks(tasks, episodes: int, scene: str, noise: float = 0.0, seed0: int = 0, verbose: bool = True) -> dict:
    out = {}
    for task in tasks:
        env = CalvinLikeEnv({"name": task, "max_episode_steps": 200}, seed=seed0, scene=scene)
        expert = env.expert(noise=noise, seed=seed0)
        wins, lengths, failed = 0, [], []
        for k in range(episodes):
            info = run_episode(env, expert, seed0 + k)
            wins += info["success"]
            lengths.append(info["steps"])
            if not info["success"]:
                failed.append(seed0 + k)
        out[task] = {"success": wins / episodes, "mean_steps": float(np.mean(lengths)), "max_steps": int(max(lengths)), "failed_seeds": failed[:20]}
        if verbose:
            print(f"{task:26s} success {wins / episodes:6.1%}  mean steps {np.mean(lengths):5.1f}  max {max(lengths):3d}", flush=True)
    return out


def check_chains(chains: int, length: int, scene: str, noise: float = 0.0, seed0: int = 0, subtask_steps: int | None = None) -> dict:
    env = CalvinLikeEnv({"name": f"chain{length}"}, seed=seed0, scene=scene, subtask_steps=subtask_steps)
    expert = env.expert(noise=noise, seed=seed0)
    completed, fails, failed_seeds = [], Counter(), []
    for k in range(chains):
        info = run_episode(env, expert, seed0 + k)
        completed.append(info["completed"])
        if not info["success"]:
            fails[info["subtask"]] += 1
            failed_seeds.append(seed0 + k)
    completed = np.array(completed)
    return {
        "length": length,
        "success": float(np.mean(completed == length)),
        "avg_completed": float(completed.mean()),
        "success_at": [float(np.mean(completed >= i)) for i in range(1, length + 1)],
        "failed_subtasks": dict(fails),
        "failed_seeds": failed_seeds[:20],
        "subtask_steps": env.subtask_steps,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=100, help="episodes per task")
    p.add_argument("--chains", type=int, default=100, help="number of chains")
    p.add_argument("--length", type=int, default=5, help="chain length")
    p.add_argument("--scene", default="A")
    p.add_argument("--tasks", default="all", help="comma-separated task names or 'all'")
    p.add_argument("--noise", type=float, default=0.0, help="expert action noise std")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    tasks = TASKS if args.tasks == "all" else args.tasks.split(",")
    t0 = time.perf_counter()
    sps = measure_speed(args.scene)
    print(f"env steps/s without rendering: {sps:.0f}", flush=True)
    result = {"scene": args.scene, "noise": args.noise, "steps_per_s": sps, "tasks": {}}
    if args.episodes > 0:
        result["tasks"] = check_tasks(tasks, args.episodes, args.scene, args.noise, args.seed)
        rates = [v["success"] for v in result["tasks"].values()]
        print(f"min task success {min(rates):.1%}, mean {np.mean(rates):.1%}", flush=True)
    if args.chains > 0:
        ch = check_chains(args.chains, args.length, args.scene, args.noise, args.seed)
        result["chains"] = ch
        print(
            f"{args.length}-chains: success {ch['success']:.1%}, avg completed {ch['avg_completed']:.2f}/{args.length}, "
            f"success@1..{args.length} {[round(x, 3) for x in ch['success_at']]}, failed subtasks {ch['failed_subtasks']}",
            flush=True,
        )
    result["wall_s"] = time.perf_counter() - t0
    print(f"done in {result['wall_s']:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
