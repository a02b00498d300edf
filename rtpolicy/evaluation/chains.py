"""Chain evaluation, the CALVIN protocol: ``episodes`` chains of N feasible subtasks (env task ``chain<N>``).

Each subtask gets ``task.max_episode_steps`` steps; the policy is conditioned on the current subtask
(``obs["task_id"]`` switches; the rollout re-plans from a reset at every switch); a chain stops at its first
failed subtask. The results add ``chain_success`` ([rate of chains completing >= k subtasks for k = 1..N]),
``avg_chain_length`` (mean completed subtasks) and ``chain_length``; their ``success`` is the rate of fully
completed chains.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from rtpolicy.envs import task_fields
from rtpolicy.evaluation.spec import EvalSpec


def chain_length(task_cfg: Any) -> int:
    """``task.chain_length`` (0: no chains) of a config or mapping."""
    return int((task_cfg.get("chain_length") if isinstance(task_cfg, Mapping) else getattr(task_cfg, "chain_length", 0)) or 0)


def chain_setup(task_cfg: Any, chain: int, spec: EvalSpec) -> tuple[dict[str, Any], EvalSpec]:
    """The env fields (task ``chain<N>``, N subtasks' steps) and episode settings of a chain evaluation."""
    fields = task_fields(task_cfg)
    fields |= {"name": f"chain{chain}", "max_episode_steps": chain * fields["max_episode_steps"]}
    return fields, spec.replace(max_episode_steps=None, out=None)


def chain_results(task_cfg: Any, chain: int, results: dict[str, Any]) -> dict[str, Any]:
    """The chain task's results plus the CALVIN figures (see the module docstring)."""
    completed = np.array([e["completed"] for e in results["per_episode"]])
    return results | {"task": task_fields(task_cfg)["name"], "chain_length": chain,
                      "chain_success": [float((completed >= k).mean()) for k in range(1, chain + 1)],
                      "avg_chain_length": float(completed.mean())}
