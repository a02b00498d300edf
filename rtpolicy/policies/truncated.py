"""Truncated anchored diffusion (DiffusionDrive, Liao et al. 2024): 1-2 denoiser calls per chunk.

Anchors are k-means centres of the normalized training action windows (saved as a buffer, so they
travel in the checkpoint). Training picks, per sample, the anchor nearest the ground truth (the
positive mode), noises that anchor only up to ``trunc_steps`` of the K-step schedule and learns to
predict the ground-truth window from it (reconstruction), next to a per-anchor confidence score
trained as classification with the positive anchor as label. Inference scores the anchors, takes the
best one (``mode_select=argmax``) or draws one by score (``sample``), adds small noise at the truncated
level and denoises it in ``num_inference_steps`` (1-2) sample-prediction DDIM steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from scipy.cluster.vq import kmeans2
from torch import nn

from rtpolicy.config import BetaSchedule, Choice, HeadConfig
from rtpolicy.policies.base import POLICIES
from rtpolicy.policies.head import DenoisingHead


class ModeSelect(Choice):
    argmax = "argmax"  # the best-scored anchor
    sample = "sample"  # an anchor drawn by score


@dataclass
class TruncatedConfig(HeadConfig):
    name: str = "truncated"
    num_anchors: int = 20
    num_train_timesteps: int = 100
    trunc_steps: int = 20  # training noise stops at this step of the K-step schedule
    num_inference_steps: int = 1  # 1 or 2 denoiser calls per chunk
    mode_select: ModeSelect = ModeSelect.argmax
    score_weight: float = 0.1  # classification loss weight
    beta_schedule: BetaSchedule = BetaSchedule.squaredcos_cap_v2
    anchor_seed: int = 0


@POLICIES.register("truncated", config=TruncatedConfig)
class TruncatedPolicy(DenoisingHead):
    def __init__(self, cfg: TruncatedConfig, denoiser_cfg, shapes: dict[str, list[int]], num_tasks: int = 0, processor=None):
        if cfg.mode_select not in ("argmax", "sample"):
            raise ValueError(f"policy.mode_select must be 'argmax' or 'sample', got {cfg.mode_select!r}")
        if not 1 <= cfg.num_inference_steps <= cfg.trunc_steps <= cfg.num_train_timesteps:
            raise ValueError("need 1 <= policy.num_inference_steps <= policy.trunc_steps <= policy.num_train_timesteps")
        super().__init__(cfg, denoiser_cfg, shapes, num_tasks, processor)
        self.register_buffer("anchors", torch.zeros(cfg.num_anchors, cfg.horizon, self.action_dim))
        self.register_buffer("anchors_fitted", torch.zeros((), dtype=torch.bool))
        n_tok = self.encoder.n_tokens
        self.scorer = nn.Sequential(nn.Linear(n_tok * cfg.cond_dim, 256), nn.Mish(), nn.Linear(256, cfg.num_anchors))
        self.scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                                       prediction_type="sample", clip_sample=True)
        steps = torch.linspace(cfg.trunc_steps - 1, 0, cfg.num_inference_steps + 1)[:-1].round().long()
        self.register_buffer("timesteps", steps, persistent=False)

    def prepare(self, windows: torch.Tensor) -> None:
        """k-means (k-means++ init, seeded) over normalized windows (N, H, Da) -> anchors (k, H, Da)."""
        n = windows.shape[0]
        if n < self.cfg.num_anchors:
            raise ValueError(f"{n} training windows are fewer than policy.num_anchors={self.cfg.num_anchors}")
        flat = windows.reshape(n, -1).double().cpu().numpy()
        centres, _ = kmeans2(flat, self.cfg.num_anchors, minit="++", seed=np.random.default_rng(self.cfg.anchor_seed), iter=50)
        self.anchors.copy_(torch.as_tensor(centres, dtype=torch.float32).view_as(self.anchors))
        self.anchors_fitted.fill_(True)

    def scores(self, cond: torch.Tensor) -> torch.Tensor:
        """cond (B, N, Dc) -> per-anchor logits (B, k)."""
        return self.scorer(cond.flatten(1))

    def noise_anchor(self, anchor: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(anchor, torch.randn_like(anchor), t)

    def denoise_loss(self, x0: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if not self.anchors_fitted:
            raise RuntimeError("truncated head: anchors are not fitted; call prepare(windows) before training")
        dist = torch.cdist(x0.flatten(1), self.anchors.flatten(1))  # (B, k)
        positive = dist.argmin(dim=1)
        t = torch.randint(0, self.cfg.trunc_steps, (x0.shape[0],), device=x0.device)
        pred = self.denoiser(self.noise_anchor(self.anchors[positive], t), t.float(), cond)
        recon = F.mse_loss(pred, x0)
        cls = F.cross_entropy(self.scores(cond), positive)
        loss = recon + self.cfg.score_weight * cls
        return loss, {"loss": loss.item(), "recon": recon.item(), "cls": cls.item()}

    def sample(self, cond: torch.Tensor) -> torch.Tensor:
        """cond (B, N, Dc) -> normalized window (B, H, Da) from the chosen anchor's mode."""
        logits = self.scores(cond)
        if self.cfg.mode_select == "sample":  # Gumbel-max: a draw by score whose randomness is standard normal noise
            u = (0.5 * (1 + torch.erf(self.randn(*logits.shape, device=logits.device) / 2**0.5))).clamp(1e-6, 1 - 1e-6)
            logits = logits - torch.log(-torch.log(u))
        mode = logits.argmax(1)
        b, ts = cond.shape[0], self.timesteps.tolist()
        anchor = self.anchors[mode]
        x = self.scheduler.add_noise(anchor, self.randn_like(anchor),
                                     torch.full((b,), ts[0], device=cond.device))
        abar = self.scheduler.alphas_cumprod
        for i, t in enumerate(ts):
            x0 = self.denoiser(x, torch.full((b,), float(t), device=cond.device), cond).clamp(-1, 1)
            if i + 1 < len(ts):  # deterministic DDIM move to the next (lower) truncated step
                a, a_next = abar[t].item(), abar[ts[i + 1]].item()
                eps = (x - a**0.5 * x0) / (1 - a) ** 0.5
                x = a_next**0.5 * x0 + (1 - a_next) ** 0.5 * eps
        return x0
