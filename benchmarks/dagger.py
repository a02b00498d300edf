"""DAgger with an observation-only scripted expert: does a policy's failure come from the states its own
mistakes lead to (covariate shift), or from what it can learn at all?

    python benchmarks/dagger.py --task robosuite_can --base data/robosuite/PickPlaceCan.zarr \
        --out benchmarks/runs/robosuite/can_dagger --rounds 3 --episodes 20 -- policy=truncated train.steps=2000

Round 0 trains on the ``--base`` store (copied into ``<out>/data.zarr``). Each later round rolls the last
round's policy out on ``--episodes`` new starts (seeds ``--seed`` on; never the evaluation seeds 100000+),
executing the policy's chunks as the evaluation does, while the task's scripted expert (a function of the
observation, so it can label any state) labels every visited state; the episodes (the policy's states, the
expert's actions) are appended to the store, and the next round trains from scratch on all of it with the
same ``train.py`` overrides. Every round's ``train.py`` evaluates its policy as usual (``eval.*``), so
``<out>/round<r>/results.json`` is that round's success; ``<out>/dagger.json`` sums the rounds up.

The appended episodes are labelled in the store's attrs (``dagger``: round, seed, the policy's success,
length), so a store is never mistaken for scripted demos alone. This is outside the robosuite table's "50
scripted demos" recipe: it is a diagnostic.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def rollout(policy, env, expert, seed: int, keys: list[str]) -> tuple[dict[str, np.ndarray], bool]:
    """One episode driven by ``policy`` (chunks executed ``action_horizon`` steps at a time, as the evaluation
    does) -> ({key: (T, ...)} with the expert's action for every visited state, the policy's success)."""
    from rtpolicy.evaluation.rollout import _predict, _to_torch

    torch.manual_seed(seed)
    policy.reset()
    obs, _ = env.reset(seed=seed)
    to, ha = policy.obs_horizon, policy.action_horizon
    hist = {k: np.repeat(np.asarray(v)[None, None], to, axis=1) for k, v in obs.items() if k != "task_id"}
    steps: dict[str, list[np.ndarray]] = {k: [] for k in [*keys, "action"]}
    chunk, pos, terminated, truncated = None, ha, False, False
    while not (terminated or truncated):
        if pos == ha:
            chunk = _predict(policy, _to_torch(policy, hist, None, torch.device("cpu")), 1, env.action_space.shape[0])[0]
            pos = 0
        for k in keys:
            steps[k].append(np.asarray(obs[k]))
        steps["action"].append(np.clip(expert(obs), -1.0, 1.0).astype(np.float32))
        obs, _, terminated, truncated, _ = env.step(chunk[pos])
        pos += 1
        for k in hist:
            hist[k] = np.concatenate([hist[k][:, 1:], np.asarray(obs[k])[None, None]], axis=1)
    return {k: np.stack(v) for k, v in steps.items()}, bool(terminated)


def train(round_dir: Path, store: Path, task: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, str(ROOT / "train.py"), f"task={task}", f"task.dataset={store}", *overrides, f"run_dir={round_dir}"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads((round_dir / "results.json").read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help="the task config (train.py task=...)")
    p.add_argument("--base", required=True, type=Path, help="the scripted-demo store round 0 trains on")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--rounds", type=int, default=3, help="rounds of rollouts after round 0")
    p.add_argument("--episodes", type=int, default=20, help="policy rollouts per round")
    p.add_argument("--seed", type=int, default=200000, help="first rollout start (keep clear of evaluation seeds)")
    p.add_argument("overrides", nargs="*", help="train.py overrides, the same every round")
    args = p.parse_args(argv)

    import rtpolicy.envs  # noqa: F401  (GL before torch's friends)
    from rtpolicy.checkpoint import load_policy
    from rtpolicy.datasets.replay_buffer import ReplayBuffer
    from rtpolicy.envs import make_env
    from rtpolicy.factory import compose

    store = args.out / "data.zarr"
    if not store.exists():
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copytree(args.base, store)
    summary_path = args.out / "dagger.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"base": str(args.base), "rounds": []}
    fields = compose([f"task={args.task}"]).task
    for r in range(args.rounds + 1):
        round_dir = args.out / f"round{r}"
        if (round_dir / "results.json").exists():
            continue
        if r > 0:
            buf = ReplayBuffer.open(store, mode="a")
            attrs = json.loads(json.dumps(dict(buf.attrs)))
            done = [e for e in attrs.get("dagger", []) if e["round"] == r]
            policy, _ = load_policy(args.out / f"round{r - 1}" / "checkpoints" / "last.safetensors")  # EMA weights, eval mode
            env = make_env(fields, seed=args.seed)
            expert = env.expert()
            keys = [k for k in buf.keys if k != "action"]
            for i in range(len(done), args.episodes):
                seed = args.seed + (r - 1) * args.episodes + i
                episode, success = rollout(policy, env, expert, seed, keys)
                attrs.setdefault("dagger", []).append({"round": r, "seed": seed, "policy_success": success,
                                                      "length": len(episode["action"])})
                buf.add_episode(episode, attrs=attrs)
                print(f"round {r} rollout {i}: seed {seed} success {success} length {len(episode['action'])}", flush=True)
            env.close()
        res = train(round_dir, store, args.task, args.overrides)
        rolled = [e for e in ReplayBuffer.open(store).attrs.get("dagger", []) if e["round"] == r]
        summary["rounds"].append({"round": r, "episodes_in_store": ReplayBuffer.open(store).n_episodes,
                                  "rollouts": len(rolled), "rollout_success": float(np.mean([e["policy_success"] for e in rolled])) if rolled else None,
                                  "success": res["success"], "ci95": res.get("ci95"), "episodes": res["episodes"],
                                  "failed_seeds": [e["seed"] for e in res["per_episode"] if not e["success"]],
                                  "train_seconds": res.get("train_seconds")})
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary["rounds"][-1]), flush=True)


if __name__ == "__main__":
    main()
