"""Real-time heads: denoiser-call counts, multimodality of truncated anchored diffusion, streaming buffer."""

import numpy as np
import pytest
import torch

from rtpolicy.policies import load_all

from rtpolicy.factory import build_policy, denoiser_config, policy_config
from rtpolicy.policies.denoisers.base import DENOISERS

load_all()
SHAPES = {"state": [4], "action": [2]}
SMALL = {"unet1d": {"down_dims": [16, 32]}, "transformer": {"n_layer": 1, "n_head": 2, "n_emb": 16}}


def make(head, den="unet1d", num_tasks=0, **over):
    base = {"horizon": 8, "obs_horizon": 2, "cond_dim": 16, "action_horizon": 1 if head == "streaming" else 4}
    pol = policy_config(head, base, over)
    dcfg = denoiser_config(den, SMALL[den])
    policy = build_policy(pol, dcfg, SHAPES, num_tasks)
    g = torch.Generator().manual_seed(0)
    policy.normalizer.fit({"state": torch.randn(64, 4, generator=g), "action": torch.rand(64, 2, generator=g) * 2 - 1})
    return policy


def count_calls(policy):
    calls = []
    policy.denoiser.register_forward_hook(lambda *a: calls.append(1))
    return calls


OBS = {"state": torch.randn(3, 2, 4)}


@pytest.mark.parametrize("den", ["unet1d", "transformer"])
@pytest.mark.parametrize(
    "head, over, nfe",
    [
        ("diffusion", {"sampler": "ddpm", "num_inference_steps": 100}, 100),
        ("diffusion", {"sampler": "ddim", "num_inference_steps": 10}, 10),
        ("edm", {"sampler": "euler", "num_inference_steps": 5}, 5),
        ("edm", {"sampler": "heun", "num_inference_steps": 5}, 9),
        ("edm", {"sampler": "dpmpp_2m", "num_inference_steps": 3}, 3),
        ("truncated", {"num_inference_steps": 1, "num_anchors": 4}, 1),
        ("truncated", {"num_inference_steps": 2, "num_anchors": 4}, 2),
    ],
)
def test_denoiser_calls_per_chunk(den, head, over, nfe):
    policy = make(head, den, **over).eval()
    if head == "truncated":
        policy.prepare(torch.rand(16, 8, 2) * 2 - 1)
    calls = count_calls(policy)
    chunk = policy.predict_chunk(OBS)
    assert chunk.shape == (3, policy.action_horizon, 2) and torch.isfinite(chunk).all()
    assert len(calls) == nfe


def test_edm_guidance_doubles_calls_and_changes_output():
    policy = make("edm", num_tasks=3, sampler="euler", num_inference_steps=3, guidance=1.0).eval()
    for p in policy.encoder.task.parameters():
        torch.nn.init.normal_(p, std=3.0)
    obs = OBS | {"task_id": torch.tensor([0, 1, 2])}
    calls = count_calls(policy)
    torch.manual_seed(0)
    plain = policy.predict_chunk(obs)
    assert len(calls) == 3
    policy.cfg.guidance = 3.0
    torch.manual_seed(0)
    guided = policy.predict_chunk(obs)
    assert len(calls) == 3 + 6
    assert not torch.allclose(plain, guided)


@pytest.mark.parametrize("den", ["unet1d", "transformer"])
def test_streaming_one_call_per_tick_and_reset(den):
    policy = make("streaming", den, steps_per_tick=1, warmup_steps=4).eval()
    calls = count_calls(policy)
    assert policy.buffer is None
    torch.manual_seed(1)
    first = policy.predict_chunk(OBS)
    assert first.shape == (3, 1, 2) and len(calls) == 4 + 1  # warm start + one tick
    policy.predict_chunk(OBS)
    assert len(calls) == 4 + 2
    assert policy.buffer is not None
    policy.reset()
    assert policy.buffer is None, "reset() must drop the rolling buffer"
    torch.manual_seed(1)
    again = policy.predict_chunk(OBS)
    assert torch.equal(first, again), "after reset() the buffer starts fresh"


