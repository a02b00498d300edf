"""1D temporal convolutional UNet with FiLM conditioning (the Chi et al. 2023 diffusion-policy denoiser).

The action chunk (B, T, Da) is treated as a Da-channel sequence of length T. Every residual block is
FiLM-modulated by a global condition [MLP(sinusoidal(t)) ; flattened obs tokens (B, N*Dc)], or, when t
carries one noise level per action step (streaming heads), by a per-step condition pooled to each level.
The down path halves T at every level but the last, so T must be divisible by
2 ** (len(down_dims) - 1); the constructor checks this and raises a ValueError otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from rtpolicy.policies.denoisers.base import DENOISERS, Denoiser, SinusoidalEmbedding


@dataclass
class UNet1DConfig:
    name: str = "unet1d"
    # channels per level, T halves between levels; CPU-sized (diffusion_policy uses [256, 512, 1024])
    down_dims: list[int] = field(default_factory=lambda: [32, 64, 128])
    kernel_size: int = 5
    n_groups: int = 8  # GroupNorm groups; must divide every entry of down_dims
    step_embed_dim: int = 128  # width of the noise-level embedding


class ConvBlock(nn.Sequential):
    """Conv1d + GroupNorm + Mish, length-preserving: (B, Cin, T) -> (B, Cout, T)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, n_groups: int):
        super().__init__(nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2), nn.GroupNorm(n_groups, c_out), nn.Mish())


class FiLMResBlock(nn.Module):
    """Two conv blocks; the first one's output gets a per-channel scale and bias predicted from the condition.

    x (B, Cin, T), c (B, Dcond) -> (B, Cout, T)
    """

    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.block1 = ConvBlock(c_in, c_out, kernel_size, n_groups)
        self.block2 = ConvBlock(c_out, c_out, kernel_size, n_groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """c: (B, Dcond), or per position (B, T0, Dcond), averaged down to this block's length."""
        if c.ndim == 3:
            if c.shape[1] != x.shape[-1]:
                c = F.adaptive_avg_pool1d(c.transpose(1, 2), x.shape[-1]).transpose(1, 2)
            scale, bias = self.film(c).transpose(1, 2).chunk(2, dim=1)
        else:
            scale, bias = self.film(c)[..., None].chunk(2, dim=1)
        h = self.block1(x) * scale + bias
        return self.block2(h) + self.skip(x)


@DENOISERS.register("unet1d", config=UNet1DConfig)
class ConditionalUNet1D(Denoiser):
    def __init__(self, cfg: UNet1DConfig, action_dim: int, horizon: int, cond_dim: int, n_cond_tokens: int):
        super().__init__()
        dims = list(cfg.down_dims)
        if not dims:
            raise ValueError("unet1d down_dims must not be empty")
        factor = 2 ** (len(dims) - 1)
        if horizon % factor:
            raise ValueError(
                f"unet1d: horizon {horizon} must be divisible by 2**(len(down_dims)-1) = {factor} for down_dims {dims};"
                " change policy.horizon or use fewer down_dims levels"
            )
        if any(d % cfg.n_groups for d in dims):
            raise ValueError(f"unet1d: n_groups {cfg.n_groups} must divide every entry of down_dims {dims}")
        k, g, e = cfg.kernel_size, cfg.n_groups, cfg.step_embed_dim
        self.step_embed = nn.Sequential(SinusoidalEmbedding(e), nn.Linear(e, 4 * e), nn.Mish(), nn.Linear(4 * e, e))
        film_dim = e + n_cond_tokens * cond_dim

        self.down = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(zip([action_dim] + dims[:-1], dims)):
            last = i == len(dims) - 1
            self.down.append(nn.ModuleList([
                FiLMResBlock(c_in, c_out, film_dim, k, g),
                FiLMResBlock(c_out, c_out, film_dim, k, g),
                nn.Identity() if last else nn.Conv1d(c_out, c_out, 3, stride=2, padding=1),
            ]))
        self.mid = nn.ModuleList([FiLMResBlock(dims[-1], dims[-1], film_dim, k, g) for _ in range(2)])
        self.up = nn.ModuleList()
        for c_out, c_in in reversed(list(zip(dims[:-1], dims[1:]))):  # the skip doubles the input channels
            self.up.append(nn.ModuleList([
                FiLMResBlock(2 * c_in, c_out, film_dim, k, g),
                FiLMResBlock(c_out, c_out, film_dim, k, g),
                nn.ConvTranspose1d(c_out, c_out, 4, stride=2, padding=1),
            ]))
        self.final = nn.Sequential(ConvBlock(dims[0], dims[0], k, g), nn.Conv1d(dims[0], action_dim, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, T, Da), t (B,) or per-position (B, T), cond (B, N, Dc) -> (B, T, Da)."""
        obs = cond.flatten(1)
        if t.ndim == 2:  # per-position noise levels: a FiLM condition per action step
            obs = obs[:, None].expand(-1, t.shape[1], -1)
        c = torch.cat([self.step_embed(t), obs], dim=-1)
        h = x.transpose(1, 2)  # (B, Da, T)
        skips = []
        for res1, res2, downsample in self.down:
            h = res2(res1(h, c), c)
            skips.append(h)
            h = downsample(h)
        for res in self.mid:
            h = res(h, c)
        for res1, res2, upsample in self.up:
            h = torch.cat([h, skips.pop()], dim=1)  # as in the original, the full-resolution skip stays unused
            h = upsample(res2(res1(h, c), c))
        return self.final(h).transpose(1, 2)
