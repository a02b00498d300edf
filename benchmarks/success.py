"""Task success of every real-time head on Meta-World MT10 as one task-id-conditioned policy.

    python benchmarks/success.py --out benchmarks/success.json [--steps 6000] [--episodes 50]
                                 [--heads diffusion edm truncated streaming] [override ...]
    python benchmarks/success.py --denoiser transformer --heads diffusion --cache bac:4 bac:3 uniform:2 uniform:3 \
                                 --out benchmarks/success_cache.json

``--eval-backend ray`` plays the evaluation episodes on Ray workers (``eval.backend=ray``; a local Ray, or the
cluster of ``--ray-address``) with the same per-episode results as the local runner.
``--cache experts`` evaluates DDIM-10 of a ``--denoiser mode`` policy with its experts fused per noise
level (``cache_policy_experts``). ``--denoiser`` trains every head on that denoiser (runs under ``<runs>/<task>-<denoiser>/``; unet1d keeps
``<runs>/<task>/``). ``--cache MODE:N`` (issue 4) also evaluates the diffusion head's DDIM-10 setting with
the denoiser wrapped in a feature cache (``rtpolicy.policies.accelerators.cache.calibrate``; bac:N = N
updates per block, uniform:N / taylor:N = recompute every N steps), calibrated on ``--calib`` observation
windows drawn from the training demos.

Every head is trained on the same demos (``task=mt10``: 50 scripted demos per task, collected on
first use) with the same budget (steps, batch, optimizer, denoiser), then evaluated for
``--episodes`` episodes per task on the same seeds. Heads that share training (DDPM-100 and DDIM-10
are one model; so are EDM's samplers) are trained once and evaluated per sampler setting.
Resumable: a trained run (its results.json) is not retrained, an evaluated setting (its JSON) is not
re-evaluated, and a killed training run resumes from its last checkpoint. It takes hours on a
2-core CPU; it is not part of the test run. Rows: head, sampler, steps, task, episodes, success,
ci95 (Wilson), plus one ``task: "mean"`` row per setting.
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

import torch  # noqa: E402

from rtpolicy.checkpoint import load_policy  # noqa: E402
from rtpolicy.config import EvalConfig, register_configs  # noqa: E402
from rtpolicy.factory import compose, task_config  # noqa: E402
from rtpolicy.envs.runner import evaluate  # noqa: E402
from rtpolicy.training import resolve_device, train  # noqa: E402

# trained head -> the inference settings evaluated on its checkpoint: (sampler label, steps, overrides)
HEADS = {
    "diffusion": [("ddpm", 100, {"sampler": "ddpm", "num_inference_steps": 100}),
                  ("ddim", 10, {"sampler": "ddim", "num_inference_steps": 10})],
    "edm": [("dpmpp_2m", 4, {"sampler": "dpmpp_2m", "num_inference_steps": 4})],
    "truncated": [("anchored", 1, {"num_inference_steps": 1})],
    "streaming": [("stream", 1, {"steps_per_tick": 1}), ("stream", 2, {"steps_per_tick": 2})],
}


def apply_cache(policy, setting: str, task_cfg, n: int, device) -> dict:
    """Wrap ``policy.denoiser`` in a feature cache calibrated on ``n`` demo observation windows."""
    import numpy as np

    from rtpolicy.datasets.replay_buffer import ReplayBuffer
    from rtpolicy.policies.accelerators.cache import calibrate
    from rtpolicy.policies.denoisers.mode import cache_policy_experts

    mode, _, num = setting.partition(":")
    if not (mode in ("bac", "uniform", "taylor") and num.isdigit() or setting == "experts"):
        raise SystemExit(f"--cache {setting!r}: expected bac:N, uniform:N, taylor:N or experts")
    buf = ReplayBuffer.open(task_cfg.dataset)
    rng = np.random.default_rng(0)
    to = policy.obs_horizon
    ends = buf.episode_ends
    starts = np.concatenate([[0], ends[:-1]])
    ep = rng.integers(0, len(ends), n)
    t = rng.integers(starts[ep] + to - 1, ends[ep])  # windows that lie inside one episode
    idx = t[:, None] - np.arange(to)[::-1]
    data = buf.load(["state"] + (["task_id"] if getattr(policy, "num_tasks", 0) else []))
    obs = {"state": torch.from_numpy(data["state"][idx]).float().to(device)}
    if "task_id" in data:
        obs["task_id"] = torch.from_numpy(data["task_id"][t]).long().to(device)
    if setting == "experts":  # MoDE: fuse the routed experts per noise level of the sampler's schedule
        with torch.no_grad():
            return {"cached_levels": cache_policy_experts(policy, {k: v[:1] for k, v in obs.items()}),
                    **policy.denoiser.param_counts()}
    kw = {"budget": int(num)} if mode == "bac" else {"every": int(num)}
    with torch.no_grad():
        return calibrate(policy, obs, mode, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/success.json")
    ap.add_argument("--runs", default="benchmarks/runs/success")
    ap.add_argument("--task", default="mt10")
    ap.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    ap.add_argument("--steps", type=int, default=6000, help="training steps per head (the shared budget)")
    ap.add_argument("--episodes", type=int, default=50, help="evaluation episodes per task")
    ap.add_argument("--num-envs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 lets two runs share 2 cores")
    ap.add_argument("--denoiser", default="unet1d", help="denoiser of every head (a registered name)")
    ap.add_argument("--cache", nargs="*", default=[], metavar="MODE:N", help="feature-cache settings for diffusion DDIM-10")
    ap.add_argument("--calib", type=int, default=64, help="calibration windows for --cache")
    ap.add_argument("--settings", nargs="*", default=None, metavar="NAME",
                    help="evaluate only these settings, e.g. ddim10 ddim+bac410 (default: all of each head)")
    ap.add_argument("--tag", default="", help="suffix of the run folder (variants of one denoiser)")
    ap.add_argument("--eval-backend", default="local", choices=["local", "ray"],
                    help="ray: evaluation episodes on Ray workers (pip install ray), same per-episode results")
    ap.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start Ray on this machine)")
    ap.add_argument("--ray-workers", type=int, default=0, help="Ray actors (0: one per --num-envs CPUs)")
    ap.add_argument("--ray-gpus", type=float, default=0.0, help="GPUs per Ray actor (0: the actors infer on the CPU)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every head's training")
    args = ap.parse_args()
    if args.eval_backend == "ray" and args.cache:
        raise SystemExit("--eval-backend ray evaluates policies as their checkpoints build them; --cache wraps the "
                         "denoiser in this process only: evaluate --cache settings with --eval-backend local")
    register_configs()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    rows = []
    group = args.task + ("" if args.denoiser == "unet1d" else f"-{args.denoiser}") + (f"-{args.tag}" if args.tag else "")
    for head in args.heads:
        run_dir = Path(args.runs) / group / head
        if not (run_dir / "results.json").exists():
            over = [f"task={args.task}", f"policy={head}", f"denoiser={args.denoiser}", f"train.steps={args.steps}",
                    "eval.episodes=0", f"train.threads={args.threads}",
                    *args.overrides, f"run_dir={run_dir}", f"resume={(run_dir / 'checkpoints' / 'last.safetensors').exists()}"]
            cfg = compose(over)
            train(cfg)
        ckpt = run_dir / "checkpoints" / "last.safetensors"
        settings = [(sampler, steps, inference, None) for sampler, steps, inference in HEADS[head]]
        if head == "diffusion":
            settings += [(f"ddim+{c.replace(':', '')}", 10, HEADS["diffusion"][1][2], c) for c in args.cache]
        for sampler, steps, inference, cache in settings:
            if args.settings is not None and f"{sampler}{steps}" not in args.settings:
                continue
            out = run_dir / f"eval_{sampler}{steps}.json"
            if not out.exists():
                device = resolve_device("auto")
                policy, meta = load_policy(ckpt, device, inference)
                task_cfg = task_config(meta["config"]["task"])
                if cache:
                    report = apply_cache(policy, cache, task_cfg, args.calib, device)
                    print(f"[success] cache {cache}: {report}", flush=True)
                ecfg = EvalConfig(episodes=args.episodes, num_envs=args.num_envs, out=str(out), backend=args.eval_backend,
                                  ray_address=args.ray_address, ray_workers=args.ray_workers, ray_gpus=args.ray_gpus)
                print(f"[success] {head} {sampler}-{steps}: {args.episodes} episodes per task", flush=True)
                evaluate(policy, task_cfg, ecfg, device=device)
            res = json.loads(out.read_text())
            per_task = res.get("per_task") or {res["task"]: res}
            for task, r in per_task.items():
                rows.append({"head": head, "sampler": sampler, "steps": steps, "task": task, "episodes": r["episodes"],
                             "success": r["success"], "ci95": r["ci95"]})
            rows.append({"head": head, "sampler": sampler, "steps": steps, "task": "mean", "episodes": res["episodes"],
                         "success": res["success"], "ci95": res["ci95"], "chunk_ms_p50": res["chunk_ms_p50"],
                         "denoiser": args.denoiser})
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(rows, indent=2))

    settings = list(dict.fromkeys((r["head"], r["sampler"], r["steps"]) for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    cell = {(r["head"], r["sampler"], r["steps"], r["task"]): r for r in rows}
    names = [f"{h}/{s}-{n}" for h, s, n in settings]
    print(f"\n{'task':24s}" + "".join(f"{n:>22s}" for n in names))
    for task in tasks:
        line = f"{task:24s}"
        for st in settings:
            r = cell.get((*st, task))
            line += f"{'':>22s}" if r is None else f"{r['success']:6.2f} [{r['ci95'][0]:.2f},{r['ci95'][1]:.2f}]".rjust(22)
        print(line)
    print(f"({rows[-1]['episodes'] // max(1, len(tasks) - 1)} episodes per task; mean row: Wilson 95% CI of pooled episodes)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