def test_streaming_training_window_is_longer():
    policy = make("streaming")
    assert policy.data_horizon == policy.obs_horizon - 1 + policy.horizon
    loss, _ = policy.compute_loss({"obs": OBS, "action": torch.rand(3, policy.data_horizon, 2) * 2 - 1})
    loss.backward()
    assert torch.isfinite(loss)


def _train(policy, obs, actions, steps=300, lr=3e-3):
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    policy.train()
    for _ in range(steps):
        loss, _ = policy.compute_loss({"obs": obs, "action": actions})
        opt.zero_grad()
        loss.backward()
        opt.step()
    return policy.eval()


def test_truncated_keeps_both_modes_of_a_two_mode_dataset():
    """Same observation, two demonstrated behaviours (all +0.8 or all -0.8): each sampled chunk must
    be one of the modes, never their average, and sampling by score must produce both."""
    torch.manual_seed(0)
    policy = make("truncated", num_anchors=2, num_inference_steps=1, mode_select="sample")
    n = 64
    obs = {"state": torch.zeros(n, 2, 4)}
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    actions = sign[:, None, None] * 0.8 * torch.ones(n, 8, 2)
    policy.normalizer.fit({"state": torch.randn(64, 4), "action": actions.reshape(-1, 2)})
    policy.prepare(policy.normalizer.normalize("action", actions))
    _train(policy, obs, actions)
    chunks = policy.predict_chunk({"state": torch.zeros(200, 2, 4)})  # (200, Ha, 2)
    means = chunks.mean(dim=(1, 2))
    assert ((means - 0.8).abs() < 0.2).logical_or((means + 0.8).abs() < 0.2).all(), "a chunk fell between the modes"
    frac_pos = (means > 0).float().mean().item()
    assert 0.2 < frac_pos < 0.8, f"sampling by score lost a mode (positive share {frac_pos:.2f})"
    policy.cfg.mode_select = "argmax"
    top = policy.predict_chunk({"state": torch.zeros(4, 2, 4)}).mean(dim=(1, 2))
    assert ((top.abs() - 0.8).abs() < 0.2).all()


def test_truncated_anchors_are_kmeans_centres_and_saved():
    policy = make("truncated", num_anchors=2)
    windows = torch.cat([torch.full((10, 8, 2), 0.5), torch.full((10, 8, 2), -0.5)])
    policy.prepare(windows)
    centres = sorted(policy.anchors.mean(dim=(1, 2)).tolist())
    assert np.allclose(centres, [-0.5, 0.5], atol=1e-5)
    assert "anchors" in policy.state_dict()
    with pytest.raises(ValueError, match="fewer than policy.num_anchors"):
        make("truncated", num_anchors=50).prepare(windows)


def test_truncated_needs_anchors_before_training():
    policy = make("truncated", num_anchors=2)
    with pytest.raises(RuntimeError, match="anchors are not fitted"):
        policy.compute_loss({"obs": OBS, "action": torch.rand(3, 8, 2)})


@pytest.mark.parametrize("den", ["unet1d", "transformer"])
def test_per_position_levels_match_scalar_levels(den):

    dcfg = denoiser_config(den, SMALL[den])
    net = DENOISERS.build(den, dcfg, 2, 8, 16, 3).eval()
    for p in net.parameters():  # DiT starts with a zero output; give it non-trivial weights
        torch.nn.init.normal_(p, std=0.1)
    x, c, t = torch.randn(2, 8, 2), torch.randn(2, 3, 16), torch.tensor([3.0, 40.0])
    torch.testing.assert_close(net(x, t, c), net(x, t[:, None].expand(2, 8), c), atol=1e-5, rtol=1e-4)
    varied = t[:, None] + torch.arange(8.0)[None] * 5
    assert not torch.allclose(net(x, varied, c), net(x, t, c))
