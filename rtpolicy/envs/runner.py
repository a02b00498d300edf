"""Closed-loop evaluation of a Policy in parallel simulator processes.

Episodes run in rounds of ``num_envs`` (gymnasium AsyncVectorEnv). Episode ``i`` uses layout seed
``eval.seed + i``; the round starting at episode ``s`` seeds the policy's sampling noise with
``eval.seed + s``, so a round's outcomes do not depend on the rounds played before it (``eval.backend=ray``
plays blocks of rounds on Ray workers, :mod:`rtpolicy.envs.ray_runner`, with the same per-episode results).
Each env keeps an observation history of the last ``policy.obs_horizon`` steps (the first observation
repeated at reset); every ``policy.action_horizon`` steps the policy is
called once for the whole batch and its chunk is executed one action per step (receding horizon).
Envs are absorbing once their episode ends, so finished envs simply idle until the round ends.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import multiprocessing
import sys
import time
from collections.abc import Mapping
from types import SimpleNamespace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from rtpolicy.envs import env_factory, suite_members, task_fields

Z95 = 1.959963984540054
WORKER_PRELOAD = ("rtpolicy.envs", "metaworld.env_dict", "metaworld.policies")
LATENCY_WARMUP = 3


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (lo, hi) of a binomial proportion ``successes / n`` (95% for the default z)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if isinstance(successes, bool) or not isinstance(successes, (int, np.integer)) or not 0 <= successes <= n:
        raise ValueError(f"successes must be an int in [0, {n}], got {successes!r}")
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, center - half)
    hi = 1.0 if successes == n else min(1.0, center + half)
    return lo, hi


def _start_method(context: str | None) -> str:
    """The workers' start method: forkserver by default (fork would copy torch's thread pools, a CUDA
    context and logger threads into the workers), spawn where there is no forkserver."""
    methods = multiprocessing.get_all_start_methods()
    if context is None:
        context = "forkserver" if "forkserver" in methods else "spawn"
    if context not in methods:
        raise ValueError(f"multiprocessing start method {context!r} is not available here; choose one of {methods}")
    if context == "forkserver":
        # if this process starts the fork server, it imports the simulator once and every worker forks from it
        multiprocessing.get_context("forkserver").set_forkserver_preload(list(WORKER_PRELOAD))
    return context


@contextlib.contextmanager
def _main_module_hidden():
    """Start spawn/forkserver workers without re-running the main script in each of them.

    Workers need nothing from ``__main__`` (the env factories live in :mod:`rtpolicy.envs`), but
    multiprocessing re-imports the main script in every spawned child by default: for ``train.py``
    that is torch, hydra and every policy head, ~5 s per worker. Without ``__file__``/``__spec__`` on
    ``__main__`` (as in an interactive session) the children skip it.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    spec, missing = getattr(main, "__spec__", None), object()
    file = main.__dict__.get("__file__", missing)
    try:
        main.__spec__ = None
        if file is not missing:
            del main.__file__
        yield
    finally:
        main.__spec__ = spec
        if file is not missing:
            main.__file__ = file


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_torch(policy, hist: dict[str, np.ndarray], task_id: np.ndarray | None, device: torch.device,
              rows=slice(None)) -> dict[str, torch.Tensor]:
    """Histories {key: (B, To, *shape)} (+ task ids (B,)) -> the policy's obs dict (through its processor, e.g.
    instruction_id -> lang_emb), rows selected, on ``device``."""
    obs = {k: torch.from_numpy(np.ascontiguousarray(v[rows])).to(device) for k, v in hist.items()}
    if task_id is not None:
        obs["task_id"] = torch.from_numpy(np.ascontiguousarray(task_id[rows])).long().to(device)
    processor = getattr(policy, "processor", None)
    return processor(obs) if processor is not None else obs


