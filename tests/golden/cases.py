"""Seeded golden cases: one per (head, denoiser, sampler). Regenerate after an intended change with
``python tests/golden/regenerate.py`` and commit the .safetensors files it rewrites."""

from __future__ import annotations

from pathlib import Path

import torch

HERE = Path(__file__).parent
SHAPES = {"state": [6], "action": [3]}
SMALL_DENOISERS = {"unet1d": {"down_dims": [16, 32]}, "transformer": {"n_layer": 1, "n_head": 2, "n_emb": 16}}
# (head, denoiser, head overrides)
HEAD_SETTINGS = [
    ("diffusion", {"sampler": "ddpm", "num_inference_steps": 100}),
    ("diffusion", {"sampler": "ddim", "num_inference_steps": 10}),
    ("edm", {"sampler": "euler", "num_inference_steps": 4}),
    ("edm", {"sampler": "heun", "num_inference_steps": 3}),
    ("edm", {"sampler": "dpmpp_2m", "num_inference_steps": 4}),
    ("truncated", {"num_anchors": 4, "num_inference_steps": 1}),
    ("truncated", {"num_anchors": 4, "num_inference_steps": 2}),
    ("streaming", {"action_horizon": 1, "steps_per_tick": 1, "warmup_steps": 3}),
]
CASES = [(head, den, over) for den in SMALL_DENOISERS for head, over in HEAD_SETTINGS]


def case_name(head: str, den: str, over: dict) -> str:
    return "_".join([head, den, *(f"{k}-{v}" for k, v in sorted(over.items()))])


def run_case(head: str, den: str, over: dict) -> dict[str, torch.Tensor]:
    from rtpolicy.policies import load_all
    from rtpolicy.factory import build_policy, denoiser_config, policy_config

    load_all()
    base = {"horizon": 8, "obs_horizon": 2, "action_horizon": 4, "cond_dim": 16}
    pol = policy_config(head, base, over)
    dcfg = denoiser_config(den, SMALL_DENOISERS[den])
    torch.manual_seed(0)
    policy = build_policy(pol, dcfg, SHAPES)
    g = torch.Generator().manual_seed(1)
    policy.normalizer.fit({"state": torch.randn(64, 6, generator=g), "action": torch.rand(64, 3, generator=g) * 2 - 1})
    obs = {"state": torch.randn(2, 2, 6, generator=g)}
    batch = {"obs": obs, "action": torch.rand(2, policy.data_horizon, 3, generator=g) * 2 - 1}
    policy.prepare(torch.rand(16, policy.data_horizon, 3, generator=g) * 2 - 1)
    torch.manual_seed(2)
    loss, _ = policy.compute_loss(batch)
    policy.eval()
    torch.manual_seed(3)
    chunks = [policy.predict_chunk(obs) for _ in range(2)]  # two calls: streaming carries its buffer over
    return {"loss": loss.detach().reshape(1), "chunk": torch.cat(chunks, dim=1)}
