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
- ``bound`` (:func:`calibrate_bounded`, issue 20): an error-bounded schedule chosen by the error it causes
  where it matters, the executed action chunk (RMS vs the uncached denoiser, same noise), not by feature
  similarity: among all step subsets of the budget's size (every unit recomputes at the chosen steps), the
  one with the least measured chunk error (a high quantile over the fit windows, not a mean) is taken
  (:func:`step_search`; exhaustive, so it is never worse on the fit windows than uniform caching at the same
  cost, which is one of the candidates). Its chunk error is then measured on *held-out* windows and the
  conformal quantile stored with the schedule as its bound (:attr:`CachedDiT.bound`, in
  :meth:`CachedDiT.schedule_json`), with a per-unit bound (only that unit cached); with ``tol`` the fewest
  updates whose held-out bound is <= tol are taken. Skipped units reuse (``bac``) or forecast (``taylor``).
  (A per-(unit, step) greedy by measured error and a per-unit DP on feature errors both lost to uniform
  caching on an MT10 checkpoint: single-skip errors do not add up.) :func:`output_errors` measures any cached policy
  (uniform, taylor, bac, MoDE's fused experts) the same way.

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

import itertools
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
    return {"mode": mode, "steps": k, "units": units, "computed_fraction": policy.denoiser.computed_fraction(),
            "cost_fraction": cost_fraction(schedule, unit_costs(inner))}


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


def conformal_quantile(errors: torch.Tensor, q: float) -> float:
    """The split-conformal q-quantile of n held-out errors: the ceil((n+1) q)-th smallest (the largest when that
    exceeds n), so a new window from the same distribution exceeds it with probability <= 1 - q (about)."""
    e = errors.flatten().sort().values
    n = e.numel()
    return float(e[min(n, max(1, math.ceil((n + 1) * q))) - 1])


class TrialDiT(CachedDiT):
    """S schedules tried at once: the batch is S copies of B windows, sample i follows ``schedules[i // B]``
    (S, units, K), with the same outputs as a CachedDiT of that schedule (every unit is computed for every
    sample, and a sample whose schedule skips the unit takes its reused / forecast output instead)."""

    def __init__(self, inner: DiTDenoiser, schedules: torch.Tensor, batch: int, mode: str = "bac"):
        super().__init__(inner, torch.ones(schedules.shape[1:], dtype=torch.bool), mode)
        self.masks = schedules.bool().repeat_interleave(batch, 0)  # (S*B, U, K)

    def _unit(self, u: int, k: int, fn) -> torch.Tensor:
        fresh = fn()
        if k == 0 or u not in self.cache:
            n = fresh.shape[0]
            self.cache[u] = [fresh, torch.zeros(n, 1, 1), fresh, torch.full((n, 1, 1), -1.0)]  # y1, k1, y0, k0
            return fresh
        y1, k1, y0, k0 = self.cache[u]
        pred = y1
        if self.mode == "taylor":
            pred = torch.where(k0 >= 0, y1 + (y1 - y0) * ((k - k1) / (k1 - k0).clamp(min=1)), y1)
        m = self.masks[:, u, k].view(-1, 1, 1)
        self.cache[u] = [torch.where(m, fresh, y1), torch.where(m, float(k), k1), torch.where(m, y1, y0),
                         torch.where(m, k1, k0)]
        return torch.where(m, fresh, pred)


@torch.no_grad()
def steady_chunk(policy, denoiser, obs: dict[str, torch.Tensor], seed: int = 0, noise: list | None = None) -> torch.Tensor:
    """The executed chunk (B, Ha, Da) of ``policy`` with ``denoiser`` swapped in, a steady-state call (after one
    warm call: matters for streaming heads only) under noise seed ``seed``; the policy's denoiser is restored.
    ``noise``: a list that receives the noise tensors drawn (a NoiseFeed recording)."""
    from rtpolicy.policies.head import NoiseFeed

    keep, feed = policy.denoiser, NoiseFeed()
    try:
        policy.denoiser = denoiser
        policy.reset()
        torch.manual_seed(seed)
        with policy.noise_feed(feed):
            policy.predict_chunk(obs)
            out = policy.predict_chunk(obs)
        if noise is not None:
            noise.extend(feed.drawn)
        return out
    finally:
        policy.denoiser = keep
        policy.reset()


@torch.no_grad()
def trial_chunks(policy, schedules: torch.Tensor, obs: dict[str, torch.Tensor], noise: list[torch.Tensor],
                 mode: str = "bac") -> torch.Tensor:
    """(S, B, Ha, Da): the steady chunk of every schedule (S, U, K) on windows obs (B, ...), all with the
    ``noise`` recorded by :func:`steady_chunk` on the same windows, in one batched run."""
    from rtpolicy.policies.head import NoiseFeed

    s, b = schedules.shape[0], next(iter(obs.values())).shape[0]
    tile = lambda x: x.repeat(s, *[1] * (x.ndim - 1))  # noqa: E731
    keep = policy.denoiser
    try:
        policy.denoiser = TrialDiT(_inner(policy), schedules, b, mode)
        policy.reset()
        with policy.noise_feed(NoiseFeed([tile(n) for n in noise])):
            policy.predict_chunk({k: tile(v) for k, v in obs.items()})
            out = policy.predict_chunk({k: tile(v) for k, v in obs.items()})
        return out.unflatten(0, (s, b))
    finally:
        policy.denoiser = keep
        policy.reset()


def chunk_rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, Ha, Da) x 2 -> (B,) RMS difference per window."""
    return (a - b).pow(2).flatten(1).mean(1).sqrt()


@torch.no_grad()
def output_errors(policy, obs: dict[str, torch.Tensor], reference=None, seed: int = 0) -> torch.Tensor:
    """(B,) RMS over the executed chunk (Ha, Da) of policy's actions minus the ``reference`` denoiser's (default: the
    uncached DiT under the policy's CachedDiT), same observations and noise."""
    ref = _inner(policy) if reference is None else reference
    return chunk_rms(steady_chunk(policy, policy.denoiser, obs, seed), steady_chunk(policy, ref, obs, seed))


@torch.no_grad()
def step_search(policy, fit: dict[str, torch.Tensor], updates: int, mode: str = "bac", q: float = 0.9, seed: int = 0,
                batch: int = 12) -> list[tuple[float, torch.Tensor]]:
    """Every schedule that recomputes all units at step 0 and at ``updates - 1`` more of the K steps, scored by
    the q-quantile over the fit windows of its measured chunk error (``mode``: skipped steps reuse or forecast);
    -> [(score, schedule (U, K))], best first. C(K-1, updates-1) candidates (36 for K=10, 3 updates), run
    ``batch`` at a time (:class:`TrialDiT`) with the noise of the uncached run; uniform schedules are among them."""
    inner = _inner(policy)
    k, units = len(denoiser_calls(policy, fit, steady=True)), 2 * len(inner.blocks)
    noise: list[torch.Tensor] = []
    ref = steady_chunk(policy, inner, fit, seed, noise)
    cands = []
    for rest in itertools.combinations(range(1, k), max(0, min(updates, k) - 1)):
        sch = torch.zeros(units, k, dtype=torch.bool)
        sch[:, [0, *rest]] = True
        cands.append(sch)
    scores = []
    for group in torch.stack(cands).split(batch):
        err = (trial_chunks(policy, group, fit, noise, mode) - ref).pow(2).flatten(2).mean(2).sqrt()  # (S, B)
        scores += [conformal_quantile(e, q) for e in err]
    order = sorted(range(len(cands)), key=lambda i: scores[i])
    return [(scores[i], cands[i]) for i in order]


@torch.no_grad()
def calibrate_bounded(policy, fit: dict[str, torch.Tensor], heldout: dict[str, torch.Tensor], cost: float = 0.3,
                      tol: float | None = None, q: float = 0.9, mode: str = "bac", seed: int = 0) -> dict[str, Any]:
    """Replace ``policy.denoiser`` by an error-bounded CachedDiT; returns a report.

    fit / heldout: disjoint observation windows (B, To, ...). The recompute steps are those of the
    :func:`step_search` winner on ``fit`` (``mode`` bac = reuse, taylor = forecast) with ``floor(cost * K)``
    updates, or, with ``tol``, with the fewest updates (>= 1, <= floor(cost * K) unless none passes: then
    more) whose *held-out* bound is <= tol (the full schedule if none). Stored with it as ``bound``: {"q",
    "chunk_rms" (the conformal q-quantile of the held-out windows' chunk errors), "heldout_mean",
    "heldout_max", "n_heldout", "fit_q" (the winner's score on fit), "units" (per unit: the held-out
    q-quantile of the chunk error when only that unit follows the schedule)}.
    """
    if mode not in ("bac", "taylor"):
        raise ValueError(f"a bounded schedule reuses (bac) or forecasts (taylor), got mode {mode!r}")
    inner = _inner(policy)
    policy.denoiser = inner
    k = len(denoiser_calls(policy, fit, steady=True))
    ref = steady_chunk(policy, inner, heldout, seed)

    def held(schedule: torch.Tensor) -> torch.Tensor:
        return chunk_rms(steady_chunk(policy, CachedDiT(inner, schedule, mode), heldout, seed), ref)

    m = max(1, math.floor(cost * k + 1e-9))
    if tol is None:
        fit_q, schedule = step_search(policy, fit, m, mode, q, seed)[0]
        errs = held(schedule)
    else:  # the fewest updates whose held-out bound passes (the error falls, not strictly, with more updates)
        found = None
        for n in range(1, k + 1):
            fit_q, schedule = step_search(policy, fit, n, mode, q, seed)[0]
            errs = held(schedule)
            if conformal_quantile(errs, q) <= tol:
                found = (fit_q, schedule, errs)
                break
        if found is None:
            schedule = torch.ones(2 * len(inner.blocks), k, dtype=torch.bool)
            fit_q, errs = 0.0, held(schedule)
        else:
            fit_q, schedule, errs = found
    units = []
    for u in range(schedule.shape[0]):
        only = torch.ones_like(schedule)
        only[u] = schedule[u]
        units.append(round(conformal_quantile(held(only), q), 6))
    bound = {"q": q, "chunk_rms": conformal_quantile(errs, q), "heldout_mean": float(errs.mean()),
             "heldout_max": float(errs.max()), "n_heldout": int(errs.numel()), "fit_q": fit_q, "units": units}
    policy.denoiser = CachedDiT(inner, schedule, mode)
    policy.denoiser.bound = bound
    policy.reset()
    return {"mode": f"bound-{mode}", "steps": k, "units": schedule.shape[0],
            "computed_fraction": policy.denoiser.computed_fraction(),
            "cost_fraction": cost_fraction(schedule, unit_costs(inner)), "bound": bound,
            "update_steps": schedule[0].nonzero().flatten().tolist()}
