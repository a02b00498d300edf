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

