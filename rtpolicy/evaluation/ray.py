"""``eval.backend=ray``: the local runner's evaluation, its rounds played on Ray workers.

    driver (evaluate_ray)                               Ray actors (eval.ray_workers of them)
      policy.spec (JSON) + state dict (safetensors) --> PolicyWorker: policy_from_stored(...) once, eval mode
      shards: (task, first episode, episodes)       --> PolicyWorker.run(shard): rollout.play on those rounds
      per-shard results in episode order            <-- {per_episode, videos, latency, ...}
      merged per task, then as the local runner merges suites (MT10) and CALVIN-style chains

The local runner plays a task's episodes in rounds of n = min(num_envs, episodes) envs, episode i on layout
seed ``eval.seed + i``, and seeds the sampling noise with ``eval.seed + s`` at the round starting at s. A
shard is a block of whole rounds, played by the same ``play`` with the same n, seeds and noise, so every
episode's outcome equals the local runner's (on the same kind of device: actors infer on the CPU, or on
CUDA with ``eval.ray_gpus > 0``). Suites shard over members and rounds, chains over rounds.

Ray starts here (``ray.init()``) unless it is running already or ``eval.ray_address`` names a cluster.
Each actor asks for min(num_envs, CPUs of the largest node) CPUs (it runs that many simulator
processes) and ``eval.ray_gpus`` GPUs. Latency figures (``chunk_ms_*``) come from each task's first shard;
``rollout_chunk_ms_p50`` is the median over its shards. Videos are written by the workers under
``video_dir``, which must be on a shared filesystem for a multi-machine cluster.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rtpolicy.envs import task_fields
from rtpolicy.errors import UserError
from rtpolicy.evaluation import combine, task_jobs, write_results
from rtpolicy.evaluation.spec import EvalSpec, RolloutPlan
from rtpolicy.evaluation.stats import wilson_interval

READY_TIMEOUT_S = 600  # for every actor to start and build its policy


class PolicyWorker:
    """A Ray actor: builds the evaluated policy once (from its spec and safetensors weights, never a pickled
    module) and plays shards of rounds with the local rollout (:func:`rtpolicy.evaluation.rollout.play`)."""

    def __init__(self, spec_json: str, weights: bytes, device: str):
        from safetensors.torch import load

        from rtpolicy.factory import policy_from_stored

        self.device = torch.device(device)
        self.policy = policy_from_stored(json.loads(spec_json), load(weights), source="the Ray driver's policy",
                                         error=UserError).to(self.device)

    def ready(self) -> bool:
        return True

    def run(self, shard: dict[str, Any]) -> dict[str, Any]:
        """One shard: {fields, plan (a RolloutPlan's fields, the task's), first, episodes, n_video, reps, video_dir}
        -> ``play``'s results with per-episode entries and video names indexed from the task's first episode."""
        from rtpolicy.evaluation.rollout import play

        s = dict(shard)
        plan = RolloutPlan(**s["plan"]).replace(episodes=s["episodes"], base_seed=s["plan"]["base_seed"] + s["first"],
                                                reps=s["reps"], n_video=s["n_video"])
        with torch.random.fork_rng(devices=[self.device.index or 0] if self.device.type == "cuda" else []):
            res = play(self.policy, s["fields"], plan, self.device, s["video_dir"], False, None)
        videos = []
        for path in map(Path, res["videos"]):  # episode_<index in shard>_seed_<seed>.mp4 -> index in the task
            seed = int(path.stem.rsplit("_", 1)[1])
            final = path.with_name(f"episode_{seed - s['plan']['base_seed']:03d}_seed_{seed}.mp4")
            path.replace(final)
            videos.append(str(final))
        res["videos"] = videos
        return res


def _ray():
    try:
        import ray
    except ImportError as e:
        raise UserError("eval.backend=ray needs Ray: pip install 'rtpolicy[dist]' (or pip install ray)") from e
    return ray


def _weights(policy) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous().clone() for k, v in policy.state_dict().items()})


def _sizes(ray, n: int, asked: int) -> tuple[int, float]:
    """(actors, CPUs per actor): ``asked`` actors (0: as many as the cluster's CPUs hold at n CPUs each), each
    asking for up to n CPUs (its simulator processes), no more than the largest node has, and a share
    small enough that all of them fit on the cluster."""
    if asked < 0:
        raise ValueError(f"eval.ray_workers must be >= 0, got {asked}")
    node_cpus = max([int(nd["Resources"].get("CPU", 0)) for nd in ray.nodes() if nd.get("Alive")] or [1])
    total = float(ray.cluster_resources().get("CPU", 1))
    cpus = max(1, min(n, node_cpus))
    if not asked:
        return max(1, int(total // cpus)), cpus
    share = total / asked  # Ray takes fractions below one CPU, whole numbers above
    return asked, min(cpus, math.floor(share)) if share >= 1 else round(share, 4)


def _shards(jobs: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    """Split each job's rounds into contiguous blocks, about ``workers`` blocks over all jobs (at least one per
    job); the last round of a job may be short, so it ends a block."""
    rounds = {j["name"]: math.ceil(j["s"].episodes / j["s"].n) for j in jobs}
    total = sum(rounds.values())
    shards = []
    for job in jobs:
        s, r = job["s"], rounds[job["name"]]
        blocks = min(r, max(1, math.ceil(workers * r / total)))
        for b in range(blocks):
            lo, hi = b * r // blocks * s.n, min(s.episodes, (b + 1) * r // blocks * s.n)
            shards.append({"job": job["name"], "fields": job["fields"], "plan": dataclasses.asdict(s), "first": lo,
                           "episodes": hi - lo, "reps": s.reps if b == 0 else 1,
                           "n_video": max(0, min(s.n_video - lo, hi - lo)), "video_dir": job["video_dir"]})
    return shards


def _merge(parts: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """One task's shard results (in episode order) -> the result dict of the local rollout's ``play``."""
    first = parts[0]
    per_episode = [e for p in parts for e in p["per_episode"]]
    episodes, successes = len(per_episode), sum(e["success"] for e in per_episode)
    lo, hi = wilson_interval(successes, episodes)
    return first | {
        "success": successes / episodes, "ci95": [lo, hi], "episodes": episodes, "successes": int(successes),
        "mean_length": float(np.mean([e["length"] for e in per_episode])),
        "rollout_chunk_ms_p50": float(np.median([p["rollout_chunk_ms_p50"] for p in parts])),
        "wall_s": wall_s, "per_episode": per_episode, "videos": [v for p in parts for v in p["videos"]],
        "backend": "ray", "shards": len(parts),
    }


def evaluate_ray(policy, task_cfg: Any, eval_cfg: Any, video_dir: str | Path | None = None, progress: bool = True,
                 context: str | None = None) -> dict[str, Any]:
    """As :func:`rtpolicy.evaluation.evaluate`, on Ray workers; the same keys plus ``backend`` and ``shards``.

    ``policy`` must come from :func:`rtpolicy.factory.build_policy` (``policy.spec``), as every trained, loaded
    or exported policy does; its state dict travels as safetensors bytes. ``context`` is unused (the
    workers' simulator processes use the runner's default).
    """
    if getattr(policy, "spec", None) is None:
        raise UserError(f"eval.backend=ray needs a torch policy built by rtpolicy.factory (e.g. by load_policy, with "
                        f"eval.runtime=torch); got a {type(policy).__name__} without a spec, which Ray workers cannot rebuild")
    spec = EvalSpec.from_cfg(eval_cfg)
    jobs = [{"name": f["name"], "fields": f, "s": RolloutPlan.make(policy, f, s, vd),
             "video_dir": None if vd is None else str(Path(vd).resolve())} for f, s, vd in task_jobs(task_cfg, spec, video_dir)]
    gpus = float(getattr(eval_cfg, "ray_gpus", 0.0) or 0.0)
    if gpus < 0:
        raise ValueError(f"eval.ray_gpus must be >= 0, got {gpus}")

    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=getattr(eval_cfg, "ray_address", None), log_to_driver=False, include_dashboard=False)
    workers, cpus = _sizes(ray, max(j["s"].n for j in jobs), int(getattr(eval_cfg, "ray_workers", 0) or 0))
    shards = _shards(jobs, workers)
    workers = min(workers, len(shards))

    t0 = time.perf_counter()
    weights = ray.put(_weights(policy))
    spec_json = json.dumps(policy.spec | {"processor": policy.processor.config()})
    actor = ray.remote(PolicyWorker).options(num_cpus=cpus, num_gpus=gpus)
    actors = [actor.remote(spec_json, weights, "cuda" if gpus > 0 else "cpu") for _ in range(workers)]
    try:
        try:
            ray.get([a.ready.remote() for a in actors], timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise UserError(f"eval.backend=ray: {workers} workers asking {cpus} CPUs and {gpus} GPUs each did not all start "
                            f"within {READY_TIMEOUT_S} s on a cluster with {ray.cluster_resources()}; lower eval.ray_workers "
                            "or eval.ray_gpus") from None
        from ray.util import ActorPool
        from tqdm import tqdm

        pool = ActorPool(actors)
        parts = []
        with tqdm(total=sum(s["episodes"] for s in shards), desc=f"eval {task_fields(task_cfg)['name']} (ray x{workers})",
                  unit="ep", disable=not progress) as bar:
            for res in pool.map(lambda a, s: a.run.remote({k: v for k, v in s.items() if k != "job"}), shards):
                parts.append(res)
                bar.update(len(res["per_episode"]))
    except ray.exceptions.RayTaskError as e:
        raise e.as_instanceof_cause() from None
    finally:
        for a in actors:
            ray.kill(a)
    wall_s = time.perf_counter() - t0
    per_task = {job["name"]: _merge([p for p, s in zip(parts, shards) if s["job"] == job["name"]], wall_s) for job in jobs}

    results = combine(task_cfg, per_task, parts[0]["device"]) | {"backend": "ray", "shards": len(shards)}
    write_results(spec.out, results)
    return results
