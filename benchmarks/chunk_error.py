"""How far a state policy's chunks are from the demonstrator's, on windows of its own training store.

    python benchmarks/chunk_error.py --store data/robosuite/PickPlaceCan_abs.zarr \
        benchmarks/runs/robosuite/can_abs_truncated/checkpoints/last.safetensors [more checkpoints]

For each checkpoint, on the same random windows (``--windows``, seeded): the mean distance between the first
``action_horizon`` rows of the predicted chunk and the store's actions over the first three action dims (for
robosuite's absolute mode: the target position, in metres; for deltas: action units), the fraction of gripper
signs that differ, and the spread of ``--samples`` chunks drawn for the same observation (the sampler's noise),
with the error of their mean. Prints one line per checkpoint; ``--out`` writes them as JSON rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from rtpolicy.checkpoint import load_policy
from rtpolicy.datasets.replay_buffer import ReplayBuffer
from rtpolicy.evaluation.rollout import _to_torch


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--store", required=True)
    p.add_argument("--windows", type=int, default=150)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    store = ReplayBuffer.open(args.store)
    rng = np.random.default_rng(args.seed)
    picks = []
    for _ in range(args.windows):
        ep = store.get_episode(int(rng.integers(store.n_episodes)), ["state", "action"])
        picks.append((ep, int(rng.integers(1, len(ep["action"]) - 8))))
    rows = []
    for ck in args.checkpoints:
        policy, _ = load_policy(ck, "cpu")
        policy.eval()
        to, ha = policy.obs_horizon, policy.action_horizon
        err, sign, spread, mean_err = [], [], [], []
        for i, (ep, t) in enumerate(picks):
            idx = [max(0, t - to + 1 + j) for j in range(to)]
            obs = _to_torch(policy, {"state": np.repeat(ep["state"][idx][None], args.samples, 0)}, None, torch.device("cpu"))
            torch.manual_seed(args.seed * 100003 + i)
            with torch.inference_mode():
                chunks = policy.predict_chunk(obs).numpy()[:, :ha]
            gt = ep["action"][t:t + ha]
            c = chunks[:, :len(gt)]
            err.append(np.linalg.norm(c[0, :, :3] - gt[:, :3], axis=-1).mean())
            sign.append((np.sign(c[0, :, -1]) != np.sign(gt[:, -1])).mean())
            spread.append(np.linalg.norm(c[..., :3] - c[..., :3].mean(0), axis=-1).mean())
            mean_err.append(np.linalg.norm(c[..., :3].mean(0) - gt[:, :3], axis=-1).mean())
        row = {"checkpoint": ck, "windows": len(picks), "pos_error_mean": float(np.mean(err)),
               "pos_error_p90": float(np.quantile(err, 0.9)), "gripper_sign_error": float(np.mean(sign)),
               "sample_spread": float(np.mean(spread)), "mean_sample_error": float(np.mean(mean_err))}
        rows.append(row)
        print(f"{ck}: error {row['pos_error_mean']:.4f} (p90 {row['pos_error_p90']:.4f}), gripper sign {row['gripper_sign_error']:.3f}, "
              f"spread of {args.samples} samples {row['sample_spread']:.4f}, error of their mean {row['mean_sample_error']:.4f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
