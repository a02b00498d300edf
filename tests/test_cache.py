"""Feature caching (BAC, uniform, TaylorSeer-like) around the transformer denoiser."""

import pytest
import torch

from rtpolicy.policies import load_all

from rtpolicy.factory import build_policy, denoiser_config, policy_config
from rtpolicy.policies.accelerators.cache import (CachedDiT, adaptive_schedule, bubbling_union, calibrate,
                                                 calibrate_bounded, cost_fraction, output_errors, step_search,
                                                 uniform_schedule, unit_costs)
from rtpolicy.policies.denoisers.base import DENOISERS

SHAPES = {"state": [6], "action": [2]}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one torch thread is much faster than several fighting over a busy machine's cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(head="diffusion", **over):
    load_all()
    pol = policy_config(head, {"horizon": 8, "obs_horizon": 2, "action_horizon": 4, "cond_dim": 16}, over)
    den = denoiser_config("transformer", {"n_layer": 3, "n_head": 2, "n_emb": 16})
    torch.manual_seed(0)
    policy = build_policy(pol, den, SHAPES).eval()
    for p in policy.denoiser.parameters():  # adaLN-Zero starts as identity: give the gates real values
        torch.nn.init.normal_(p, std=0.2)
    policy.normalizer.fit({"state": torch.randn(64, 6), "action": torch.rand(64, 2) * 2 - 1})
    return policy


OBS = {"state": torch.randn(3, 2, 6)}


def chunk(policy, seed=0):
    torch.manual_seed(seed)
    return policy.predict_chunk(OBS)


def test_full_schedule_equals_uncached_exactly():
    policy = make(sampler="ddim", num_inference_steps=10)
    ref = chunk(policy)
    inner = policy.denoiser
    policy.denoiser = CachedDiT(inner, torch.ones(6, 10, dtype=torch.bool), "bac")
    assert torch.equal(chunk(policy), ref)
    assert torch.equal(chunk(policy), ref)  # the step counter wrapped: the next chunk starts clean


def test_skipping_changes_output_and_taylor_differs_from_reuse():
    policy = make(sampler="ddim", num_inference_steps=10)
    ref = chunk(policy)
    inner = policy.denoiser
    policy.denoiser = CachedDiT(inner, uniform_schedule(6, 10, 2), "uniform")
    uni = chunk(policy)
    policy.denoiser = CachedDiT(inner, uniform_schedule(6, 10, 2), "taylor")
    tay = chunk(policy)
    assert not torch.equal(uni, ref) and not torch.equal(tay, uni)
    assert policy.denoiser.computed_fraction() == 0.5


def test_adaptive_schedule_picks_the_change_points():
    # steps 0-3 alike, 4-9 alike, the two groups unlike: two updates belong at 0 and 4
    group = torch.tensor([0] * 4 + [1] * 6)
    sim = torch.where(group[:, None] == group[None], 1.0, 0.1)
    assert adaptive_schedule(sim, 2).nonzero().flatten().tolist() == [0, 4]
    assert adaptive_schedule(sim, 1).nonzero().flatten().tolist() == [0]
    assert adaptive_schedule(sim, 20).all()  # the budget is capped at K: update everywhere
    assert int(adaptive_schedule(sim, 3).sum()) == 3


def test_bubbling_union_updates_upstream_of_ffn_updates():
    s = torch.zeros(4, 5, dtype=torch.bool)
    s[:, 0] = True
    s[3, 2] = True  # block 1's FFN updates at step 2
    s[2, 4] = True  # block 1's attention alone: nothing bubbles
    out = bubbling_union(s)
    assert out[:, 2].all() and out[:, 4].tolist() == [False, False, True, False]


def test_bac_calibration_and_json_round_trip():
    policy = make(sampler="ddim", num_inference_steps=10)
    ref = chunk(policy)
    report = calibrate(policy, OBS, "bac", budget=4)
    assert report["steps"] == 10 and report["units"] == 6 and report["computed_fraction"] < 1
    cached = policy.denoiser
    assert cached.schedule[:, 0].all() and (cached.schedule.sum(1) >= 4).all()
    out = chunk(policy)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    again = CachedDiT.from_json(cached.inner, cached.schedule_json())
    assert torch.equal(again.schedule, cached.schedule) and again.mode == "bac"
    # the schedule is a buffer: it travels in the policy's state_dict (checkpoints, bundles)
    assert any(k.endswith("denoiser.schedule") for k in policy.state_dict())


