"""Closed-loop evaluation: :func:`evaluate` plays a single task, a suite or CALVIN-style chains.

    evaluate(policy, task_cfg, eval_cfg)
      task_jobs: suite (task.tasks) ─► each member; chains (+ chain_length) ─► chain<N>; else the task
      ─► evaluate_task per job ─► combine: suite.suite_results | chains.chain_results | the one result
    evaluate_task = RolloutPlan (spec.py) ─► rollout.play (vector envs + processor + policy) ─► latency.probe
    eval.backend=ray: the same jobs as blocks of rounds on Ray actors (ray.py), same per-episode results

Results are JSON-able (see :func:`rtpolicy.evaluation.rollout.play`), written to ``eval.out`` when set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rtpolicy.envs import suite_members, task_fields
from rtpolicy.evaluation.chains import chain_length, chain_results, chain_setup
from rtpolicy.evaluation.rollout import play
from rtpolicy.evaluation.spec import EvalSpec, RolloutPlan
from rtpolicy.evaluation.stats import wilson_interval
from rtpolicy.evaluation.suite import member_spec, suite_results

__all__ = ["EvalSpec", "RolloutPlan", "combine", "evaluate", "evaluate_task", "task_jobs", "wilson_interval"]


def evaluate(policy, task_cfg: Any, eval_cfg: Any, device: str | torch.device = "cpu", video_dir: str | Path | None = None,
             progress: bool = True, context: str | None = None) -> dict[str, Any]:
    """Roll out ``policy`` on ``task_cfg`` with the settings of ``eval_cfg`` (``EvalConfig`` or anything
    :meth:`EvalSpec.from_cfg` reads); ``context``: the simulator workers' start method (default forkserver)."""
    if str(getattr(eval_cfg, "backend", "local")) == "ray":
        from rtpolicy.evaluation.ray import evaluate_ray

        return evaluate_ray(policy, task_cfg, eval_cfg, video_dir=video_dir, progress=progress, context=context)
    spec = EvalSpec.from_cfg(eval_cfg)
    per_task = {fields["name"]: evaluate_task(policy, fields, s, device, vd, progress, context)
                for fields, s, vd in task_jobs(task_cfg, spec, video_dir)}
    results = combine(task_cfg, per_task, torch.device(device))
    write_results(spec.out, results)
    return results


def task_jobs(task_cfg: Any, spec: EvalSpec, video_dir: str | Path | None) -> list[tuple[dict[str, Any], EvalSpec, Path | None]]:
    """The single-task evaluations an evaluation of ``task_cfg`` consists of, as (env fields, settings, video
    folder): the ``chain<N>`` task of a chain suite, each member of a suite (videos in a folder per member), or
    the task itself. The local runner plays them in this order; Ray shards them."""
    members, chain = suite_members(task_cfg), chain_length(task_cfg)
    if members and chain > 0:
        fields, chain_spec = chain_setup(task_cfg, chain, spec)
        return [(fields, chain_spec, video_dir)]
    if members:
        return [(f, member_spec(spec), Path(video_dir) / f["name"] if video_dir is not None else None) for f in members]
    return [(task_fields(task_cfg), spec, video_dir)]


def combine(task_cfg: Any, per_task: dict[str, dict[str, Any]], device) -> dict[str, Any]:
    """The results of :func:`task_jobs`' evaluations {task name: results} -> the evaluation's results: with the
    CALVIN figures for a chain suite (:func:`chains.chain_results`), pooled for a suite (:func:`suite.suite_results`)."""
    members, chain = suite_members(task_cfg), chain_length(task_cfg)
    if members and chain > 0:
        return chain_results(task_cfg, chain, next(iter(per_task.values())))
    if members:
        return suite_results(task_cfg, per_task, device)
    return next(iter(per_task.values()))


def evaluate_task(policy, fields: dict[str, Any], spec: EvalSpec, device: str | torch.device = "cpu",
                  video_dir: str | Path | None = None, progress: bool = True, context: str | None = None) -> dict[str, Any]:
    """One task's episodes (env ``fields``); policy sampling noise is seeded from the episode seeds and the
    caller's RNG state restored afterwards."""
    plan = RolloutPlan.make(policy, fields, spec, video_dir)
    device = torch.device(device)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(plan.base_seed)
        return play(policy, fields, plan, device, video_dir, progress, context)


def write_results(out: str | Path | None, results: dict[str, Any]) -> None:
    """Results as JSON to ``out`` when set."""
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