def _predict(policy, obs: dict[str, torch.Tensor], batch: int, action_dim: int) -> np.ndarray:
    """policy.predict_chunk -> checked numpy chunk (B, Ha, Da) float32."""
    with torch.inference_mode():
        chunk = policy.predict_chunk(obs)
    if not isinstance(chunk, torch.Tensor):
        raise TypeError(f"predict_chunk must return a tensor (B, Ha, Da), got {type(chunk).__name__}")
    chunk = chunk.detach().float().cpu().numpy()
    ha = policy.action_horizon
    if chunk.ndim != 3 or chunk.shape[0] != batch or chunk.shape[1] < ha or chunk.shape[2] != action_dim:
        raise ValueError(
            f"predict_chunk returned shape {chunk.shape}, expected ({batch}, >={ha}, {action_dim}) = (B, action_horizon, Da)"
        )
    if not np.isfinite(chunk).all():
        raise ValueError("predict_chunk returned a non-finite action")
    return chunk


def _write_video(path: Path, frames: list[np.ndarray], fps: int) -> None:
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=7, macro_block_size=8, ffmpeg_log_level="error") as writer:
        for frame in frames:
            writer.append_data(frame)


def evaluate(
    policy,
    task_cfg: Any,
    eval_cfg: Any,
    device: str | torch.device = "cpu",
    video_dir: str | Path | None = None,
    progress: bool = True,
    context: str | None = None,
) -> dict[str, Any]:
    """Roll out ``policy`` for ``eval_cfg.episodes`` episodes of ``task_cfg``; returns JSON-able results.

    Keys: ``success`` (mean), ``ci95`` ([lo, hi], Wilson), ``episodes``, ``successes``, ``mean_length``,
    ``chunk_ms_p50``/``chunk_ms_p95`` (batch-1 predict_chunk latency on real observations, after
    warm-up), ``rollout_chunk_ms_p50`` (batched calls during the rollouts), ``per_episode``
    ([{seed, success, length, return}]; return: the episode's summed reward), ``videos`` (mp4 paths; the first ``eval_cfg.video`` episodes when
    ``video_dir`` is given), and a few settings. Written as JSON to ``eval_cfg.out`` when set.
    ``context``: multiprocessing start method of the simulator workers (default forkserver).
    ``eval_cfg.backend == "ray"``: the same evaluation sharded over Ray workers (:mod:`rtpolicy.envs.ray_runner`).
    """
    if str(getattr(eval_cfg, "backend", "local")) == "ray":
        from rtpolicy.envs.ray_runner import evaluate_ray

        return evaluate_ray(policy, task_cfg, eval_cfg, video_dir=video_dir, progress=progress, context=context)
    members = suite_members(task_cfg)
    chain = chain_length(task_cfg)
    if members and chain > 0:
        return _evaluate_chains(policy, task_cfg, chain, eval_cfg, device, video_dir, progress, context)
    if members:
        return _evaluate_suite(policy, task_cfg, members, eval_cfg, device, video_dir, progress, context)
    fields = task_fields(task_cfg)
    s = settings(policy, fields, eval_cfg, video_dir)
    device = torch.device(device)
    # policy sampling noise is seeded too (the caller's RNG state is restored afterwards)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(s.base_seed)
        results = _run(policy, fields, s.n, s.episodes, s.base_seed, s.max_steps, s.To, s.Ha, s.reps, s.n_video, video_dir,
                       device, progress, context)
    _write_results(eval_cfg, results)
    return results


def chain_length(task_cfg: Any) -> int:
    """``task.chain_length`` (0: no chains) of a config or mapping."""
    return int((task_cfg.get("chain_length") if isinstance(task_cfg, Mapping) else getattr(task_cfg, "chain_length", 0)) or 0)


