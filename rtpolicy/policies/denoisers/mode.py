"""Mixture-of-denoising-experts transformer (MoDE, Reuss et al. 2024) with expert caching.

Tokens [noise ; observation (N) ; action (T)] run through pre-norm blocks of full self-attention
(the noise token makes attention noise-conditioned) and a sparse FFN: ``n_experts`` expert MLPs, of
which a router picks ``top_k`` per token from the *noise embedding only*, plus an optional shared
expert that always runs. A Switch-style load-balancing loss (``aux_loss`` after each training
forward; the head adds it) keeps experts in use.

Expert caching: routing depends only on the noise level, so for a fixed sampler schedule each step's
routing is known before any observation arrives. :meth:`MoDEDenoiser.cache_experts` fuses, per block
and noise level, the chosen experts (weights folded into the output projection) and the shared
expert into one dense MLP; a call at a cached level runs no router and touches only active weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rtpolicy.policies.denoisers.base import DENOISERS, Denoiser, SinusoidalEmbedding


@dataclass
class MoDEConfig:
    name: str = "mode"
    n_layer: int = 4
    n_head: int = 4
    n_emb: int = 128
    # 6 routed experts, top-1, plus a shared expert (Switch-DiT): 1.24 M parameters in all, as many as the
    # dense transformer denoiser (4 x 128, MLP 512: 1.27 M), of which a call touches 0.58 M (-54%)
    n_experts: int = 6
    top_k: int = 1
    expert_hidden: int = 128  # hidden width of each expert MLP
    shared_expert: bool = True
    balance_weight: float = 0.01  # load-balancing loss weight
    dropout: float = 0.0


class SparseFFN(nn.Module):
    """x (B, L, E), router input r (B, L, E) -> (B, L, E); top-k of n experts per token (+ shared expert)."""

    def __init__(self, e: int, hidden: int, n_experts: int, top_k: int, shared: bool):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"mode: need 1 <= top_k <= n_experts, got top_k={top_k}, n_experts={n_experts}")
        self.top_k, self.n_experts = top_k, n_experts
        self.w1 = nn.Parameter(torch.randn(n_experts, hidden, e) * e**-0.5)
        self.b1 = nn.Parameter(torch.zeros(n_experts, hidden))
        self.w2 = nn.Parameter(torch.randn(n_experts, e, hidden) * hidden**-0.5)
        self.b2 = nn.Parameter(torch.zeros(n_experts, e))
        self.shared = nn.Sequential(nn.Linear(e, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, e)) if shared else None
        self.router = nn.Linear(e, n_experts)

    def route(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """r (..., E) -> (sparse weights (..., n), router probabilities (..., n)).

        Top-k > 1: the chosen probabilities renormalized to sum to 1. Top-1: the chosen expert's raw
        probability (Switch Transformer), so the router still gets a gradient from the denoising loss.
        """
        probs = self.router(r).softmax(-1)
        top, idx = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            top = top / top.sum(-1, keepdim=True)
        weights = torch.zeros_like(probs).scatter(-1, idx, top)
        return weights, probs

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, probs = self.route(r)
        if torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            # a static graph (torch.export): every expert on every token, weighted; unchosen weights are 0
            h = F.gelu(torch.einsum("ble,nhe->blnh", x, self.w1) + self.b1, approximate="tanh")
            out = ((torch.einsum("blnh,neh->blne", h, self.w2) + self.b2) * weights[..., None]).sum(-2)
        else:
            # dispatch: each expert runs only on the tokens routed to it (top_k of n experts per token)
            flat_x, flat_w = x.reshape(-1, x.shape[-1]), weights.reshape(-1, self.n_experts)
            out = torch.zeros_like(flat_x)
            for j in range(self.n_experts):
                rows = flat_w[:, j].nonzero().squeeze(1)
                if rows.numel():
                    h = F.gelu(F.linear(flat_x.index_select(0, rows), self.w1[j], self.b1[j]), approximate="tanh")
                    out = out.index_add(0, rows, F.linear(h, self.w2[j], self.b2[j]) * flat_w[rows, j, None])
            out = out.view_as(x)
        if self.shared is not None:
            out = out + self.shared(x)
        # Switch-Transformer balance loss: n * sum_e (share of top-k slots on e) * (mean router prob of e)
        frac = (weights > 0).float().flatten(0, -2).mean(0) / self.top_k
        balance = self.n_experts * (frac * probs.flatten(0, -2).mean(0)).sum()
        return out, balance

    def fused(self, r: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One router input (E,) -> dense (W1 (H', E), b1 (H',), W2 (E, H'), b2 (E,)) equal to the routed FFN."""
        weights, _ = self.route(r)
        chosen = weights.nonzero().flatten().tolist()
        w1 = [self.w1[i] for i in chosen]
        b1 = [self.b1[i] for i in chosen]
        w2 = [self.w2[i] * weights[i] for i in chosen]
        b2 = sum(self.b2[i] * weights[i] for i in chosen)
        if self.shared is not None:
            w1.append(self.shared[0].weight)
            b1.append(self.shared[0].bias)
            w2.append(self.shared[2].weight)
            b2 = b2 + self.shared[2].bias
        return torch.cat(w1), torch.cat(b1), torch.cat(w2, dim=1), b2


