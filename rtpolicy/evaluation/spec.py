"""Typed evaluation settings: what the config's ``eval.*`` asks (:class:`EvalSpec`) and the checked plan of one
task's rollouts (:class:`RolloutPlan`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class EvalSpec:
    """The episode settings of an evaluation (the fields of ``EvalConfig`` the rollouts read)."""

    episodes: int = 30
    num_envs: int = 4
    seed: int = 100_000
    max_episode_steps: int | None = None  # None: the task's
    video: int = 0
    latency_reps: int = 30
    out: str | None = None  # results JSON path; None: written nowhere

    @classmethod
    def from_cfg(cls, cfg: Any) -> EvalSpec:
        """From an ``EvalConfig``, DictConfig, mapping or any object with these attributes (missing: defaults)."""
        if isinstance(cfg, EvalSpec):
            return cfg
        get = (lambda k: cfg.get(k)) if isinstance(cfg, Mapping) else (lambda k: getattr(cfg, k, None))
        values = {f.name: get(f.name) for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if v is not None or k in ("max_episode_steps", "out")})

    def replace(self, **changes: Any) -> EvalSpec:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class RolloutPlan:
    """One task's checked rollout settings: ``episodes`` in rounds of ``n`` envs, seeds ``base_seed + i``, at most
    ``max_steps`` steps each, ``reps`` latency probes, the first ``n_video`` episodes filmed; the policy's
    ``To`` observation steps and ``Ha`` executed actions per chunk."""

    episodes: int
    n: int
    base_seed: int
    max_steps: int
    reps: int
    n_video: int
    To: int
    Ha: int

    @classmethod
    def make(cls, policy, fields: dict[str, Any], spec: EvalSpec, video_dir: str | Path | None) -> RolloutPlan:
        """ValueError naming the eval field for a bad value."""
        max_steps = int(spec.max_episode_steps or fields["max_episode_steps"])
        n_video = int(spec.video or 0) if video_dir is not None else 0
        checks = [("episodes", spec.episodes, 1), ("num_envs", spec.num_envs, 1), ("latency_reps", spec.latency_reps, 1),
                  ("max_episode_steps", max_steps, 1), ("seed", spec.seed, 0), ("video", n_video, 0)]  # fmt: skip
        for name, value, low in checks:
            if int(value) < low:
                raise ValueError(f"eval.{name} must be >= {low}, got {value}")
        To, Ha = int(policy.obs_horizon), int(policy.action_horizon)
        if To < 1 or Ha < 1:
            raise ValueError(f"policy.obs_horizon and policy.action_horizon must be >= 1, got {To}, {Ha}")
        episodes = int(spec.episodes)
        return cls(episodes=episodes, n=min(int(spec.num_envs), episodes), base_seed=int(spec.seed), max_steps=max_steps,
                   reps=int(spec.latency_reps), n_video=min(n_video, episodes), To=To, Ha=Ha)

    def replace(self, **changes: Any) -> RolloutPlan:
        return dataclasses.replace(self, **changes)
