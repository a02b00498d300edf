"""The diffusion head on both denoisers: shapes, input validation, normalizer inside the policy."""

import numpy as np
import pytest
import torch

from rtpolicy.factory import build_policy

SHAPES = {"state": [5], "action": [3]}


def _policy(pol, den, **kw):
    policy = build_policy(pol, den, SHAPES, **kw)
    rng = np.random.default_rng(0)
    policy.normalizer.fit({"state": rng.normal(size=(100, 5)), "action": rng.uniform(-2, 2, size=(100, 3))})
    return policy


def _obs(b=2, to=2):
    return {"state": torch.randn(b, to, 5)}


@pytest.mark.parametrize("den_name", ["unet1d", "transformer"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_predict_chunk_shape_and_range(small_cfgs, den_name, sampler):
    pol, dens = small_cfgs
    pol.sampler = sampler
    policy = _policy(pol, dens[den_name]).eval()
    chunk = policy.predict_chunk(_obs(3))
    assert chunk.shape == (3, pol.action_horizon, 3)
    # clip_sample keeps normalized actions in [-1, 1], i.e. inside the data range after unnormalizing
    assert chunk.min() >= -2.0 - 1e-4 and chunk.max() <= 2.0 + 1e-4


@pytest.mark.parametrize("den_name", ["unet1d", "transformer"])
def test_compute_loss_backward(small_cfgs, den_name):
    pol, dens = small_cfgs
    policy = _policy(pol, dens[den_name])
    batch = {"obs": _obs(4), "action": torch.randn(4, pol.horizon, 3)}
    loss, metrics = policy.compute_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and metrics["loss"] > 0
    assert all(p.grad is not None for p in policy.denoiser.parameters() if p.requires_grad)


def test_training_reduces_loss(small_cfgs):
    pol, dens = small_cfgs
    torch.manual_seed(0)
    policy = _policy(pol, dens["unet1d"])
    obs = _obs(32)
    actions = obs["state"][:, -1:, :3].repeat(1, pol.horizon, 1).clamp(-2, 2)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss, _ = policy.compute_loss({"obs": obs, "action": actions})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])


def test_normalizer_stats_live_in_state_dict(small_cfgs):
    pol, dens = small_cfgs
    policy = _policy(pol, dens["unet1d"])
    fresh = build_policy(pol, dens["unet1d"], SHAPES)
    fresh.load_state_dict(policy.state_dict())
    x = torch.randn(4, 5)
    assert torch.equal(fresh.normalizer.normalize("state", x), policy.normalizer.normalize("state", x))


def test_multitask_needs_task_id(small_cfgs):
    pol, dens = small_cfgs
    policy = _policy(pol, dens["transformer"], num_tasks=3).eval()
    with pytest.raises(ValueError, match="task_id"):
        policy.predict_chunk(_obs(2))
    obs = _obs(2) | {"task_id": torch.tensor([0, 2])}
    assert policy.predict_chunk(obs).shape == (2, pol.action_horizon, 3)


@pytest.mark.parametrize(
    "obs, match",
    [
        ({}, "missing key 'state'"),
        ({"state": torch.randn(2, 2, 6)}, r"'state' has shape \(2, 2, 6\), expected \(B, 2, 5\)"),
        ({"state": torch.randn(2, 3, 5)}, "expected"),
        ({"state": torch.full((1, 2, 5), float("nan"))}, "non-finite"),
    ],
)
def test_bad_observations(small_cfgs, obs, match):
    pol, dens = small_cfgs
    policy = _policy(pol, dens["unet1d"]).eval()
    with pytest.raises(ValueError, match=match):
        policy.predict_chunk(obs)


def test_bad_action_batch(small_cfgs):
    pol, dens = small_cfgs
    policy = _policy(pol, dens["unet1d"])
    with pytest.raises(ValueError, match="batch\\['action'\\] has shape"):
        policy.compute_loss({"obs": _obs(2), "action": torch.randn(2, pol.horizon + 1, 3)})


def test_bad_horizons(small_cfgs):
    pol, dens = small_cfgs
    pol.action_horizon = pol.horizon
    with pytest.raises(ValueError, match="action_horizon"):
        build_policy(pol, dens["unet1d"], SHAPES)