class MoDEBlock(nn.Module):
    def __init__(self, cfg: MoDEConfig):
        super().__init__()
        e = cfg.n_emb
        self.norm1, self.norm2 = nn.LayerNorm(e), nn.LayerNorm(e)
        self.attn = nn.MultiheadAttention(e, cfg.n_head, dropout=cfg.dropout, batch_first=True)
        self.ffn = SparseFFN(e, cfg.expert_hidden, cfg.n_experts, cfg.top_k, cfg.shared_expert)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, r, fused=None):
        h = self.norm1(x)
        x = x + self.drop(self.attn(h, h, h, need_weights=False)[0])
        h = self.norm2(x)
        if fused is not None:
            w1, b1, w2, b2 = fused
            return x + self.drop(F.linear(F.gelu(F.linear(h, w1, b1), approximate="tanh"), w2, b2)), None
        y, balance = self.ffn(h, r)
        return x + self.drop(y), balance


@DENOISERS.register("mode", config=MoDEConfig)
class MoDEDenoiser(Denoiser):
    def __init__(self, cfg: MoDEConfig, action_dim: int, horizon: int, cond_dim: int, n_cond_tokens: int):
        super().__init__()
        e = cfg.n_emb
        if cfg.n_head < 1 or e % cfg.n_head:
            raise ValueError(f"mode: n_emb {e} must be divisible by n_head {cfg.n_head}")
        self.cfg = cfg
        self.action_in = nn.Linear(action_dim, e)
        self.cond_in = nn.Linear(cond_dim, e)
        self.pos = nn.Parameter(torch.randn(1, 1 + n_cond_tokens + horizon, e) * 0.02)
        self.noise_embed = nn.Sequential(SinusoidalEmbedding(e), nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.blocks = nn.ModuleList(MoDEBlock(cfg) for _ in range(cfg.n_layer))
        self.norm_out = nn.LayerNorm(e)
        self.out = nn.Linear(e, action_dim)
        self.fused: dict[float, list[tuple[torch.Tensor, ...]]] = {}  # noise level -> per-block fused FFN
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, T, Da), t (B,) or per-position (B, T), cond (B, N, Dc) -> (B, T, Da)."""
        b, horizon = x.shape[:2]
        emb = self.noise_embed(t)  # (B, E) or (B, T, E)
        ctx = self.cond_in(cond)
        if t.ndim == 1:
            noise_tok, r = emb[:, None], emb[:, None].expand(-1, 1 + ctx.shape[1] + horizon, -1)
        else:  # per-position levels: each action token routes by its own level, the rest by the mean
            mean = emb.mean(1, keepdim=True)
            noise_tok, r = mean, torch.cat([mean.expand(-1, 1 + ctx.shape[1], -1), emb], dim=1)
        h = torch.cat([noise_tok, ctx, self.action_in(x)], dim=1) + self.pos
        fused = self._fused_for(t) if not self.training else None
        balance = []
        for i, blk in enumerate(self.blocks):
            h, bal = blk(h, r, fused[i] if fused else None)
            if bal is not None:
                balance.append(bal)
        self.aux_loss = self.cfg.balance_weight * torch.stack(balance).mean() if balance and self.training else None
        return self.out(self.norm_out(h[:, -horizon:]))

    def _fused_for(self, t: torch.Tensor):
        if not self.fused or t.ndim != 1:
            return None
        levels = set(t.tolist())
        return self.fused.get(levels.pop()) if len(levels) == 1 else None

    @torch.no_grad()
    def cache_experts(self, levels) -> None:
        """Precompute fused per-block FFNs for these noise levels (the sampler's schedule)."""
        self.fused = {}
        for lv in {float(v) for v in levels}:
            r = self.noise_embed(torch.tensor([lv]))[0]
            self.fused[lv] = [blk.ffn.fused(r) for blk in self.blocks]

    def param_counts(self) -> dict[str, int]:
        """Total parameters and those one call touches (top_k of n_experts, + shared, no router when fused)."""
        total = sum(p.numel() for p in self.parameters())
        per_expert = sum(p[0].numel() for p in (self.blocks[0].ffn.w1, self.blocks[0].ffn.b1, self.blocks[0].ffn.w2, self.blocks[0].ffn.b2))
        router = sum(p.numel() for p in self.blocks[0].ffn.router.parameters())
        idle = (self.cfg.n_experts - self.cfg.top_k) * per_expert + router
        return {"total": total, "active": total - len(self.blocks) * idle}


def cache_policy_experts(policy, obs: dict[str, torch.Tensor]) -> int:
    """Record the noise levels one predict_chunk feeds the MoDE denoiser and fuse experts for them.
    Returns the number of cached levels."""
    den = policy.denoiser
    if not isinstance(den, MoDEDenoiser):
        raise TypeError(f"expert caching needs the mode denoiser, got {type(den).__name__}")
    from rtpolicy.policies.head import denoiser_calls

    den.fused = {}
    den.cache_experts([level for _x, t, _cond in denoiser_calls(policy, obs) for level in t.flatten().tolist()])
    return len(den.fused)
