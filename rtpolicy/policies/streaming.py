"""Streaming diffusion policy (SDP, Høeg et al. 2024): one denoiser call per control tick.

The head keeps a rolling buffer of the next H actions whose noise levels rise along the buffer: after a
tick's denoising, position j sits at level j*K/H, so position 0 is clean and is executed; the buffer
then shifts by one and fresh noise (level K) enters at the end. Training noises position j of the
ground-truth chunk to level (j+1)*K/H - delta with a random offset delta in [0, K/H) (and, for a share
of samples, one level for the whole chunk, which is what the buffer's warm start after ``reset()`` uses).
Levels are continuous in [0, K]; level 0 is clean and level k >= 1 uses diffusers' alpha_bar[k-1].

Buffer rows are actions for steps t .. t+H-1, so a training window holds To-1 + H action steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from rtpolicy.config import BetaSchedule, HeadConfig, PredictionType
from rtpolicy.policies.base import POLICIES
from rtpolicy.policies.head import DenoisingHead


@dataclass
class StreamingConfig(HeadConfig):
    name: str = "streaming"
    horizon: int = 8  # H: buffer length (actions ahead of now); 8 beat 16 on MT10 (0.94 vs 0.82, RESULTS.md)
    action_horizon: int = 1  # one action per control tick
    num_train_timesteps: int = 100  # K
    steps_per_tick: int = 1  # denoiser calls per control tick
    warmup_steps: int = 10  # DDIM steps of the warm start after reset() (excluded from per-tick cost)
    uniform_level_prob: float = 0.25  # share of training samples with one level for the whole chunk
    prediction_type: PredictionType = PredictionType.sample  # sample | epsilon (epsilon barely lets the nearly clean head of the buffer react to new observations)
    beta_schedule: BetaSchedule = BetaSchedule.squaredcos_cap_v2


@POLICIES.register("streaming", config=StreamingConfig)
class StreamingPolicy(DenoisingHead):
    def __init__(self, cfg: StreamingConfig, denoiser_cfg, shapes: dict[str, list[int]], num_tasks: int = 0, processor=None):
        if cfg.action_horizon != 1:
            raise ValueError(f"streaming executes one action per tick: policy.action_horizon must be 1, got {cfg.action_horizon}")
        if cfg.steps_per_tick < 1 or cfg.warmup_steps < 1:
            raise ValueError("policy.steps_per_tick and policy.warmup_steps must be >= 1")
        if cfg.prediction_type not in ("epsilon", "sample"):
            raise ValueError(f"policy.prediction_type must be 'epsilon' or 'sample', got {cfg.prediction_type!r}")
        super().__init__(cfg, denoiser_cfg, shapes, num_tasks, processor)
        self.data_horizon = cfg.obs_horizon - 1 + cfg.horizon
        # every step of an episode is a window's current step once, its buffer padded with the last action:
        # with Ha - 1 = 0 the last H - 1 steps never were, and Lift's whole lift phase lies there (RESULTS.md)
        self.pad_after = cfg.horizon - 1
        abar = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule).alphas_cumprod
        self.register_buffer("log_abar", torch.cat([torch.zeros(1), abar.double().log().float()]), persistent=False)
        self.K = cfg.num_train_timesteps
        self.buffer: torch.Tensor | None = None  # (B, H, Da) normalized, levels j*K/H + K/H after a shift

    # -- noise levels --------------------------------------------------------------------------
    def abar(self, level: torch.Tensor) -> torch.Tensor:
        """Continuous level in [0, K] (any shape) -> alpha_bar, log-linear between table entries."""
        level = level.clamp(0, self.K)
        lo = level.floor().long().clamp(max=self.K - 1)
        w = level - lo
        return (self.log_abar[lo] * (1 - w) + self.log_abar[lo + 1] * w).exp()

    def staircase(self, b: int, offset: torch.Tensor | float, device) -> torch.Tensor:
        """(B, H) levels (j+1)*K/H - offset for buffer position j."""
        j = torch.arange(1, self.horizon + 1, device=device, dtype=torch.float32)
        off = offset[:, None] if isinstance(offset, torch.Tensor) else offset
        return (j[None] * self.K / self.horizon - off).expand(b, -1)

    def predict_x0(self, x: torch.Tensor, level: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, H, Da) at per-position levels (B, H) -> clipped x0 estimate and the matching noise."""
        a = self.abar(level)[..., None]
        out = self.denoiser(x, level, cond)
        x0 = out if self.cfg.prediction_type == "sample" else (x - (1 - a).sqrt() * out) / a.sqrt().clamp(min=1e-4)
        x0 = x0.clamp(-1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt().clamp(min=1e-4)
        return x0, eps

    def step_to(self, x, level, new_level, cond):
        """Deterministic DDIM move of every position from ``level`` to ``new_level`` (B, H)."""
        x0, eps = self.predict_x0(x, level, cond)
        a = self.abar(new_level)[..., None]
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    # -- training ------------------------------------------------------------------------------
    def denoise_loss(self, x0: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        x0 = x0[:, self.obs_horizon - 1 :]  # (B, H, Da): steps t .. t+H-1
        b = x0.shape[0]
        stair = self.staircase(b, torch.rand(b, device=x0.device) * self.K / self.horizon, x0.device)
        flat = (torch.rand(b, 1, device=x0.device) * self.K).expand(-1, self.horizon).clamp(min=1e-3)
        level = torch.where(torch.rand(b, 1, device=x0.device) < self.cfg.uniform_level_prob, flat, stair)
        a = self.abar(level)[..., None]
        noise = torch.randn_like(x0)
        pred = self.denoiser(a.sqrt() * x0 + (1 - a).sqrt() * noise, level, cond)
        loss = F.mse_loss(pred, noise if self.cfg.prediction_type == "epsilon" else x0)
        return loss, {"loss": loss.item()}

    # -- inference -----------------------------------------------------------------------------
    def reset(self) -> None:
        self.buffer = None

    def warm_start(self, cond: torch.Tensor) -> torch.Tensor:
        """Fresh buffer: DDIM at one level for the whole chunk, then re-noised onto the staircase."""
        b = cond.shape[0]
        x = self.randn(b, self.horizon, self.action_dim, device=cond.device)
        levels = torch.linspace(self.K, 0, self.cfg.warmup_steps + 1, device=cond.device)
        for lv, nxt in zip(levels[:-1], levels[1:]):
            self.start_chunk()  # a feature cache computes every warm-start call in full
            x = self.step_to(x, lv.expand(b, self.horizon), nxt.expand(b, self.horizon), cond)
        a = self.abar(self.staircase(b, 0.0, cond.device))[..., None]
        return a.sqrt() * x + (1 - a).sqrt() * self.randn_like(x)

    @torch.no_grad()
    def predict_chunk(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """One control tick: -> (B, 1, Da). The first call after reset() also runs the warm start."""
        cond = self.encode(obs)
        if self.buffer is None or self.buffer.shape[0] != cond.shape[0]:
            self.buffer = self.warm_start(cond)
        action, self.buffer = self.tick(cond, self.buffer)
        return action

    def tick(self, cond: torch.Tensor, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cond (B, N, Dc), buffer (B, H, Da) -> (the action to execute now (B, 1, Da) raw, the next buffer)."""
        b, dev = cond.shape[0], cond.device
        x, s = buffer, self.cfg.steps_per_tick
        self.start_chunk()  # a tick's steps_per_tick calls are one "chunk" for a feature cache
        drop = self.K / self.horizon / s
        for m in range(s):
            level = self.staircase(b, m * drop, dev)
            x = self.step_to(x, level, (level - drop).clamp(min=0), cond)
        return self.normalizer.unnormalize("action", x[:, :1]), torch.cat([x[:, 1:], self.randn_like(x[:, :1])], dim=1)
