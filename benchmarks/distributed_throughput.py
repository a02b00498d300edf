"""Training throughput of 1 vs 2 torchrun processes and evaluation throughput of the local runner vs Ray,
each side by side in one run on this machine (issue 16).

    python benchmarks/distributed_throughput.py [--steps 60] [--batch 256] [--rounds 3] [--episodes 8] \
        [--eval-rounds 2] [--out benchmarks/distributed_throughput.json]

Training: ``train.py`` on Meta-World reach-v3 (state, 10 scripted demos collected on first use into
``data/bench/``, the default diffusion head and U-Net) with the global batch ``--batch``, launched as

    torchrun x1      ``torchrun --nproc_per_node=1``, train.threads=1 (one process, DDP wrapper included)
    torchrun x2      ``torchrun --nproc_per_node=2``, train.threads=1 (2 ranks x batch/2, gloo all-reduce)
    python 2 threads ``python train.py`` with train.threads=2: the same two cores used by one process

The settings take turns in ``--rounds`` rounds so a slow spell of the shared machine hits them all; each
setting's figure is its median round. ``samples_per_s`` = steps x global batch / the loop's seconds (the
run's ``train_seconds``: from the first batch to the last step, no start-up, no final checkpoint);
``launch_s`` is the whole launch (imports, rendezvous, store opening, normalizer fit, checkpoint).

Evaluation: the checkpoint of the first torchrun x2 launch, ``--episodes`` episodes of at most
``--max-steps`` steps from seed 100000, no video, in ``--eval-rounds`` alternating rounds of

    local n=1   the local runner, one simulator process (rounds of 1 episode)
    local n=2   the local runner, two simulator processes (the default way to use two cores)
    ray 2x1     eval.backend=ray, 2 Ray actors x 1 simulator process each, on a local Ray (2 CPUs)

``episodes_per_s`` excludes Ray's start (``ray_init_s``, once) but includes the actors' start and policy
build in every round (a fresh set of actors per evaluate call). Ray 2x1 plays the same rounds as local n=1,
so its per-episode outcomes are checked equal to local n=1's (``same_as_local_n1``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("MUJOCO_GL", "osmesa")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATASET = "data/bench/reach-v3-10.zarr"
TASK = ["task=reach", "task.demos=10", f"task.dataset={DATASET}", "task.collect=true"]
SETTINGS = {
    "torchrun x1": (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"], 1),
    "torchrun x2": (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], 1),
    "python 2 threads": ([], 2),
}


def launch(name: str, run_dir: Path, steps: int, batch: int) -> dict:
    prefix, threads = SETTINGS[name]
    cmd = [sys.executable, *prefix, str(ROOT / "train.py"), *TASK, f"train.steps={steps}", f"train.batch_size={batch}",
           f"train.threads={threads}", "eval.episodes=0", "train.val_every=1000000", "train.ckpt_every=1000000",
           "train.log_every=1000000", f"run_dir={run_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    launch_s = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    loop_s = json.loads((run_dir / "results.json").read_text())["train_seconds"]
    return {"loop_s": loop_s, "launch_s": round(launch_s, 1), "samples_per_s": round(steps * batch / loop_s, 1)}


def train_rows(args, tmp: Path) -> tuple[list[dict], Path]:
    from rtpolicy.factory import compose
    from rtpolicy.training import ensure_dataset

    ensure_dataset(compose([*TASK]).task)  # collected once, before any timing
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    names = list(SETTINGS)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
            run = launch(name, tmp / f"{name.replace(' ', '_')}_{r}", args.steps, args.batch)
            runs[name].append(run)
            print(f"round {r} {name:17s} {run['samples_per_s']:8.1f} samples/s (loop {run['loop_s']} s, "
                  f"launch {run['launch_s']} s)", flush=True)
    base = statistics.median(x["samples_per_s"] for x in runs["torchrun x1"])
    rows = []
    for name, rs in runs.items():
        sps = statistics.median(x["samples_per_s"] for x in rs)
        rows.append({"bench": "train", "setting": name, "processes": 2 if name == "torchrun x2" else 1,
                     "threads_per_process": SETTINGS[name][1], "global_batch": args.batch, "steps": args.steps,
                     "samples_per_s": sps, "speedup_vs_torchrun_x1": round(sps / base, 2),
                     "samples_per_s_rounds": [x["samples_per_s"] for x in rs],
                     "launch_s_median": statistics.median(x["launch_s"] for x in rs)})
    return rows, tmp / "torchrun_x2_0" / "checkpoints" / "last.safetensors"


def eval_rows(args, ckpt: Path) -> list[dict]:
    import ray
    import torch

    from rtpolicy.checkpoint import load_policy
    from rtpolicy.evaluation import evaluate
    from rtpolicy.factory import task_config

    torch.set_num_threads(1)
    policy, meta = load_policy(ckpt)
    task = task_config(meta["config"]["task"])
    base = {"episodes": args.episodes, "seed": 100_000, "max_episode_steps": args.max_steps, "video": 0,
            "latency_reps": 1, "out": None}
    settings = {"local n=1": {"num_envs": 1}, "local n=2": {"num_envs": 2},
                "ray 2x1": {"num_envs": 1, "backend": "ray", "ray_workers": 2, "ray_address": None, "ray_gpus": 0.0}}
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_init_s = round(time.perf_counter() - t0, 1)
    runs: dict[str, list[float]] = {name: [] for name in settings}
    outcomes: dict[str, list] = {}
    try:
        names = list(settings)
        for r in range(args.eval_rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                res = evaluate(policy, task, SimpleNamespace(**base, **settings[name]), progress=False)
                runs[name].append(time.perf_counter() - t0)
                outcomes[name] = res["per_episode"]
                print(f"round {r} {name:10s} {args.episodes / runs[name][-1]:.2f} episodes/s "
                      f"({runs[name][-1]:.1f} s, success {res['success']:.2f})", flush=True)
    finally:
        ray.shutdown()
    base_s = statistics.median(runs["local n=1"])
    rows = []
    for name, secs in runs.items():
        s = statistics.median(secs)
        steps = sum(e["length"] for e in outcomes[name])
        row = {"bench": "eval", "setting": name, "episodes": args.episodes, "env_steps": steps,
               "max_episode_steps": args.max_steps, "seconds_median": round(s, 1),
               "episodes_per_s": round(args.episodes / s, 3), "env_steps_per_s": round(steps / s, 1),
               "speedup_vs_local_n1": round(base_s / s, 2), "seconds_rounds": [round(x, 1) for x in secs]}
        if name.startswith("ray"):
            row |= {"ray_init_s": ray_init_s, "same_as_local_n1": outcomes[name] == outcomes["local n=1"]}
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--eval-rounds", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/distributed_throughput.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dist_bench_") as tmp:
        rows, ckpt = train_rows(args, Path(tmp))
        rows += eval_rows(args, ckpt)
    meta = {"command": "python " + " ".join(sys.argv), "cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
