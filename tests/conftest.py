import os

os.environ.setdefault("MUJOCO_GL", "osmesa")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def small_cfgs():
    """(policy_cfg, {denoiser name: cfg}) for tiny, fast models."""
    from rtpolicy.factory import denoiser_config, policy_config
    from rtpolicy.policies.denoisers.base import DENOISERS

    pol = policy_config("diffusion", dict(horizon=8, obs_horizon=2, action_horizon=4, cond_dim=16, num_inference_steps=3))
    small = {"unet1d": {"down_dims": [16, 32]}, "transformer": {"n_layer": 1, "n_head": 2, "n_emb": 16},
             "mode": {"n_layer": 1, "n_head": 2, "n_emb": 16, "expert_hidden": 16}}
    dens = {name: denoiser_config(name, small[name]) for name in DENOISERS.names()}
    return pol, dens