def settings(policy, fields: dict[str, Any], eval_cfg: Any, video_dir: str | Path | None) -> SimpleNamespace:
    """The checked settings of one task's evaluation: episodes, n (envs per round), base_seed, max_steps,
    reps, n_video, To, Ha; ValueError naming the eval field for a bad value."""
    episodes = int(eval_cfg.episodes)
    num_envs = int(eval_cfg.num_envs)
    reps = int(eval_cfg.latency_reps)
    max_steps = int(eval_cfg.max_episode_steps or fields["max_episode_steps"])
    n_video = int(eval_cfg.video or 0) if video_dir is not None else 0
    base_seed = int(eval_cfg.seed)
    checks = [("episodes", episodes, 1), ("num_envs", num_envs, 1), ("latency_reps", reps, 1),
              ("max_episode_steps", max_steps, 1), ("seed", base_seed, 0), ("video", n_video, 0)]  # fmt: skip
    for name, value, low in checks:
        if value < low:
            raise ValueError(f"eval.{name} must be >= {low}, got {value}")
    To, Ha = int(policy.obs_horizon), int(policy.action_horizon)
    if To < 1 or Ha < 1:
        raise ValueError(f"policy.obs_horizon and policy.action_horizon must be >= 1, got {To}, {Ha}")
    return SimpleNamespace(episodes=episodes, n=min(num_envs, episodes), base_seed=base_seed, max_steps=max_steps,
                           reps=reps, n_video=min(n_video, episodes), To=To, Ha=Ha)


def _write_results(eval_cfg: Any, results: dict[str, Any]) -> None:
    """Results as JSON to ``eval_cfg.out`` when set."""
    if getattr(eval_cfg, "out", None):
        out = Path(eval_cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))


def _evaluate_suite(policy, task_cfg, members, eval_cfg, device, video_dir, progress, context) -> dict[str, Any]:
    """Each member task for ``eval_cfg.episodes`` episodes (same seeds); pooled and per-task figures.

    ``success`` is the mean over tasks (equal episodes per task, so also the pooled rate), ``ci95`` the
    Wilson interval of the pooled successes, ``episodes`` the total; latency figures are medians over
    tasks; ``per_task`` maps each task to its own results (without per-episode lists).
    """
    member_cfg = suite_member_cfg(eval_cfg)
    per_task = {fields["name"]: evaluate(policy, fields, member_cfg, device=device, progress=progress, context=context,
                                         video_dir=Path(video_dir) / fields["name"] if video_dir is not None else None)
                for fields in members}
    results = suite_results(task_cfg, per_task, device)
    _write_results(eval_cfg, results)
    return results


def suite_member_cfg(eval_cfg: Any) -> SimpleNamespace:
    """The eval settings each suite member is evaluated with (the suite's, written nowhere)."""
    keys = ("episodes", "num_envs", "seed", "max_episode_steps", "video", "latency_reps")
    return SimpleNamespace(**{k: getattr(eval_cfg, k, None) for k in keys}, out=None)


def suite_results(task_cfg: Any, per_task: dict[str, dict[str, Any]], device) -> dict[str, Any]:
    """Members' results {task: results of :func:`evaluate`} -> the suite's (see :func:`_evaluate_suite`)."""
    per_episode, videos = [], []
    for name, res in per_task.items():
        per_episode += [e | {"task": name} for e in res.pop("per_episode")]
        videos += res.pop("videos")
    successes = sum(r["successes"] for r in per_task.values())
    episodes = sum(r["episodes"] for r in per_task.values())
    lo, hi = wilson_interval(successes, episodes)
    med = lambda key: float(np.median([r[key] for r in per_task.values()]))  # noqa: E731
    results = {
        "task": task_fields(task_cfg)["name"],
        "success": float(np.mean([r["success"] for r in per_task.values()])),
        "ci95": [lo, hi],
        "episodes": episodes,
        "successes": int(successes),
        "mean_length": float(np.mean([e["length"] for e in per_episode])),
        "chunk_ms_p50": med("chunk_ms_p50"),
        "chunk_ms_p95": med("chunk_ms_p95"),
        "rollout_chunk_ms_p50": med("rollout_chunk_ms_p50"),
        "device": str(device),
        "per_task": per_task,
        "per_episode": per_episode,
        "videos": videos,
    }
    return results


