"""Closed-loop rollouts of a Policy in parallel simulator processes.

Episodes run in rounds of ``plan.n`` envs (gymnasium AsyncVectorEnv). Episode ``i`` uses layout seed
``plan.base_seed + i``; the round starting at episode ``s`` seeds the policy's sampling noise with
``base_seed + s``, so a round's outcomes do not depend on the rounds played before it (Ray workers play
blocks of rounds with the same per-episode results, :mod:`rtpolicy.evaluation.ray`). Each env keeps an
observation history of the last ``To`` steps (the first observation repeated at reset); every ``Ha``
steps the policy's processor turns the histories into network inputs and the policy is called once for
the whole batch; its chunk is executed one action per step (receding horizon). Envs are absorbing once
their episode ends, so finished envs simply idle until the round ends. A chain env's subtask switch
(``task_id`` changes) resets the policy and re-plans at once.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from rtpolicy.envs import env_factory
from rtpolicy.evaluation.latency import WARMUP, probe
from rtpolicy.evaluation.spec import RolloutPlan
from rtpolicy.evaluation.stats import wilson_interval

WORKER_PRELOAD = ("rtpolicy.envs", "metaworld.env_dict", "metaworld.policies")


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


def play(policy, fields: dict[str, Any], plan: RolloutPlan, device: torch.device, video_dir: str | Path | None = None,
         progress: bool = True, context: str | None = None) -> dict[str, Any]:
    """One task's episodes (rounds of ``plan.n`` envs) and the latency probe on observations they met -> results:
    ``success``, ``ci95`` (Wilson), ``episodes``, ``successes``, ``mean_length``, ``chunk_ms_p50``/``p95`` (batch-1,
    :mod:`rtpolicy.evaluation.latency`), ``rollout_chunk_ms_p50`` (the batched calls), ``per_episode`` ([{seed,
    success, length, return (summed reward), completed (chain envs)}]), ``videos`` and the settings. The caller
    seeds torch (each round reseeds from its first episode's seed)."""
    import gymnasium
    from gymnasium.vector import AutoresetMode

    n, episodes, base_seed, max_steps, To, Ha = plan.n, plan.episodes, plan.base_seed, plan.max_steps, plan.To, plan.Ha
    reps, n_video = plan.reps, plan.n_video
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
                    if not done[0] and len(latency_obs) < reps + WARMUP:
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

    latency = probe(policy, latency_obs, reps, device)
    successes = sum(e["success"] for e in per_episode)
    lo, hi = wilson_interval(successes, episodes)
    return {
        "task": fields["name"],
        "success": successes / episodes,
        "ci95": [lo, hi],
        "episodes": episodes,
        "successes": int(successes),
        "mean_length": float(np.mean([e["length"] for e in per_episode])),
        **latency,
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
