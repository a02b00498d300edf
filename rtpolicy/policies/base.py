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
    #: set by rtpolicy.factory.build_policy: {policy, denoiser (config dicts), shapes, num_tasks}, which with the
    #: state dict rebuilds this policy elsewhere (rtpolicy.factory.policy_from_stored)
    spec: dict | None = None

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


def check_obs(obs: dict[str, torch.Tensor], shapes: dict[str, list[int]], obs_horizon: int) -> int:
    """Validate an observation dict against the policy's specs; returns the batch size.

    Raises ValueError naming the key for a missing key, a wrong shape or a non-finite value.
    """
    batch = None
    for key, shape in shapes.items():
        if key not in obs:
            raise ValueError(f"observation is missing key {key!r}; got keys {sorted(obs)}")
        x = obs[key]
        expected = (obs_horizon, *shape)
        if x.ndim != len(expected) + 1 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"observation {key!r} has shape {tuple(x.shape)}, expected (B, {', '.join(map(str, expected))})")
        if batch is not None and x.shape[0] != batch:
            raise ValueError(f"observation {key!r} has batch {x.shape[0]}, other keys have {batch}")
        batch = x.shape[0]
        if x.is_floating_point() and not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).nonzero()[0].tolist()
            raise ValueError(f"observation {key!r} has a non-finite value at index {bad}")
    assert batch is not None, "policy has no observation keys"
    return batch
