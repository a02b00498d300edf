"""Task success of every real-time head on Meta-World MT10 as one task-id-conditioned policy.

    python benchmarks/success.py --out benchmarks/success.json [--steps 6000] [--episodes 50]
                                 [--heads diffusion edm truncated streaming] [override ...]
    python benchmarks/success.py --denoiser transformer --heads diffusion --cache bac:4 bac:3 uniform:2 uniform:3 \
                                 --out benchmarks/success_cache.json

``--train-seeds N`` trains every head N times (``train.seed`` 0..N-1; seed 0 keeps the run folder ``<head>``, seed s
trains into ``<head>-seed<s>``) and adds, per setting, a ``task: "mean over seeds"`` row: the mean of the seeds'
MT10 means, their sample std and range, and the per-seed figures with their seed lists (per-task rows carry
``train_seed``). ``--eval-seed S`` evaluates on episode seeds S, S+1, ... (default 100000, ``eval.seed``); a
setting evaluated on other seeds than the default is stored as ``eval_<setting>_seed<S>.json``.
``--calib-source`` picks where the --cache calibration windows come from (``demos``: drawn from the training
demos as before; ``demos-per-task``: the same number from each suite member); ``--cache bound:F`` calibrates the
error-bounded schedule (``calibrate_bounded``) recomputing at floor(F * 10) of DDIM-10's steps (e.g. bound:0.3), half
of the windows held out for its bound; ``tbound:F`` the same with skipped units forecast (Taylor) instead of reused.

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
ci95 (Wilson), plus one ``task: "mean"`` row per setting. A cached setting's mean row also carries ``speedup``: its
chunk latency against the same policy uncached, both timed call by call interleaved in this process at batch 1
(:func:`side_by_side_ms`, kept in the setting's ``_cache.json``), and the units' ``cost_fraction``. ``--retime N``
times the evaluated cached settings again with N rounds (the schedule stored in the report, ``CachedDiT.from_json``;
MoDE's fused experts and older reports without one are calibrated anew from the same seeded windows), for a figure
taken on a machine that is not also running the evaluations.
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
from rtpolicy.evaluation import evaluate  # noqa: E402
from rtpolicy.training import resolve_device, train  # noqa: E402

# trained head -> the inference settings evaluated on its checkpoint: (sampler label, steps, overrides)
HEADS = {
    "diffusion": [("ddpm", 100, {"sampler": "ddpm", "num_inference_steps": 100}),
                  ("ddim", 10, {"sampler": "ddim", "num_inference_steps": 10})],
    "edm": [("dpmpp_2m", 4, {"sampler": "dpmpp_2m", "num_inference_steps": 4})],
    "truncated": [("anchored", 1, {"num_inference_steps": 1})],
    "streaming": [("stream", 1, {"steps_per_tick": 1}), ("stream", 2, {"steps_per_tick": 2})],
}


def demo_windows(policy, task_cfg, n: int, device, per_task: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` observation windows (n, To, ...) drawn from the training demos (per_task: n // members from each
    suite member's episodes), with their task ids for a suite policy."""
    import numpy as np

    from rtpolicy.datasets.replay_buffer import ReplayBuffer

    buf = ReplayBuffer.open(task_cfg.dataset)
    rng = np.random.default_rng(seed)
    to = policy.obs_horizon
    ends = buf.episode_ends
    starts = np.concatenate([[0], ends[:-1]])
    data = buf.load(["state"] + (["task_id"] if getattr(policy, "num_tasks", 0) else []))
    if per_task and "task_id" in data:
        ep_task = data["task_id"][starts]
        members = np.unique(ep_task)
        ep = np.concatenate([rng.choice(np.flatnonzero(ep_task == m), max(1, n // len(members))) for m in members])
    else:
        ep = rng.integers(0, len(ends), n)
    t = rng.integers(starts[ep] + to - 1, ends[ep])  # windows that lie inside one episode
    idx = t[:, None] - np.arange(to)[::-1]
    obs = {"state": torch.from_numpy(data["state"][idx]).float().to(device)}
    if "task_id" in data:
        obs["task_id"] = torch.from_numpy(data["task_id"][t]).long().to(device)
    return obs


def apply_cache(policy, setting: str, task_cfg, n: int, device, source: str = "demos") -> dict:
    """Wrap ``policy.denoiser`` in a feature cache calibrated on ``n`` demo observation windows."""
    from rtpolicy.policies.accelerators.cache import calibrate, calibrate_bounded
    from rtpolicy.policies.denoisers.mode import cache_policy_experts

    mode, _, num = setting.partition(":")
    ok_num = num.isdigit() or (mode in ("bound", "tbound") and num.replace(".", "", 1).isdigit())
    if not (mode in ("bac", "uniform", "taylor", "bound", "tbound") and ok_num or setting == "experts"):
        raise SystemExit(f"--cache {setting!r}: expected bac:N, uniform:N, taylor:N, bound:F, tbound:F or experts")
    obs = demo_windows(policy, task_cfg, n, device, per_task=source == "demos-per-task")
    if mode in ("bound", "tbound"):  # fit on every other window, bound measured on the rest
        with torch.no_grad():
            return calibrate_bounded(policy, {k: v[0::2] for k, v in obs.items()}, {k: v[1::2] for k, v in obs.items()},
                                     cost=float(num), mode="taylor" if mode == "tbound" else "bac")
    if setting == "experts":  # MoDE: fuse the routed experts per noise level of the sampler's schedule
        with torch.no_grad():
            return {"cached_levels": cache_policy_experts(policy, {k: v[:1] for k, v in obs.items()}),
                    **policy.denoiser.param_counts()}
    kw = {"budget": int(num)} if mode == "bac" else {"every": int(num)}
    with torch.no_grad():
        return calibrate(policy, obs, mode, **kw)


def timing_windows(policy, task_cfg, device) -> dict[str, torch.Tensor]:
    """One demo window per suite member (one window for a single task), for :func:`side_by_side_ms`."""
    members = max(1, len(task_cfg.tasks or []))
    return demo_windows(policy, task_cfg, members, device, per_task=members > 1, seed=1)


def side_by_side_ms(policy, obs: dict[str, torch.Tensor], rounds: int = 60) -> dict:
    """Chunk latency (ms, batch 1, median over ``rounds``, averaged over the windows of ``obs``: one per suite member)
    of ``policy`` as cached by :func:`apply_cache` and of the same policy uncached, interleaved call by call in this
    process (the same checkpoint, observations and threads), and their ratio. Uncached: the CachedDiT's inner DiT,
    or a MoDE denoiser with its fused experts set aside."""
    import statistics
    import time

    from rtpolicy.policies.accelerators.cache import CachedDiT

    cached = policy.denoiser
    if isinstance(cached, CachedDiT):
        def use(on: bool) -> None:
            policy.denoiser = cached if on else cached.inner
    else:  # MoDE: routed experts vs the per-level fused FFN
        fused = dict(cached.fused)

        def use(on: bool) -> None:
            cached.fused = fused if on else {}
    n = next(iter(obs.values())).shape[0]
    times: dict[tuple[bool, int], list[float]] = {(on, w): [] for on in (True, False) for w in range(n)}
    with torch.no_grad():
        for i in range(rounds + 5):
            for w in range(n):  # one window per suite member, each timed alike
                one = {k: v[w : w + 1] for k, v in obs.items()}
                for on in (True, False) if i % 2 else (False, True):
                    use(on)
                    policy.reset()
                    t0 = time.perf_counter()
                    policy.predict_chunk(one)
                    if i >= 5:  # warm-up rounds not counted
                        times[on, w].append(1000 * (time.perf_counter() - t0))
    use(True)
    policy.reset()
    cached_ms = statistics.fmean(statistics.median(times[True, w]) for w in range(n))
    plain_ms = statistics.fmean(statistics.median(times[False, w]) for w in range(n))
    return {"chunk_ms_cached": cached_ms, "chunk_ms_uncached": plain_ms, "speedup": plain_ms / cached_ms,
            "timing_rounds": rounds}


def seed_means(rows: list[dict]) -> list[dict]:
    """Per setting with more than one training seed: one ``task: "mean over seeds"`` row (mean of the seeds' suite
    means, sample std, min/max, and per-task means), carrying the seed lists."""
    import statistics

    out = []
    means = [r for r in rows if r["task"] == "mean"]
    for key in dict.fromkeys((r["head"], r["sampler"], r["steps"]) for r in means):
        sel = [r for r in means if (r["head"], r["sampler"], r["steps"]) == key]
        if len(sel) < 2:
            continue
        vals = [r["success"] for r in sel]
        per_task: dict[str, list[float]] = {}
        for r in rows:
            if (r["head"], r["sampler"], r["steps"]) == key and r["task"] not in ("mean", "mean over seeds"):
                per_task.setdefault(r["task"], []).append(r["success"])
        out.append({"head": key[0], "sampler": key[1], "steps": key[2], "task": "mean over seeds",
                    "success": statistics.fmean(vals), "std": statistics.stdev(vals), "min": min(vals), "max": max(vals),
                    "per_seed": vals, "train_seeds": [r["train_seed"] for r in sel],
                    "eval_seeds": sorted({r["eval_seed"] for r in sel}), "episodes_per_seed": sel[0]["episodes"],
                    "per_task": {t: statistics.fmean(v) for t, v in per_task.items()},
                    **{k: statistics.fmean(r[k] for r in sel) for k in ("speedup", "cost_fraction")
                       if all(k in r for r in sel)}})
    return out


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
    ap.add_argument("--calib-source", default="demos", choices=["demos", "demos-per-task"],
                    help="where --cache calibration windows come from (demos-per-task: --calib split evenly over members)")
    ap.add_argument("--train-seeds", type=int, default=1, help="train every head with train.seed 0..N-1 (mean and spread)")
    ap.add_argument("--eval-seed", type=int, default=EvalConfig.seed, help="first evaluation episode seed")
    ap.add_argument("--settings", nargs="*", default=None, metavar="NAME",
                    help="evaluate only these settings, e.g. ddim10 ddim+bac410 (default: all of each head)")
    ap.add_argument("--tag", default="", help="suffix of the run folder (variants of one denoiser)")
    ap.add_argument("--eval-backend", default="local", choices=["local", "ray"],
                    help="ray: evaluation episodes on Ray workers (pip install ray), same per-episode results")
    ap.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start Ray on this machine)")
    ap.add_argument("--ray-workers", type=int, default=0, help="Ray actors (0: one per --num-envs CPUs)")
    ap.add_argument("--ray-gpus", type=float, default=0.0, help="GPUs per Ray actor (0: the actors infer on the CPU)")
    ap.add_argument("--retime", type=int, default=0, metavar="ROUNDS",
                    help="re-time evaluated cached settings side by side with ROUNDS interleaved calls (e.g. on an idle "
                         "machine after the evaluations); the timing during the evaluation is kept as timed_during_eval")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every head's training")
    args = ap.parse_args()
    if args.eval_backend == "ray" and args.cache:
        raise SystemExit("--eval-backend ray evaluates policies as their checkpoints build them; --cache wraps the "
                         "denoiser in this process only: evaluate --cache settings with --eval-backend local")
    register_configs()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    if args.train_seeds < 1:
        raise SystemExit(f"--train-seeds must be >= 1, got {args.train_seeds}")
    rows = []
    group = args.task + ("" if args.denoiser == "unet1d" else f"-{args.denoiser}") + (f"-{args.tag}" if args.tag else "")
    cal = "" if (args.calib, args.calib_source) == (64, "demos") else f"_cal{args.calib}{args.calib_source}"
    eval_tag = "" if args.eval_seed == EvalConfig.seed else f"_seed{args.eval_seed}"
    for head, seed in ((h, s) for h in args.heads for s in range(args.train_seeds)):
        run_dir = Path(args.runs) / group / (head if seed == 0 else f"{head}-seed{seed}")
        if not (run_dir / "results.json").exists():
            over = [f"task={args.task}", f"policy={head}", f"denoiser={args.denoiser}", f"train.steps={args.steps}",
                    "eval.episodes=0", f"train.threads={args.threads}", *([f"train.seed={seed}"] if seed else []),
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
            out = run_dir / f"eval_{sampler}{steps}{cal if cache else ''}{eval_tag}.json"
            report_path = out.parent / (out.stem + "_cache.json")
            if cache and args.retime and out.exists():  # the evaluated schedule, timed again
                device = resolve_device("auto")
                policy, meta = load_policy(ckpt, device, inference)
                task_cfg = task_config(meta["config"]["task"])
                old = json.loads(report_path.read_text()) if report_path.exists() else {}
                if "schedule" in old:  # the evaluated schedule itself, not a new search
                    from rtpolicy.policies.accelerators.cache import CachedDiT

                    policy.denoiser = CachedDiT.from_json(policy.denoiser, json.dumps(old["schedule"]))
                    policy.reset()
                else:
                    apply_cache(policy, cache, task_cfg, args.calib, device, args.calib_source)
                timing = side_by_side_ms(policy, timing_windows(policy, task_cfg, device), args.retime)
                during = old.get("timed_during_eval") or {k: old[k] for k in ("speedup", "chunk_ms_cached",
                                                                               "chunk_ms_uncached") if k in old}
                report_path.write_text(json.dumps(old | timing | {"timed_during_eval": during}, indent=2))
                print(f"[success] retimed {cache} (train seed {seed}): {timing}", flush=True)
            if not out.exists():
                device = resolve_device("auto")
                policy, meta = load_policy(ckpt, device, inference)
                task_cfg = task_config(meta["config"]["task"])
                if cache:
                    report = apply_cache(policy, cache, task_cfg, args.calib, device, args.calib_source)
                    if hasattr(policy.denoiser, "schedule_json"):  # a CachedDiT: kept, so --retime times this one
                        report["schedule"] = json.loads(policy.denoiser.schedule_json())
                    report |= side_by_side_ms(policy, timing_windows(policy, task_cfg, device))
                    report_path.write_text(json.dumps(report, indent=2))
                    print(f"[success] cache {cache}: {report}", flush=True)
                ecfg = EvalConfig(episodes=args.episodes, num_envs=args.num_envs, seed=args.eval_seed, out=str(out),
                                  backend=args.eval_backend,
                                  ray_address=args.ray_address, ray_workers=args.ray_workers, ray_gpus=args.ray_gpus)
                print(f"[success] {head} (train seed {seed}) {sampler}-{steps}: {args.episodes} episodes per task from "
                      f"seed {args.eval_seed}", flush=True)
                evaluate(policy, task_cfg, ecfg, device=device)
            res = json.loads(out.read_text())
            per_task = res.get("per_task") or {res["task"]: res}
            tags = {"train_seed": seed, "eval_seed": args.eval_seed}
            for task, r in per_task.items():
                rows.append({"head": head, "sampler": sampler, "steps": steps, "task": task, "episodes": r["episodes"],
                             "success": r["success"], "ci95": r["ci95"], **tags})
            speed = {}
            if cache and report_path.exists():
                rep = json.loads(report_path.read_text())
                speed = {k: rep[k] for k in ("speedup", "chunk_ms_cached", "chunk_ms_uncached", "cost_fraction")
                         if k in rep}
            rows.append({"head": head, "sampler": sampler, "steps": steps, "task": "mean", "episodes": res["episodes"],
                         "success": res["success"], "ci95": res["ci95"], "chunk_ms_p50": res["chunk_ms_p50"],
                         "denoiser": args.denoiser, **tags, **speed,
                         **({"calib": args.calib, "calib_source": args.calib_source} if cache else {})})
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(rows + seed_means(rows), indent=2))
    rows += seed_means(rows)
    if not rows:  # --settings with nothing to evaluate: training only
        return

    seeded = [r for r in rows if r["task"] == "mean over seeds"]
    rows = [r for r in rows if r["task"] != "mean over seeds" and r["train_seed"] == 0]  # the table: seed 0
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
    for r in seeded:
        speed = f"; {r['speedup']:.2f}x vs uncached (side by side)" if "speedup" in r else ""
        print(f"{r['head']}/{r['sampler']}-{r['steps']}: {r['success']:.3f} +- {r['std']:.3f} (std over train seeds "
              f"{r['train_seeds']}: {', '.join(f'{v:.3f}' for v in r['per_seed'])}; eval seeds from {r['eval_seeds']}){speed}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
