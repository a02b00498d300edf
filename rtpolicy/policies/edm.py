"""Score-based head with EDM preconditioning and few-step samplers (Karras et al. 2022; BESO, Reuss et al. 2023).

Denoiser D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), cond), trained on
ln(sigma) ~ N(p_mean, p_std^2). Sampling walks the Karras sigma ladder sigma_max -> sigma_min -> 0 with
Euler (NFE = steps), Heun (NFE = 2 steps - 1) or DPM-Solver++(2M) (NFE = steps). With a multi-task or
language-conditioned policy, ``guidance`` > 1 applies classifier-free guidance over the task token
(trained with ``cond_dropout``) and the instruction (trained with ``policy.encoder.lang_dropout``):
D = D(no task, no instruction) + guidance * (D(obs) - D(no task, no instruction)); guidance 1 means off
and costs no extra denoiser call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rtpolicy.config import Choice, HeadConfig
from rtpolicy.policies.base import POLICIES
from rtpolicy.policies.head import DenoisingHead


class EDMSampler(Choice):
    euler = "euler"
    heun = "heun"
    dpmpp_2m = "dpmpp_2m"


@dataclass
class EDMConfig(HeadConfig):
    name: str = "edm"
    sampler: EDMSampler = EDMSampler.dpmpp_2m
    num_inference_steps: int = 4
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0
    p_mean: float = -1.2
    p_std: float = 1.2
    guidance: float = 1.0  # classifier-free guidance scale over the task token and the instruction; 1 = off
    cond_dropout: float = 0.1  # share of training samples whose task token is dropped (multi-task only)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """n noise levels from sigma_max down to sigma_min, then 0: (n + 1,)."""
    ramp = torch.linspace(0, 1, n) if n > 1 else torch.zeros(1)
    inv = sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    return torch.cat([inv**rho, torch.zeros(1)])


@POLICIES.register("edm", config=EDMConfig)
class EDMPolicy(DenoisingHead):
    SAMPLERS = ("euler", "heun", "dpmpp_2m")

    def __init__(self, cfg: EDMConfig, denoiser_cfg, shapes: dict[str, list[int]], num_tasks: int = 0, processor=None):
        if cfg.sampler not in self.SAMPLERS:
            raise ValueError(f"policy.sampler must be one of {list(self.SAMPLERS)}, got {cfg.sampler!r}")
        if cfg.num_inference_steps < 1:
            raise ValueError(f"policy.num_inference_steps must be >= 1, got {cfg.num_inference_steps}")
        super().__init__(cfg, denoiser_cfg, shapes, num_tasks, processor)
        self.register_buffer("sigmas", karras_sigmas(cfg.num_inference_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho), persistent=False)

    # -- preconditioned denoiser -------------------------------------------------------------
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, H, Da), sigma (B,), cond (B, N, Dc) -> denoised estimate of x0 (B, H, Da)."""
        sd = self.cfg.sigma_data
        s = sigma[:, None, None]
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (s**2 + sd**2).sqrt()
        return c_skip * x + c_out * self.denoiser(c_in * x, sigma.log() / 4, cond)

    def denoise_loss(self, x0: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        sd = self.cfg.sigma_data
        sigma = (torch.randn(x0.shape[0], device=x0.device) * self.cfg.p_std + self.cfg.p_mean).exp()
        x = x0 + torch.randn_like(x0) * sigma[:, None, None]
        weight = (sigma**2 + sd**2) / (sigma * sd) ** 2  # EDM's loss weight: unit variance network target
        loss = (weight[:, None, None] * (self.denoise(x, sigma, cond) - x0) ** 2).mean()
        return loss, {"loss": loss.item()}

    # -- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def predict_chunk(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.start_chunk()
        uncond = None
        if self.cfg.guidance != 1.0 and (self.num_tasks > 0 or self.lang_key is not None):
            uncond = self.encode(self.unconditional(obs))  # no task, no instruction
        return self.to_chunk(self.sample(self.encode(obs), uncond))

    def _guided(self, x: torch.Tensor, sigma: float, cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        s = torch.full((x.shape[0],), sigma, device=x.device)
        d = self.denoise(x, s, cond)
        if uncond is not None:
            d_u = self.denoise(x, s, uncond)
            d = d_u + self.cfg.guidance * (d - d_u)
        return d

    def sample(self, cond: torch.Tensor, uncond: torch.Tensor | None = None) -> torch.Tensor:
        """cond (B, N, Dc) [, task-free uncond (B, N, Dc) for guidance] -> normalized window (B, H, Da)."""
        sig = self.sigmas.tolist()
        x = self.randn(cond.shape[0], self.horizon, self.action_dim, device=cond.device) * sig[0]
        old = None
        for i in range(len(sig) - 1):
            s, s_next = sig[i], sig[i + 1]
            d = self._guided(x, s, cond, uncond)
            if self.cfg.sampler == "dpmpp_2m":
                if s_next == 0:
                    x = d
                else:
                    h = math.log(s / s_next)
                    if old is not None:
                        r = math.log(sig[i - 1] / s) / h
                        d, old = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old, d
                    else:
                        old = d
                    x = (s_next / s) * x - math.expm1(-h) * d
                continue
            slope = (x - d) / s
            x_next = x + (s_next - s) * slope
            if self.cfg.sampler == "heun" and s_next > 0:
                slope_next = (x_next - self._guided(x_next, s_next, cond, uncond)) / s_next
                x_next = x + (s_next - s) * (slope + slope_next) / 2
            x = x_next
        return x.clamp(-1, 1)