def _evaluate_chains(policy, task_cfg, chain: int, eval_cfg, device, video_dir, progress, context) -> dict[str, Any]:
    """The CALVIN protocol: ``eval_cfg.episodes`` chains of ``chain`` feasible subtasks (env task ``chain<N>``).

    Each subtask gets ``task.max_episode_steps`` steps; the policy is conditioned on the current subtask
    (``obs["task_id"]`` switches) and re-plans from a reset at every switch; a chain stops at its first
    failed subtask. Adds ``chain_success`` ([rate of chains completing >= k subtasks for k = 1..N]),
    ``avg_chain_length`` (mean completed subtasks) and ``chain_length`` to the usual results, whose
    ``success`` is the rate of fully completed chains.
    """
    fields, cfg = chain_setup(task_cfg, chain, eval_cfg)
    results = chain_results(task_cfg, chain, evaluate(policy, fields, cfg, device=device, video_dir=video_dir,
                                                      progress=progress, context=context))
    _write_results(eval_cfg, results)
    return results


def chain_setup(task_cfg: Any, chain: int, eval_cfg: Any) -> tuple[dict[str, Any], SimpleNamespace]:
    """The env fields (task ``chain<N>``, N subtasks' steps) and eval settings of a chain evaluation."""
    fields = task_fields(task_cfg)
    fields |= {"name": f"chain{chain}", "max_episode_steps": chain * fields["max_episode_steps"]}
    keys = ("episodes", "num_envs", "seed", "video", "latency_reps")
    return fields, SimpleNamespace(**{k: getattr(eval_cfg, k, None) for k in keys}, max_episode_steps=None, out=None)


def chain_results(task_cfg: Any, chain: int, results: dict[str, Any]) -> dict[str, Any]:
    """The chains' results plus the CALVIN figures (see :func:`_evaluate_chains`)."""
    completed = np.array([e["completed"] for e in results["per_episode"]])
    results |= {"task": task_fields(task_cfg)["name"], "chain_length": chain,
                "chain_success": [float((completed >= k).mean()) for k in range(1, chain + 1)],
                "avg_chain_length": float(completed.mean())}
    return results


