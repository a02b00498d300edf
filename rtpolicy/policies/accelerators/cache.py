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
- ``bound`` (:func:`calibrate_bounded`, issue 20): an error-bounded schedule. On fit windows, the error of
  reusing unit u's step-j output at step k is measured per window (RMS over tokens and channels: every unit
  adds into the same residual stream, so errors are comparable across units) and summarised by a high
  quantile over windows, not a mean; per unit, dynamic programming gives the least-error update steps for
  every number of updates; the FLOP budget then goes greedily to the units whose next update removes the
  most error per FLOP (a cheap unit with a smooth output gets few updates, so the budget is spent where
  reuse costs most). The schedule's output error (RMS of the executed action chunk vs the uncached
  denoiser with the same noise) is then measured on *held-out* windows and its conformal quantile is
  stored with the schedule as its bound (:attr:`CachedDiT.bound`, in :meth:`CachedDiT.schedule_json`);
  with ``tol`` the cheapest schedule along the greedy path whose held-out bound is <= tol is taken.
  :func:`output_errors` measures any cached policy (uniform, taylor, bac, MoDE's fused experts) the same way.

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
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rtpolicy.policies.denoisers.transformer import DiTDenoiser, modulate, per_token
from rtpolicy.policies.head import denoiser_calls

MODES = ("bac", "uniform", "taylor")
inf = float("inf")


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
        self.bound: dict[str, Any] | None = None  # the held-out output-error bound it was calibrated for
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
        return json.dumps({"mode": self.mode, "schedule": self.schedule.int().tolist(),
                           **({"bound": self.bound} if self.bound is not None else {})})

    @classmethod
    def from_json(cls, inner: DiTDenoiser, text: str) -> CachedDiT:
        data = json.loads(text)
        out = cls(inner, torch.tensor(data["schedule"], dtype=torch.bool), data["mode"])
        out.bound = data.get("bound")
        return out


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


def unit_costs(inner: DiTDenoiser) -> torch.Tensor:
    """(units,) multiply-accumulates per sample of each unit's recompute: attention (q, kv over [ctx; h], proj,
    scores and values) and FFN (two linears)."""
    t, e = inner.action_pos.shape[1:]
    n, hidden = inner.cond_pos.shape[1], inner.blocks[0].mlp[0].out_features
    attn = t * e * e + (n + t) * 2 * e * e + t * e * e + 2 * t * (n + t) * e
    ffn = 2 * t * e * hidden
    return torch.tensor([attn, ffn] * len(inner.blocks), dtype=torch.float64)


def cost_fraction(schedule: torch.Tensor, costs: torch.Tensor) -> float:
    """Share of the units' multiply-accumulates a schedule (units, K) recomputes."""
    return float((schedule.double() * costs[:, None]).sum() / (costs.sum() * schedule.shape[1]))


def _inner(policy) -> DiTDenoiser:
    return policy.denoiser.inner if isinstance(policy.denoiser, CachedDiT) else policy.denoiser


@torch.no_grad()
def record_features(policy, obs: dict[str, torch.Tensor], steps: int) -> list[list[torch.Tensor]]:
    """Every unit's output at every step of one steady-state chunk (uncached): [K][U] of (B, T, E).
    The policy's denoiser is left as it was."""
    keep, inner = policy.denoiser, _inner(policy)
    probe = CachedDiT(inner, torch.ones(2 * len(inner.blocks), steps, dtype=torch.bool), "bac")
    policy.denoiser = probe
    try:
        policy.reset()
        policy.predict_chunk(obs)  # a streaming head's warm start, not recorded
        probe.record = []
        policy.predict_chunk(obs)
        return probe.record
    finally:
        policy.denoiser = keep
        policy.reset()


def reuse_errors(features: list[list[torch.Tensor]]) -> torch.Tensor:
    """[K][U] of (B, T, E) -> (U, K, K, B): err[u, j, k, b] = RMS over (T, E) of sample b's unit-u output at step
    k minus its output at step j (the error of reusing step j's output at step k)."""
    k, u = len(features), len(features[0])
    out = torch.empty(u, k, k, features[0][0].shape[0])
    for j in range(u):
        f = torch.stack([features[s][j].flatten(1).float() for s in range(k)])  # (K, B, T*E)
        out[j] = (f[:, None] - f[None]).pow(2).mean(-1).sqrt()
    return out


def least_error_schedules(err: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One unit's reuse errors err (K, K) (err[j, k]: reusing step j's output at step k) -> (total (K,), schedules
    (K, K) bool): for n = 1..K updates (row n-1), the least summed error sum_k err[last_update(k), k] with step 0
    an update, and the update steps that reach it (dynamic programming over (updates, last update))."""
    k = err.shape[0]
    csum = torch.cat([torch.zeros(k, 1, dtype=torch.float64), err.double().cumsum(1)], dim=1)
    cost = lambda i, j: float(csum[i, j] - csum[i, i + 1])  # noqa: E731  steps i+1..j-1 reuse step i
    best = [[inf] * k for _ in range(k + 1)]
    prev = [[-1] * k for _ in range(k + 1)]
    best[1][0] = 0.0
    for c in range(1, k):
        for i in range(k):
            if best[c][i] == inf:
                continue
            for j in range(i + 1, k):
                v = best[c][i] + cost(i, j)
                if v < best[c + 1][j]:
                    best[c + 1][j], prev[c + 1][j] = v, i
    totals, scheds = torch.empty(k, dtype=torch.float64), torch.zeros(k, k, dtype=torch.bool)
    for n in range(1, k + 1):
        last = min((i for i in range(k) if best[n][i] < inf), key=lambda i: best[n][i] + cost(i, k))
        totals[n - 1] = best[n][last] + cost(last, k)
        c = n
        while last >= 0:
            scheds[n - 1, last] = True
            last, c = prev[c][last], c - 1
    return totals, scheds


def greedy_path(err: torch.Tensor, costs: torch.Tensor) -> list[torch.Tensor]:
    """err (U, K, K) per-unit reuse errors, costs (U,) -> schedules (U, K) from one update per unit to the full
    schedule, one update added at a time to the unit whose next update removes the most error per FLOP."""
    u, k = err.shape[:2]
    best = [least_error_schedules(err[i]) for i in range(u)]
    n = [1] * u
    path = [torch.stack([best[i][1][0] for i in range(u)])]
    while any(m < k for m in n):
        gain = [(float(best[i][0][n[i] - 1] - best[i][0][n[i]]) / float(costs[i]) if n[i] < k else -inf, -i)
                for i in range(u)]
        i = -max(gain)[1]
        n[i] += 1
        path.append(torch.stack([best[j][1][n[j] - 1] for j in range(u)]))
    return path


def conformal_quantile(errors: torch.Tensor, q: float) -> float:
    """The split-conformal q-quantile of n held-out errors: the ceil((n+1) q)-th smallest (the largest when that
    exceeds n), so a new window from the same distribution exceeds it with probability <= 1 - q (about)."""
    e = errors.flatten().sort().values
    n = e.numel()
    return float(e[min(n, max(1, math.ceil((n + 1) * q))) - 1])


@torch.no_grad()
def output_errors(policy, obs: dict[str, torch.Tensor], reference=None, seed: int = 0) -> torch.Tensor:
    """(B,) RMS over the executed chunk (Ha, Da) of policy's actions minus the ``reference`` denoiser's (default: the
    uncached DiT under the policy's CachedDiT), same observations and noise; a steady-state chunk (after one warm
    call, which matters for streaming heads only)."""
    keep = policy.denoiser
    ref = _inner(policy) if reference is None else reference
    outs = []
    try:
        for den in (keep, ref):
            policy.denoiser = den
            policy.reset()
            torch.manual_seed(seed)
            policy.predict_chunk(obs)
            outs.append(policy.predict_chunk(obs))
    finally:
        policy.denoiser = keep
        policy.reset()
    return (outs[0] - outs[1]).pow(2).flatten(1).mean(1).sqrt()


@torch.no_grad()
def calibrate_bounded(policy, fit: dict[str, torch.Tensor], heldout: dict[str, torch.Tensor], cost: float = 0.3,
                      tol: float | None = None, q: float = 0.9, seed: int = 0) -> dict[str, Any]:
    """Replace ``policy.denoiser`` by an error-bounded CachedDiT (reuse mode); returns a report.

    fit / heldout: disjoint observation windows (B, To, ...). ``cost``: the largest share of the units' FLOPs to
    recompute (tol None), or, with ``tol``, the cheapest schedule on the greedy path whose held-out bound is
    <= tol (the full schedule if none). ``q``: the quantile over windows used for the per-unit reuse errors
    and the stored bound. The bound: {"q", "chunk_rms" (conformal q-quantile of the held-out chunk errors),
    "heldout_mean", "n_heldout", "units" (per unit: held-out q-quantile of its summed reuse error)}.
    """
    inner = _inner(policy)
    policy.denoiser = inner
    k = len(denoiser_calls(policy, fit, steady=True))
    costs = unit_costs(inner)
    err_fit = reuse_errors(record_features(policy, fit, k))
    path = greedy_path(torch.quantile(err_fit, q, dim=-1), costs)
    fracs = [cost_fraction(sch, costs) for sch in path]

    def measure(schedule: torch.Tensor) -> torch.Tensor:
        policy.denoiser = CachedDiT(inner, schedule, "bac")
        return output_errors(policy, heldout, inner, seed)

    if tol is None:
        idx = max([i for i, f in enumerate(fracs) if f <= cost + 1e-9], default=0)
        errs = measure(path[idx])
    else:  # bisection along the path (the error falls, not strictly, as updates are added); the last one checked
        lo, hi, found = 0, len(path) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            e = measure(path[mid])
            if conformal_quantile(e, q) <= tol:
                found, hi = (mid, e), mid - 1
            else:
                lo = mid + 1
        idx, errs = found if found is not None else (len(path) - 1, measure(path[-1]))
    schedule = path[idx]
    err_held = reuse_errors(record_features(policy, heldout, k))
    unit_err = torch.stack([sum(err_held[u, int(schedule[u, : s + 1].nonzero().max()), s] for s in range(k))
                            for u in range(len(costs))])  # (U, B) summed over steps
    bound = {"q": q, "chunk_rms": conformal_quantile(errs, q), "heldout_mean": float(errs.mean()),
             "heldout_max": float(errs.max()), "n_heldout": int(errs.numel()),
             "units": [round(float(torch.quantile(e, q)), 6) for e in unit_err]}
    policy.denoiser = CachedDiT(inner, schedule, "bac")
    policy.denoiser.bound = bound
    policy.reset()
    return {"mode": "bound", "steps": k, "units": len(costs), "computed_fraction": policy.denoiser.computed_fraction(),
            "cost_fraction": fracs[idx], "bound": bound, "updates_per_unit": schedule.sum(1).tolist()}
