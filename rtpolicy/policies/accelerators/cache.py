"""Training-free feature caching for the transformer denoiser: BAC and the two baselines it beats.

A DiT denoiser call runs 2L residual *units* (block i: attention = unit 2i, FFN = unit 2i+1), each
adding a branch output (B, T, E) to the token stream. Over one chunk's K denoiser calls many of these
branch outputs barely change, so a unit can skip its computation at a step and reuse (or forecast)
its last computed output. A schedule (U, K) bool says, per unit and step, whether to recompute.

- ``uniform``: every unit recomputes every ``every`` steps (DeepCache / Delta-DiT-like).
- ``taylor``: the uniform schedule, but a skipped unit forecasts its output to first order from its
  last two computed outputs (TaylorSeer-like) instead of repeating the last one.
- ``bac``: Block-wise Adaptive Caching (Ji et al. 2025). On calibration observations, record every
  unit's output at every step; the Adaptive Caching Scheduler picks, per unit, the ``budget`` update
  steps that maximize the summed cosine similarity between each step's true output and the cached
  output it would reuse (dynamic programming over steps); Bubbling Union then makes every unit
  upstream of an FFN unit update wherever that FFN unit updates, so caching errors do not propagate.

Besides the units, the wrapper computes once per chunk what cannot change within it (exactly, so a
full schedule still equals the uncached denoiser bit for bit): the condition tokens' projection (while
the same ``cond`` tensor comes back), the noise-level embedding per distinct ``t``, and a block's adaLN
modulation only at steps where one of its units recomputes.

Step 0 always recomputes every unit, so a chunk never reuses another chunk's (or batch's) features.
Heads call ``start_chunk()`` before a chunk's first call (streaming: before each tick's calls and
each warm-start call, which therefore run in full); the step counter also wraps every K calls, K
being the head's denoiser calls per chunk (per tick for streaming), which :func:`calibrate` measures
on a steady-state call. Schedules are plain JSON (:meth:`CachedDiT.schedule_json`).
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rtpolicy.policies.denoisers.transformer import DiTDenoiser, modulate, per_token
from rtpolicy.policies.head import denoiser_calls

MODES = ("bac", "uniform", "taylor")


class CachedDiT(nn.Module):
    """Wraps a DiTDenoiser (shares its weights); same forward signature: x (B, T, Da), t, cond -> (B, T, Da)."""

    def __init__(self, inner: DiTDenoiser, schedule: torch.Tensor, mode: str = "bac"):
        super().__init__()
        if not isinstance(inner, DiTDenoiser):
            raise TypeError(f"feature caching wraps the transformer denoiser, got {type(inner).__name__}")
        if mode not in MODES:
            raise ValueError(f"cache mode must be one of {list(MODES)}, got {mode!r}")
        units = 2 * len(inner.blocks)
        schedule = torch.as_tensor(schedule, dtype=torch.bool)
        if schedule.ndim != 2 or schedule.shape[0] != units or schedule.shape[1] < 1:
            raise ValueError(f"schedule must be (units={units}, steps), got {tuple(schedule.shape)}")
        if not schedule[:, 0].all():
            raise ValueError("schedule must recompute every unit at step 0")
        self.inner, self.mode = inner, mode
        self.register_buffer("schedule", schedule.clone())
        self.record: list[list[torch.Tensor]] | None = None  # per step, per unit outputs while calibrating
        self.reset()

    @property
    def num_steps(self) -> int:
        return int(self.schedule.shape[1])

    def reset(self) -> None:
        """Forget cached features; the next call is step 0."""
        self.step = 0
        self.cache: dict[int, list[tuple[int, torch.Tensor]]] = {}  # unit -> last two (step, output)
        self._cond: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (cond, ctx, pooled) of this chunk
        self._temb: dict[tuple, torch.Tensor] = {}  # noise-level embeddings of this chunk, by t's values
        self._plan: list[list[bool]] = self.schedule.tolist()

    def start_chunk(self) -> None:
        """The next call is step 0 of a new chunk."""
        self.step = 0

    def computed_fraction(self) -> float:
        return float(self.schedule.float().mean())

    def _unit(self, u: int, k: int, fn) -> torch.Tensor:
        if self._plan[u][k] or u not in self.cache:
            out = fn()
            self.cache[u] = (self.cache.get(u, [])[-1:] + [(k, out)])
            return out
        hist = self.cache[u]
        (k1, y1) = hist[-1]
        if self.mode == "taylor" and len(hist) == 2:
            k0, y0 = hist[0]
            return y1 + (y1 - y0) * ((k - k1) / (k1 - k0))
        return y1

    def _chunk_constants(self, t: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (ctx (B, N, E), step embedding + pooled condition c), computed once per chunk / per level."""
        m = self.inner
        if self._cond is None or self._cond[0] is not cond or m.training:
            ctx = m.cond_in(cond)
            self._cond = (cond, m.drop(m.cond_norm(ctx + m.cond_pos)), ctx.mean(dim=1))
            self._temb = {}
        _, ctx, pooled = self._cond
        key = (tuple(t.shape), t.detach().cpu().numpy().tobytes())
        temb = self._temb.get(key)
        if temb is None or m.training:
            temb = self._temb[key] = m.step_embed(t)
        return ctx, temb + (pooled if t.ndim == 1 else pooled[:, None])

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        m, k = self.inner, self.step
        if k == 0:  # a new chunk: nothing carries over; the schedule is re-read (a loaded state_dict may change it)
            self.cache, self._cond, self._plan = {}, None, self.schedule.tolist()
        self.step = (k + 1) % self.num_steps
        ctx, c = self._chunk_constants(t, cond)
        h = m.drop(m.action_in(x) + m.action_pos)
        outs = []
        for i, blk in enumerate(m.blocks):
            mod: list[torch.Tensor] = []  # the block's adaLN terms, only when one of its units recomputes
            needs = lambda u: self._plan[u][k] or u not in self.cache  # noqa: E731
            if needs(2 * i) or needs(2 * i + 1):
                mod = blk.ada(c).chunk(6, dim=-1)
            a = self._unit(2 * i, k, lambda: per_token(mod[2]) * blk.attend(modulate(blk.norm1(h), mod[0], mod[1]), ctx))
            h = h + a
            f = self._unit(2 * i + 1, k, lambda: per_token(mod[5]) * blk.mlp(modulate(blk.norm2(h), mod[3], mod[4])))
            h = h + f
            outs += [a, f]
        if self.record is not None:
            self.record.append([o.detach().clone() for o in outs])
        shift, scale = m.ada_out(c).chunk(2, dim=-1)
        return m.out(modulate(m.norm_out(h), shift, scale))

    def schedule_json(self) -> str:
        return json.dumps({"mode": self.mode, "schedule": self.schedule.int().tolist()})

    @classmethod
    def from_json(cls, inner: DiTDenoiser, text: str) -> CachedDiT:
        data = json.loads(text)
        return cls(inner, torch.tensor(data["schedule"], dtype=torch.bool), data["mode"])


