"""Policy heads, denoisers and encoders, each found by name through a registry."""

from __future__ import annotations

import importlib

_MODULES = (
    "rtpolicy.policies.denoisers.unet1d",
    "rtpolicy.policies.denoisers.transformer",
    "rtpolicy.policies.denoisers.mode",
    "rtpolicy.policies.diffusion",
    "rtpolicy.policies.edm",
    "rtpolicy.policies.streaming",
    "rtpolicy.policies.truncated",
)


def load_all() -> None:
    """Import every module that registers a head or a denoiser."""
    for mod in _MODULES:
        importlib.import_module(mod)


def build_policy(policy_cfg, denoiser_cfg, shapes: dict[str, list[int]], num_tasks: int = 0):
    """Build a registered head from its config.

    shapes: {obs_key: feature shape, ..., "action": [Da]}; the head builds its normalizer,
    encoder and denoiser from them, so a checkpoint needs only configs + shapes + weights.
    """
    from rtpolicy.policies.base import POLICIES

    load_all()
    return POLICIES.build(policy_cfg.name, policy_cfg, denoiser_cfg, shapes, num_tasks)