def test_edm_calls_counted_and_bad_inputs():
    policy = make("edm", sampler="heun", num_inference_steps=3)
    assert calibrate(policy, OBS, "uniform", every=2)["steps"] == 5
    with pytest.raises(ValueError, match="step 0"):
        CachedDiT(policy.denoiser.inner, torch.zeros(6, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="units=6"):
        CachedDiT(policy.denoiser.inner, torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="cache mode"):
        calibrate(policy, OBS, "deepcache")
    load_all()
    unet = DENOISERS.build("unet1d", denoiser_config("unet1d"), 2, 8, 16, 3)
    with pytest.raises(TypeError, match="transformer"):
        CachedDiT(unet, torch.ones(2, 2, dtype=torch.bool))


def test_caching_composes_with_streaming_ticks():
    """Streaming: K is the calls per tick (the warm start is not counted), the warm start runs in full, and a
    full schedule equals the uncached head tick for tick."""
    policy = make("streaming", action_horizon=1, steps_per_tick=2, warmup_steps=3)
    torch.manual_seed(1)
    policy.reset()
    ref = [policy.predict_chunk(OBS) for _ in range(3)]
    rep = calibrate(policy, OBS, "uniform", every=2)
    assert rep["steps"] == 2 and isinstance(policy.denoiser, CachedDiT)
    policy.denoiser = CachedDiT(policy.denoiser.inner, torch.ones(6, 2, dtype=torch.bool), "uniform")
    torch.manual_seed(1)
    policy.reset()
    assert all(torch.equal(policy.predict_chunk(OBS), r) for r in ref)
    assert calibrate(policy, OBS, "bac", budget=1)["steps"] == 2


def test_step_search_ranks_every_step_subset_by_measured_error():
    policy = make(sampler="ddim", num_inference_steps=10)
    fit = {"state": torch.randn(16, 2, 6, generator=torch.Generator().manual_seed(3))}
    ranked = step_search(policy, fit, 3, "bac")
    assert len(ranked) == 36 and [s for s, _ in ranked] == sorted(s for s, _ in ranked)
    assert all(int(sch[0].sum()) == 3 and sch[:, 0].all() and (sch == sch[0]).all() for _, sch in ranked)
    uniform = next(s for s, sch in ranked if torch.equal(sch, uniform_schedule(6, 10, 4)))
    assert ranked[0][0] <= uniform and ranked[0][0] < ranked[-1][0]
    # the score is that schedule's measured chunk error: with 16 windows and q = 0.9, the ceil(17 * 0.9) = 16th
    err = output_errors(_cached(policy, ranked[0][1]), fit)
    assert ranked[0][0] == pytest.approx(float(err.max()), rel=1e-3, abs=1e-5)


def _cached(policy, schedule):
    policy.denoiser = CachedDiT(policy.denoiser.inner if isinstance(policy.denoiser, CachedDiT) else policy.denoiser,
                                schedule, "bac")
    return policy


def test_bounded_schedule_holds_its_bound_on_unseen_windows():
    """Calibrated on fit windows with its bound measured on held-out ones, the schedule's chunk error on fresh
    windows from the same distribution stays under the stored bound (q = 0.9: at most ~10% of windows above)."""
    policy = make(sampler="ddim", num_inference_steps=10)
    g = torch.Generator().manual_seed(5)
    fit, held, fresh = ({"state": torch.randn(n, 2, 6, generator=g)} for n in (32, 64, 160))
    rep = calibrate_bounded(policy, fit, held, cost=0.4, q=0.9)
    cached, bound = policy.denoiser, rep["bound"]["chunk_rms"]
    assert isinstance(cached, CachedDiT) and rep["cost_fraction"] <= 0.4 and cached.schedule[:, 0].all()
    assert cost_fraction(cached.schedule, unit_costs(cached.inner)) == pytest.approx(rep["cost_fraction"])
    err = output_errors(policy, fresh)
    assert 0 < float(err.mean()) < bound and float((err > bound).float().mean()) <= 0.2
    assert len(rep["bound"]["units"]) == 6 and rep["bound"]["n_heldout"] == 64
    again = CachedDiT.from_json(cached.inner, cached.schedule_json())  # the bound travels with the schedule
    assert again.bound == cached.bound and torch.equal(again.schedule, cached.schedule)
    # tol: the fewest updates whose held-out bound is under it
    tight = calibrate_bounded(policy, fit, held, tol=bound / 4, q=0.9)
    assert tight["bound"]["chunk_rms"] <= bound / 4 and rep["cost_fraction"] < tight["cost_fraction"] < 1
    assert float(output_errors(policy, fresh).mean()) < bound / 4


def test_trial_dit_matches_cached_dit_per_schedule():
    from rtpolicy.policies.accelerators.cache import steady_chunk, trial_chunks

    policy = make(sampler="ddim", num_inference_steps=10)
    inner = policy.denoiser
    scheds = torch.stack([uniform_schedule(6, 10, 3), uniform_schedule(6, 10, 2), torch.ones(6, 10, dtype=torch.bool)])
    scheds[0, 3, 5] = True
    for mode in ("bac", "taylor"):
        noise: list = []
        ref = steady_chunk(policy, inner, OBS, 0, noise)
        trial = trial_chunks(policy, scheds, OBS, noise, mode)
        torch.testing.assert_close(trial[2], ref, atol=1e-5, rtol=1e-4)
        for s in range(2):
            own = steady_chunk(policy, CachedDiT(inner, scheds[s], mode), OBS, 0)
            torch.testing.assert_close(trial[s], own, atol=1e-5, rtol=1e-4)
            assert not torch.allclose(own, ref)
