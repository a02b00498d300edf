"""Closed-loop evaluation: :func:`evaluate` plays a single task, a suite or CALVIN-style chains.

    evaluate(policy, task_cfg, eval_cfg)
      ├─ suite (task.tasks)        ─► evaluate_task per member ─► suite.suite_results
      ├─ chains (+ chain_length)   ─► evaluate_task on chain<N> ─► chains.chain_results
      └─ one task                  ─► evaluate_task
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

__all__ = ["EvalSpec", "RolloutPlan", "evaluate", "evaluate_task", "wilson_interval"]


def evaluate(policy, task_cfg: Any, eval_cfg: Any, device: str | torch.device = "cpu", video_dir: str | Path | None = None,
             progress: bool = True, context: str | None = None) -> dict[str, Any]:
    """Roll out ``policy`` on ``task_cfg`` with the settings of ``eval_cfg`` (``EvalConfig`` or anything
    :meth:`EvalSpec.from_cfg` reads); ``context``: the simulator workers' start method (default forkserver)."""
    if str(getattr(eval_cfg, "backend", "local")) == "ray":
        from rtpolicy.evaluation.ray import evaluate_ray

        return evaluate_ray(policy, task_cfg, eval_cfg, video_dir=video_dir, progress=progress, context=context)
    spec = EvalSpec.from_cfg(eval_cfg)
    members, chain = suite_members(task_cfg), chain_length(task_cfg)
    if members and chain > 0:
        fields, chain_spec = chain_setup(task_cfg, chain, spec)
        results = chain_results(task_cfg, chain, evaluate_task(policy, fields, chain_spec, device, video_dir, progress, context))
    elif members:
        per_task = {f["name"]: evaluate_task(policy, f, member_spec(spec), device,
                                             Path(video_dir) / f["name"] if video_dir is not None else None, progress, context)
                    for f in members}
        results = suite_results(task_cfg, per_task, torch.device(device))
    else:
        results = evaluate_task(policy, task_fields(task_cfg), spec, device, video_dir, progress, context)
    write_results(spec.out, results)
    return results


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
