"""Why a feature-cache schedule calibrated on demo windows loses success on unseen seeds (issue 20), cheaply:
chunk errors instead of success rates.

    python benchmarks/cache_calibration.py benchmarks/runs/success/mt10-transformer/diffusion/checkpoints/last.safetensors \
        --out benchmarks/success_cache_calibration.json [--rollout-episodes 2] [--per-task 24]

For one MT10 DDIM-10 transformer checkpoint it builds three sets of observation windows: ``demo64`` (the 64
demo windows ``success.py --cache`` calibrates on), ``demo_task`` (--per-task fresh demo windows per member)
and ``rollout`` (--per-task windows per member from the uncached policy's own rollouts on seeds 200000+, which
no success evaluation uses). Then, per member task and window set, it measures the executed chunk's RMS error
vs the uncached denoiser (same noise; :func:`output_errors`) for every cache setting, with each calibration
drawn from a named source; the per-step cosine similarities of every unit on demo64 vs rollout windows; and,
for BAC-3, each unit's share of the error (only that unit follows the schedule). Rows as JSON.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from rtpolicy.checkpoint import load_policy  # noqa: E402
from rtpolicy.config import EvalConfig, register_configs  # noqa: E402
from rtpolicy.evaluation import evaluate  # noqa: E402
from rtpolicy.factory import task_config  # noqa: E402
from rtpolicy.policies.accelerators.cache import (CachedDiT, calibrate, calibrate_bounded, conformal_quantile,  # noqa: E402
                                                 cost_fraction, output_errors, record_features, similarity,
                                                 unit_costs)
from success import demo_windows  # noqa: E402


def rollout_windows(policy, task_cfg, episodes: int, per_task: int, seed: int) -> dict[str, torch.Tensor]:
    """Observation windows the uncached policy saw in its own rollouts (``episodes`` per member from ``seed``),
    ``per_task`` of them per member, evenly spaced over the recorded ones."""
    seen: list[dict[str, torch.Tensor]] = []
    predict = policy.predict_chunk

    def recording(obs):
        if obs["state"].shape[0] > 1:  # the rollouts' batches, not the batch-1 latency probe
            seen.append({k: v.clone() for k, v in obs.items()})
        return predict(obs)

    policy.predict_chunk = recording
    try:
        res = evaluate(policy, task_cfg, EvalConfig(episodes=episodes, num_envs=2, seed=seed,
                                                    latency_reps=1), progress=False)
    finally:
        del policy.predict_chunk
    obs = {k: torch.cat([s[k] for s in seen]) for k in seen[0]}
    keep = []
    for m in obs["task_id"].unique():
        idx = (obs["task_id"] == m).nonzero().flatten()
        keep.append(idx[torch.linspace(0, len(idx) - 1, per_task).long()])
    keep = torch.cat(keep)
    print(f"[calib] rollouts: success {res['success']:.2f}, {len(obs['state'])} windows, kept {len(keep)}", flush=True)
    return {k: v[keep] for k, v in obs.items()}


def split(obs: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    return {k: v[0::2] for k, v in obs.items()}, {k: v[1::2] for k, v in obs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--out", default="benchmarks/success_cache_calibration.json")
    ap.add_argument("--rollout-episodes", type=int, default=2,
                    help="uncached rollouts per member for the rollout set (>= 2; 0: no rollout set)")
    ap.add_argument("--per-task", type=int, default=24, help="windows per member in demo_task and rollout")
    ap.add_argument("--q", type=float, default=0.9)
    args = ap.parse_args()
    register_configs()
    torch.set_num_threads(1)
    policy, meta = load_policy(args.checkpoint, "cpu", {"sampler": "ddim", "num_inference_steps": 10})
    task_cfg = task_config(meta["config"]["task"])
    names = list(task_cfg.tasks)
    inner = policy.denoiser
    costs = unit_costs(inner)
    sets = {"demo64": demo_windows(policy, task_cfg, 64, "cpu"),
            "demo_task": demo_windows(policy, task_cfg, args.per_task * len(names), "cpu", per_task=True, seed=1),
            **({"rollout": rollout_windows(policy, task_cfg, args.rollout_episodes, args.per_task, 200_000)}
               if args.rollout_episodes else {})}
    policy.denoiser = inner
    rows: list[dict] = []
    # calibrations: (label, how) -> the schedule; each is then judged on every window set, per member task
    cal_sets = {"demo64": sets["demo64"], "demo_task": sets["demo_task"]}
    settings = [("bac3", "demo64"), ("bac4", "demo64"), ("bac3", "demo_task"),
                ("uniform2", None), ("uniform3", None), ("uniform4", None), ("taylor3", None), ("taylor4", None)]
    if "rollout" in sets:
        cal_sets["rollout"] = split(sets["rollout"])[0]
        settings.insert(3, ("bac3", "rollout"))
    schedules: dict[str, CachedDiT] = {}
    for name, src in settings:
        mode, num = name.rstrip("0123456789"), int(name[-1])
        kw = {"budget": num} if mode == "bac" else {"every": num}
        calibrate(policy, cal_sets[src] if src else sets["demo64"], mode, **kw)
        schedules[f"{name}@{src}" if src else name] = policy.denoiser
    for src, mode, cost in [("demo_task", "bac", 0.3), ("demo_task", "taylor", 0.3), ("rollout", "bac", 0.3),
                            ("demo64", "bac", 0.3), ("demo_task", "bac", 0.4), ("demo_task", "taylor", 0.4)]:
        if src not in sets:
            continue
        # bounded schedules: fit / held-out halves of the source (rollout: of its calibration half)
        fit, held = split(sets[src]) if src != "rollout" else split(split(sets["rollout"])[0])
        rep = calibrate_bounded(policy, fit, held, cost=cost, q=args.q, mode=mode)
        label = f"bound-{mode}{round(cost * 10)}@{src}"
        print(f"[calib] {label}: {rep}", flush=True)
        schedules[label] = policy.denoiser
        rows.append({"kind": "calibration", "setting": label, **rep})
    for label, den in schedules.items():
        policy.denoiser = den
        frac = cost_fraction(den.schedule, costs)
        for wname, obs in sets.items():
            if wname == "rollout":  # judge on the rollout half no rollout calibration saw
                obs = split(obs)[1]
            err = output_errors(policy, obs)
            tid = obs.get("task_id")
            per = {names[int(m)]: round(float(err[tid == m].mean()), 5) for m in tid.unique()}
            rows.append({"kind": "chunk_error", "setting": label, "windows": wname, "cost_fraction": round(frac, 4),
                         "mean": round(float(err.mean()), 5), "q90": round(conformal_quantile(err, args.q), 5),
                         "bound": den.bound["chunk_rms"] if den.bound else None, "mode": den.mode,
                         "over_bound": round(float((err > den.bound["chunk_rms"]).float().mean()), 4) if den.bound else None,
                         "per_task": per, "schedule": den.schedule.int().tolist()})
            print(f"[calib] {label:22s} cost {frac:.3f} on {wname:9s}: mean {err.mean():.4f} "
                  + " ".join(f"{k[:6]}={v:.3f}" for k, v in per.items()), flush=True)
    # per-step feature similarity on demo64 vs rollout windows, per unit
    policy.denoiser = inner
    other = "rollout" if "rollout" in sets else "demo_task"
    sims = {w: similarity(record_features(policy, sets[w], 10)) for w in ("demo64", other)}
    rows.append({"kind": "similarity", "windows": list(sims), "adjacent_demo64": sims["demo64"].diagonal(1, 1, 2).tolist(),
                 f"adjacent_{other}": sims[other].diagonal(1, 1, 2).tolist(),
                 "mean_abs_diff_per_unit": (sims["demo64"] - sims[other]).abs().mean((1, 2)).tolist()})
    # which units' reuse hurts: only unit u follows BAC-3's schedule, every other unit recomputes
    bac = schedules["bac3@demo64"].schedule
    rol = split(sets[other])[1]
    for u in range(bac.shape[0]):
        sch = torch.ones_like(bac)
        sch[u] = bac[u]
        policy.denoiser = CachedDiT(inner, sch, "bac")
        err = output_errors(policy, rol)
        tid = rol["task_id"]
        rows.append({"kind": "unit_ablation", "unit": u, "updates": int(bac[u].sum()), "mean": round(float(err.mean()), 5),
                     "per_task": {names[int(m)]: round(float(err[tid == m].mean()), 5) for m in tid.unique()}})
        print(f"[calib] only unit {u} cached ({int(bac[u].sum())} updates): mean {err.mean():.4f}", flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