def _run(policy, fields, n, episodes, base_seed, max_steps, To, Ha, reps, n_video, video_dir, device, progress, context) -> dict[str, Any]:
    """The rollouts (rounds of n envs) and the latency measurement; see :func:`evaluate`."""
    import gymnasium
    from gymnasium.vector import AutoresetMode

    fns = [
        functools.partial(env_factory, fields, base_seed + i, n_video > 0, {"max_episode_steps": max_steps}) for i in range(n)
    ]
    per_episode: list[dict[str, Any]] = []
    videos: list[str] = []
    rollout_ms: list[float] = []
    latency_obs: list[dict[str, torch.Tensor]] = []  # consecutive batch-1 observations of env 0
    bar = tqdm(total=episodes, desc=f"eval {fields['name']}", unit="ep", disable=not progress)
    t_start = time.perf_counter()
    start_method = _start_method(context)
    with _main_module_hidden() if start_method != "fork" else contextlib.nullcontext():
        envs = gymnasium.vector.AsyncVectorEnv(fns, context=start_method, autoreset_mode=AutoresetMode.DISABLED)
    startup_s = time.perf_counter() - t_start
    try:
        action_dim = int(envs.single_action_space.shape[0])
        fps = int(envs.get_attr("metadata")[0].get("render_fps", 30)) if n_video else 30
        for start in range(0, episodes, n):
            active = min(n, episodes - start)
            seeds = [base_seed + start + j for j in range(n)]  # extra envs of a short last round run unrecorded
            if n_video:
                envs.set_attr("record_frames", [start + j < n_video for j in range(n)])
            torch.manual_seed(base_seed + start)  # per round: the same noise wherever the round is played
            policy.reset()
            obs, _ = envs.reset(seed=seeds)
            task_id = obs.pop("task_id", None)
            hist = {k: np.repeat(v[:, None], To, axis=1) for k, v in obs.items()}  # (n, To, *shape)
            done = np.arange(n) >= active
            success = np.zeros(n, dtype=bool)
            length = np.zeros(n, dtype=np.int64)
            ret = np.zeros(n)  # summed reward until the episode ends
            completed = np.zeros(n, dtype=np.int64)  # subtasks done (chain envs report info["completed"])
            chains = False
            chunk = None
            t = pos = 0
            while not done.all():
                if chunk is None or pos == Ha:
                    pos = 0
                    batch_obs = _to_torch(policy, hist, task_id, device)
                    tic = time.perf_counter()
                    chunk = _predict(policy, batch_obs, n, action_dim)
                    rollout_ms.append((time.perf_counter() - tic) * 1e3)
                    if not done[0] and len(latency_obs) < reps + LATENCY_WARMUP:
                        latency_obs.append(_to_torch(policy, hist, task_id, device, slice(0, 1)))
                action = chunk[:, pos]
                pos += 1
                obs, reward, terminated, truncated, info = envs.step(action)
                ret[~done] += np.asarray(reward, dtype=np.float64)[~done]
                new_task = obs.pop("task_id", None)
                t += 1
                ended = (terminated | truncated) & ~done
                success |= ended & terminated
                length[ended] = t
                if "completed" in info:
                    chains = True
                    completed[ended] = np.asarray(info["completed"])[ended]
                done |= ended
                if task_id is not None and new_task is not None and (new_task[~done] != task_id[~done]).any():
                    policy.reset()  # a chain moved on to its next subtask: re-plan for it now
                    chunk = None
                task_id = new_task
                for k, v in obs.items():
                    hist[k] = np.concatenate([hist[k][:, 1:], v[:, None]], axis=1)
                if t > max_steps:
                    raise RuntimeError(f"episodes did not end within max_episode_steps={max_steps}; the env ignores its limit")
            if n_video and start < n_video:
                all_frames = envs.call("pop_frames")
                for j in range(active):
                    i = start + j
                    if i < n_video:
                        path = Path(video_dir) / f"episode_{i:03d}_seed_{seeds[j]}.mp4"
                        _write_video(path, list(all_frames[j]), fps)
                        videos.append(str(path))
            for j in range(active):
                per_episode.append({"seed": seeds[j], "success": bool(success[j]), "length": int(length[j]),
                                    "return": float(ret[j])}
                                   | ({"completed": int(completed[j])} if chains else {}))
            bar.update(active)
            bar.set_postfix(success=f"{np.mean([e['success'] for e in per_episode]):.2f}")
    finally:
        bar.close()
        envs.close()

    # batch-1 latency on real observations from the rollouts, after warm-up calls
    policy.reset()
    latency_ms = []
    for r in range(LATENCY_WARMUP + reps):
        obs1 = latency_obs[r % len(latency_obs)]
        _sync(device)
        tic = time.perf_counter()
        _predict(policy, obs1, 1, action_dim)
        _sync(device)
        if r >= LATENCY_WARMUP:
            latency_ms.append((time.perf_counter() - tic) * 1e3)
    policy.reset()

    successes = sum(e["success"] for e in per_episode)
    lo, hi = wilson_interval(successes, episodes)
    return {
        "task": fields["name"],
        "success": successes / episodes,
        "ci95": [lo, hi],
        "episodes": episodes,
        "successes": int(successes),
        "mean_length": float(np.mean([e["length"] for e in per_episode])),
        "chunk_ms_p50": float(np.percentile(latency_ms, 50)),
        "chunk_ms_p95": float(np.percentile(latency_ms, 95)),
        "rollout_chunk_ms_p50": float(np.percentile(rollout_ms, 50)),
        "num_envs": n,
        "max_episode_steps": max_steps,
        "seed": base_seed,
        "device": str(device),
        "env_startup_s": startup_s,
        "wall_s": time.perf_counter() - t_start,
        "per_episode": per_episode,
        "videos": videos,
    }
