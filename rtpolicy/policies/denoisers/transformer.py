"""DiT-style transformer denoiser (Peebles & Xie 2023) over the action chunk.

Action tokens (B, T, E) attend to themselves and to the projected observation tokens (B, N, E), which
join every block's attention as extra keys/values; only action tokens are carried through the blocks.
A condition vector c = MLP(sinusoidal(t)) + mean of the projected observation tokens drives adaLN-Zero
modulation (shift, scale, gate) of each block's attention and MLP and of the final layer. The gates and
the output projection start at zero, so a fresh model outputs exactly 0 and each block starts as identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rtpolicy.policies.denoisers.base import DENOISERS, Denoiser, SinusoidalEmbedding


@dataclass
class TransformerConfig:
    name: str = "transformer"
    n_layer: int = 4
    n_head: int = 4
    n_emb: int = 128  # token width; must be divisible by n_head
    dropout: float = 0.0  # attention, MLP and embedding dropout
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * n_emb


def per_token(v: torch.Tensor) -> torch.Tensor:
    """(B, E) -> (B, 1, E) broadcast over tokens; (B, T, E) per-token values pass through."""
    return v if v.ndim == 3 else v[:, None]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, T, E), shift/scale (B, E) or (B, T, E) -> (B, T, E)."""
    return x * (1 + per_token(scale)) + per_token(shift)


def zero_linear(d_in: int, d_out: int) -> nn.Linear:
    layer = nn.Linear(d_in, d_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class DiTBlock(nn.Module):
    """x (B, T, E), ctx (B, N, E), c (B, E) or per-token (B, T, E) -> (B, T, E)."""

    def __init__(self, n_emb: int, n_head: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.norm1 = nn.LayerNorm(n_emb, elementwise_affine=False, eps=1e-6)
        self.q = nn.Linear(n_emb, n_emb)
        self.kv = nn.Linear(n_emb, 2 * n_emb)
        self.proj = nn.Linear(n_emb, n_emb)
        self.norm2 = nn.LayerNorm(n_emb, elementwise_affine=False, eps=1e-6)
        hidden = int(mlp_ratio * n_emb)
        self.mlp = nn.Sequential(
            nn.Linear(n_emb, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout), nn.Linear(hidden, n_emb)
        )
        self.ada = nn.Sequential(nn.SiLU(), zero_linear(n_emb, 6 * n_emb))
        self.drop = nn.Dropout(dropout)

    def attend(self, h: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """Queries from h (B, T, E); keys/values from [ctx ; h] (B, N+T, E)."""
        b, t, e = h.shape
        heads = lambda z: z.unflatten(-1, (self.n_head, -1)).transpose(1, 2)  # (B, L, E) -> (B, H, L, E/H)
        k, v = self.kv(torch.cat([ctx, h], dim=1)).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(
            heads(self.q(h)), heads(k), heads(v), dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(out.transpose(1, 2).reshape(b, t, e))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        x = x + per_token(gate1) * self.drop(self.attend(modulate(self.norm1(x), shift1, scale1), ctx))
        return x + per_token(gate2) * self.drop(self.mlp(modulate(self.norm2(x), shift2, scale2)))


@DENOISERS.register("transformer", config=TransformerConfig)
class DiTDenoiser(Denoiser):
    def __init__(self, cfg: TransformerConfig, action_dim: int, horizon: int, cond_dim: int, n_cond_tokens: int):
        super().__init__()
        e = cfg.n_emb
        if cfg.n_head < 1 or e % cfg.n_head:
            raise ValueError(f"transformer: n_emb {e} must be divisible by n_head {cfg.n_head}")
        self.action_in = nn.Linear(action_dim, e)
        self.action_pos = nn.Parameter(torch.randn(1, horizon, e) * 0.02)
        self.cond_in = nn.Linear(cond_dim, e)
        self.cond_pos = nn.Parameter(torch.randn(1, n_cond_tokens, e) * 0.02)
        self.cond_norm = nn.LayerNorm(e)  # keeps context keys/values on the scale of the normalized action tokens
        self.step_embed = nn.Sequential(SinusoidalEmbedding(e), nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(DiTBlock(e, cfg.n_head, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.n_layer))
        self.norm_out = nn.LayerNorm(e, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), zero_linear(e, 2 * e))
        self.out = zero_linear(e, action_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, T, Da), t (B,) or per-position (B, T), cond (B, N, Dc) -> (B, T, Da)."""
        ctx = self.cond_in(cond)  # (B, N, E)
        pooled = ctx.mean(dim=1)  # (B, E)
        c = self.step_embed(t) + (pooled if t.ndim == 1 else pooled[:, None])  # (B, E) or (B, T, E)
        ctx = self.drop(self.cond_norm(ctx + self.cond_pos))
        h = self.drop(self.action_in(x) + self.action_pos)
        for block in self.blocks:
            h = block(h, ctx, c)
        shift, scale = self.ada_out(c).chunk(2, dim=-1)
        return self.out(modulate(self.norm_out(h), shift, scale))
