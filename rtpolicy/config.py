"""Hydra structured configs: every option is a dataclass in the ConfigStore, so unknown keys and
wrong types fail at launch. YAML under ``conf/`` only picks among them and sets values.

Groups: ``task=`` (conf/task/*.yaml on the ``metaworld`` schema), ``policy=`` and ``denoiser=``
(one registered dataclass per head / denoiser, see the registries).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TaskConfig:
    """A demonstration source + evaluation environment."""

    env: str = "metaworld"  # environment family (rtpolicy.envs registry)
    name: str = MISSING  # e.g. pick-place-v3
    dataset: str = "data/metaworld/${task.name}.zarr"  # zarr replay buffer; collected if missing
    demos: int = 50  # episodes to collect when the dataset is missing
    demo_seed: int = 0
    action_noise: float = 0.0  # Gaussian std added to expert actions while collecting
    obs_keys: list[str] = field(default_factory=lambda: ["state"])
    action_key: str = "action"
    max_episode_steps: int = 200
    num_tasks: int = 0  # >0: multi-task, dataset has data/task_id, the policy gets a task embedding
    tasks: list[str] = field(default_factory=list)  # a suite (e.g. MT10): member tasks; task_id = index, num_tasks = len
    task_id: int = 0  # this task's index among num_tasks (set per member when a suite is evaluated)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.95, 0.999])
    warmup_steps: int = 100
    grad_clip: float = 1.0


@dataclass
class TrainLoopConfig:
    steps: int = 2000
    batch_size: int = 256
    val_fraction: float = 0.05  # share of episodes held out for validation loss
    val_every: int = 500
    eval_every: int = 0  # 0: rollout evaluation only at the end
    ckpt_every: int = 1000
    ema_decay: float = 0.995
    log_every: int = 50
    num_workers: int = 0
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default


@dataclass
class EvalConfig:
    episodes: int = 30
    num_envs: int = 4  # parallel simulator processes (gymnasium AsyncVectorEnv)
    seed: int = 100_000  # evaluation seeds never overlap demo seeds
    max_episode_steps: Optional[int] = None  # None: task.max_episode_steps
    video: int = 0  # number of episodes to save as mp4
    latency_reps: int = 30  # batch-1 predict_chunk timings for chunk_ms_p50/p95
    out: Optional[str] = None  # results JSON path


@dataclass
class TrainConfig:
    task: TaskConfig = MISSING
    policy: Any = MISSING
    denoiser: Any = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"  # auto | cpu | cuda
    run_dir: Optional[str] = None  # None: runs/<task>/<policy>-<denoiser>/<timestamp>, or the newest one with resume
    resume: bool = False


@dataclass
class EvalMainConfig:
    checkpoint: str = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"
    policy: dict[str, Any] = field(default_factory=dict)  # inference-time overrides, e.g. +policy.num_inference_steps=4


def register_configs() -> ConfigStore:
    """Put every schema and every registered policy/denoiser config into Hydra's ConfigStore."""
    from rtpolicy.policies import load_all  # registers heads, denoisers
    from rtpolicy.policies.base import POLICIES
    from rtpolicy.policies.denoisers.base import DENOISERS

    load_all()
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalMainConfig)
    cs.store(group="task", name="metaworld_schema", node=TaskConfig)
    for name, entry in POLICIES.items():
        cs.store(group="policy", name=name, node=entry.config)
    for name, entry in DENOISERS.items():
        cs.store(group="denoiser", name=name, node=entry.config)
    return cs
