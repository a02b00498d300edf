"""Suite aggregation: every member task for the same episodes, pooled and per-task figures."""

from __future__ import annotations

from typing import Any

import numpy as np

from rtpolicy.envs import task_fields
from rtpolicy.evaluation.spec import EvalSpec
from rtpolicy.evaluation.stats import wilson_interval


def member_spec(spec: EvalSpec) -> EvalSpec:
    """The settings each member is evaluated with: the suite's, written nowhere."""
    return spec.replace(out=None)


def suite_results(task_cfg: Any, per_task: dict[str, dict[str, Any]], device) -> dict[str, Any]:
    """Members' results {task: a task's results} -> the suite's: ``success`` is the mean over tasks (equal episodes
    per task, so also the pooled rate), ``ci95`` the Wilson interval of the pooled successes, ``episodes`` the
    total; latency figures are medians over tasks; ``per_task`` maps each task to its own results (without
    per-episode lists, which are pooled into ``per_episode`` with a ``task`` field)."""
    per_episode, videos = [], []
    for name, res in per_task.items():
        per_episode += [e | {"task": name} for e in res.pop("per_episode")]
        videos += res.pop("videos")
    successes = sum(r["successes"] for r in per_task.values())
    episodes = sum(r["episodes"] for r in per_task.values())
    lo, hi = wilson_interval(successes, episodes)
    med = lambda key: float(np.median([r[key] for r in per_task.values()]))  # noqa: E731
    return {
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
