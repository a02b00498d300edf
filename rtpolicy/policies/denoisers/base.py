"""The denoiser interface shared by every head.

forward(x, t, cond):
    x     (B, T, Da)   noisy action chunk (normalized units)
    t     (B,) or (B, T)  noise level (integer DDPM step or continuous sigma, as float), one per sample or,
                       for streaming heads, one per action position
    cond  (B, N, Dc)   observation tokens from the encoder
    ->    (B, T, Da)   prediction (epsilon, sample, or a preconditioned output: the head decides)
Constructor: cls(cfg, action_dim, horizon, cond_dim, n_cond_tokens).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rtpolicy.registry import Registry


class Denoiser(nn.Module):
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


DENOISERS: Registry[Denoiser] = Registry("denoiser")


class SinusoidalEmbedding(nn.Module):
    """(B,) float noise levels -> (B, dim) sinusoidal features."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"sinusoidal embedding dim must be even, got {dim}")
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(*S) float -> (*S, dim)."""
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
        args = t.float()[..., None] * freqs
        return torch.cat([args.sin(), args.cos()], dim=-1)
