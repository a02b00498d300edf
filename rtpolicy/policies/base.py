"""The policy interface every head implements; the simulator runner and the ROS 2 node call only this.

Observation dicts (raw, unnormalized units):
    obs[key]        (B, To, *shape)  float tensors, one per observation key, oldest step first
    obs["task_id"]  (B,)             long, only for multi-task policies
Action chunks: (B, Ha, Da) in raw action units, the first row to be executed now.
Training batches add batch["action"]: (B, H, Da), the window predicted by the head.
"""

from __future__ import annotations

import abc

import torch
from torch import nn

from rtpolicy.registry import Registry


class Policy(nn.Module, abc.ABC):
    obs_horizon: int
    action_horizon: int

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget per-episode state (observation queues, streaming buffers)."""

    @abc.abstractmethod
    def predict_chunk(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """obs -> actions (B, Ha, Da) in raw units, to be executed in order from now."""

    @abc.abstractmethod
    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """batch -> (scalar loss, metrics for logging)."""


POLICIES: Registry[Policy] = Registry("policy")
