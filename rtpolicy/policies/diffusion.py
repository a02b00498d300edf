"""DDPM/DDIM diffusion policy head (Chi et al. 2023) with diffusers' schedulers, on any denoiser."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

from rtpolicy.config import BetaSchedule, Choice, HeadConfig, PredictionType
from rtpolicy.policies.base import POLICIES
from rtpolicy.policies.head import DenoisingHead


class DiffusionSampler(Choice):
    ddpm = "ddpm"
    ddim = "ddim"


@dataclass
class DiffusionConfig(HeadConfig):
    name: str = "diffusion"
    num_train_timesteps: int = 100
    num_inference_steps: int = 10
    sampler: DiffusionSampler = DiffusionSampler.ddim
    prediction_type: PredictionType = PredictionType.epsilon
    beta_schedule: BetaSchedule = BetaSchedule.squaredcos_cap_v2
    clip_sample: bool = True


_SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}


@POLICIES.register("diffusion", config=DiffusionConfig)
class DiffusionPolicy(DenoisingHead):
    def __init__(self, cfg: DiffusionConfig, denoiser_cfg, shapes: dict[str, list[int]], num_tasks: int = 0, processor=None):
        if cfg.sampler not in _SAMPLERS:
            raise ValueError(f"policy.sampler must be one of {sorted(_SAMPLERS)}, got {cfg.sampler!r}")
        if cfg.prediction_type not in ("epsilon", "sample"):
            raise ValueError(f"policy.prediction_type must be 'epsilon' or 'sample', got {cfg.prediction_type!r}")
        super().__init__(cfg, denoiser_cfg, shapes, num_tasks, processor)
        sched_kwargs = dict(
            num_train_timesteps=cfg.num_train_timesteps,
            beta_schedule=cfg.beta_schedule,
            clip_sample=cfg.clip_sample,
            prediction_type=cfg.prediction_type,
        )
        self.train_scheduler = DDPMScheduler(**sched_kwargs)
        self.sampler = _SAMPLERS[cfg.sampler](**sched_kwargs)
        self.sampler.set_timesteps(cfg.num_inference_steps)

    def sample(self, cond: torch.Tensor) -> torch.Tensor:
        """Condition tokens (B, N, Dc) -> normalized action window (B, H, Da); NFE = num_inference_steps."""
        b = cond.shape[0]
        x = self.randn(b, self.horizon, self.action_dim, device=cond.device)
        for t in self.sampler.timesteps:
            out = self.denoiser(x, t.to(cond.device).float().expand(b), cond)
            x = self._ddpm_step(out, t, x) if self.cfg.sampler == "ddpm" else self.sampler.step(out, t, x).prev_sample
        return x

    def _ddpm_step(self, out: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """diffusers' DDPMScheduler.step (fixed_small variance), its noise drawn through ``self.randn``."""
        s = self.sampler
        t = int(t)
        prev_t = s.previous_timestep(t)
        a, a_prev = s.alphas_cumprod[t], s.alphas_cumprod[prev_t] if prev_t >= 0 else s.one
        beta, beta_prev = 1 - a, 1 - a_prev
        alpha_t, beta_t = a / a_prev, 1 - a / a_prev
        x0 = (x - beta**0.5 * out) / a**0.5 if self.cfg.prediction_type == "epsilon" else out
        if self.cfg.clip_sample:
            x0 = x0.clamp(-s.config.clip_sample_range, s.config.clip_sample_range)
        mean = (a_prev**0.5 * beta_t / beta) * x0 + (alpha_t**0.5 * beta_prev / beta) * x
        if t > 0:
            mean = mean + s._get_variance(t) ** 0.5 * self.randn(*out.shape, device=out.device)
        return mean

    def denoise_loss(self, x0: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.cfg.num_train_timesteps, (x0.shape[0],), device=x0.device)
        pred = self.denoiser(self.train_scheduler.add_noise(x0, noise, t), t.float(), cond)
        loss = F.mse_loss(pred, noise if self.cfg.prediction_type == "epsilon" else x0)
        return loss, {"loss": loss.item()}
