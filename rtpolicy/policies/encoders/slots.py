"""Object slots attended by the instruction: which block does "lift the red block" mean?

A flat vector key often holds K entities of F features each after a shared prefix (the CALVIN-style
``objects_rel``: 13 robot / fixture features, then 15 per block). The state token mixes them into one
vector and the denoiser's FiLM conditioning adds the language token to it, so nothing multiplies "which
block the instruction names" with "where that block is": a language-only policy learns the articulated
tasks and not the block tasks. :class:`SlotAttention` makes the choice explicit: each slot is embedded
(with a learned identity, since slot k is always the same object), and queries made from the condition
tokens (task id and / or instruction) attend over the slots; each query's weighted slot embedding is one
more condition token.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def slot_layout(key: str, shape: list[int], count: int, size: int) -> int:
    """Offset of the ``count`` slots of ``size`` features at the end of vector key ``key`` of ``shape``;
    ValueError naming the key when they do not fit (the caller checks that ``key`` is a vector key)."""
    if count < 1 or size < 1:
        raise ValueError(f"policy.encoder.slot_count and slot_size must be >= 1 for slot_key={key!r}, got {count} and {size}")
    if count * size > int(shape[0]):
        raise ValueError(f"policy.encoder.slot_count * slot_size = {count * size} is more than the {shape[0]} dims "
                         f"of obs key {key!r}")
    return int(shape[0]) - count * size


class SlotAttention(nn.Module):
    """K object slots + condition tokens -> Q attended slot tokens.

    slots  (B, K, F) normalized slot features (the newest obs step)
    ctx    (B, C, D) condition tokens the queries are made from (task id, language), or None
    ->     (B, Q, D); ``weights`` (B, Q, K) of the last call are kept for inspection
    """

    def __init__(self, count: int, size: int, dim: int, queries: int = 2):
        super().__init__()
        if queries < 1:
            raise ValueError(f"policy.encoder.slot_queries must be >= 1, got {queries}")
        self.embed = nn.Sequential(nn.Linear(size, dim), nn.Mish(), nn.Linear(dim, dim))
        self.identity = nn.Parameter(torch.randn(1, count, dim) * 0.1)  # slot k is always the same object
        self.base = nn.Parameter(torch.randn(1, queries, dim) * 0.1)
        self.query = nn.Linear(dim, queries * dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.count, self.size, self.dim, self.queries = count, size, dim, queries
        self.weights: torch.Tensor | None = None

    def forward(self, slots: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        if slots.ndim != 3 or slots.shape[1:] != (self.count, self.size):
            raise ValueError(f"slots have shape {tuple(slots.shape)}, expected (B, {self.count}, {self.size})")
        e = self.embed(slots) + self.identity  # (B, K, D)
        q = self.base.expand(slots.shape[0], -1, -1)
        if ctx is not None:
            q = q + self.query(ctx.mean(dim=1)).view(-1, self.queries, self.dim)
        logits = q @ self.key(e).transpose(1, 2) / math.sqrt(self.dim)  # (B, Q, K)
        weights = logits.softmax(dim=-1)
        self.weights = weights.detach()
        return weights @ self.value(e)
