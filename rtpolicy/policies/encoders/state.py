"""Low-dimensional observation encoder with observation history and a task-embedding hook."""

from __future__ import annotations

import torch
from torch import nn


class StateEncoder(nn.Module):
    """Normalized low-dim observations -> condition tokens for the denoiser.

    obs[key]  (B, To, Dk) for every key in ``shapes`` (concatenated per step)
    task_id   (B,) long, only when ``num_tasks > 0``; -1 = no task (the learned null token used for
              classifier-free guidance)
    ->        (B, N, D) with N = To (+1 task token)
    """

    def __init__(self, shapes: dict[str, list[int]], obs_horizon: int, dim: int, num_tasks: int = 0):
        super().__init__()
        for key, shape in shapes.items():
            if len(shape) != 1:
                raise ValueError(f"StateEncoder takes flat vectors; obs key {key!r} has shape {list(shape)}")
        self.keys = sorted(shapes)
        in_dim = sum(shapes[k][0] for k in self.keys)
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.Mish(), nn.Linear(dim, dim))
        self.pos = nn.Parameter(torch.zeros(1, obs_horizon, dim))
        self.task = nn.Embedding(num_tasks + 1, dim) if num_tasks > 0 else None  # last row: null task
        self.n_tokens = obs_horizon + (1 if num_tasks > 0 else 0)
        self.dim = dim

    def forward(self, obs: dict[str, torch.Tensor], task_id: torch.Tensor | None = None) -> torch.Tensor:
        x = torch.cat([obs[k] for k in self.keys], dim=-1)
        tokens = self.mlp(x) + self.pos[:, : x.shape[1]]
        if self.task is not None:
            if task_id is None:
                raise ValueError("multi-task policy needs obs['task_id'] (B,) long")
            task_id = task_id.long()
            if task_id.max() >= self.task.num_embeddings - 1 or task_id.min() < -1:
                raise ValueError(f"task_id must be in [-1, {self.task.num_embeddings - 2}], got {task_id.tolist()}")
            task_id = torch.where(task_id < 0, self.task.num_embeddings - 1, task_id)
            tokens = torch.cat([tokens, self.task(task_id)[:, None]], dim=1)
        return tokens