def uniform_schedule(units: int, steps: int, every: int) -> torch.Tensor:
    """(units, steps): recompute at steps 0, every, 2*every, ..."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    return (torch.arange(steps) % every == 0).expand(units, -1).clone()


def similarity(features: list[list[torch.Tensor]]) -> torch.Tensor:
    """Per-step, per-unit outputs [K][U] of (B, T, E) -> (U, K, K) mean cosine similarity over samples."""
    k, u = len(features), len(features[0])
    sims = torch.empty(u, k, k)
    for j in range(u):
        f = torch.stack([features[s][j].flatten(1) for s in range(k)])  # (K, B, T*E)
        f = F.normalize(f, dim=-1)
        sims[j] = torch.einsum("ibd,jbd->ijb", f, f).mean(-1)
    return sims


def adaptive_schedule(sim: torch.Tensor, budget: int) -> torch.Tensor:
    """Adaptive Caching Scheduler for one unit: sim (K, K) -> (K,) bool with exactly ``budget`` updates (capped
    at K), step 0 first,
    maximizing sum_k sim[last_update(k), k] by dynamic programming over (updates used, last update step)."""
    k = sim.shape[0]
    budget = max(1, min(budget, k))
    # gain[i, j]: similarity collected by steps i..j-1 when i is an update and the next update is j
    csum = torch.cat([torch.zeros(k, 1), sim.cumsum(1)], dim=1)  # csum[i, j] = sum_{s<j} sim[i, s]
    gain = lambda i, j: float(csum[i, j] - csum[i, i])  # noqa: E731
    neg = float("-inf")
    best = [[neg] * k for _ in range(budget + 1)]
    prev = [[-1] * k for _ in range(budget + 1)]
    best[1][0] = 0.0
    for c in range(1, budget):
        for i in range(k):
            if best[c][i] == neg:
                continue
            for j in range(i + 1, k):
                v = best[c][i] + gain(i, j)
                if v > best[c + 1][j]:
                    best[c + 1][j], prev[c + 1][j] = v, i
    score, c_end, last = neg, budget, 0
    for i in range(k):  # exactly ``budget`` updates: an extra update never lowers the score (sim <= 1)
        if best[budget][i] != neg and best[budget][i] + gain(i, k) > score:
            score, last = best[budget][i] + gain(i, k), i
    out = torch.zeros(k, dtype=torch.bool)
    while last >= 0:
        out[last] = True
        last, c_end = prev[c_end][last], c_end - 1
    return out


def bubbling_union(schedule: torch.Tensor) -> torch.Tensor:
    """Units ordered upstream -> downstream (attn, FFN, attn, FFN, ...): wherever an FFN unit (odd index)
    updates, every unit before it updates too."""
    out = schedule.clone()
    for u in range(1, out.shape[0], 2):
        out[:u] |= schedule[u]
    return out


@torch.no_grad()
def calibrate(policy, obs: dict[str, torch.Tensor], mode: str = "bac", budget: int = 4, every: int = 2) -> dict[str, Any]:
    """Replace ``policy.denoiser`` (a DiT) by a CachedDiT for the policy's sampler; returns a report.

    obs: a calibration batch of observations (B, To, ...). ``budget``: updates per unit (bac);
    ``every``: the uniform/taylor period. K (calls per chunk) is counted on a second predict_chunk,
    so a streaming head's warm start (first call after reset) is not counted.
    """
    inner = policy.denoiser.inner if isinstance(policy.denoiser, CachedDiT) else policy.denoiser
    policy.denoiser = inner
    k, units = len(denoiser_calls(policy, obs, steady=True)), 2 * len(inner.blocks)
    if mode == "bac":
        probe = CachedDiT(inner, torch.ones(units, k, dtype=torch.bool), "bac")
        policy.denoiser = probe
        policy.reset()
        policy.predict_chunk(obs)  # a streaming head's warm start, not recorded
        probe.record = []
        policy.predict_chunk(obs)
        sim = similarity(probe.record)
        schedule = bubbling_union(torch.stack([adaptive_schedule(sim[u], budget) for u in range(units)]))
    elif mode in ("uniform", "taylor"):
        schedule = uniform_schedule(units, k, every)
    else:
        raise ValueError(f"cache mode must be one of {list(MODES)}, got {mode!r}")
    policy.denoiser = CachedDiT(inner, schedule, mode)
    policy.reset()
    return {"mode": mode, "steps": k, "units": units, "computed_fraction": policy.denoiser.computed_fraction()}
