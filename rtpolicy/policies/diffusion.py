"""DDPM/DDIM diffusion policy head (Chi et al. 2023) on any registered denoiser.

Window convention (per training sample and per inference call):
    obs      steps t-To+1 .. t          (B, To, Do)
    actions  steps t-To+1 .. t-To+H     (B, H, Da)   predicted by the denoiser
    executed steps t .. t+Ha-1          (B, Ha, Da)  returned by predict_chunk
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

from rtpolicy.datasets.normalizer import Normalizer
from rtpolicy.policies.base import POLICIES, Policy, check_obs
from rtpolicy.policies.denoisers.base import DENOISERS
from rtpolicy.policies.encoders.state import StateEncoder


@dataclass
class DiffusionConfig:
    name: str = "diffusion"
    obs_horizon: int = 2  # To
    horizon: int = 16  # H, actions predicted per denoising
    action_horizon: int = 8  # Ha, actions executed per chunk
    num_train_timesteps: int = 100
    num_inference_steps: int = 10
    sampler: str = "ddim"  # ddpm | ddim
    prediction_type: str = "epsilon"  # epsilon | sample
    beta_schedule: str = "squaredcos_cap_v2"
    clip_sample: bool = True
    normalizer: str = "minmax"  # minmax | meanstd (observations; actions are always min-max)
    cond_dim: int = 64  # width of the observation tokens


_SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}


def validate_horizons(cfg) -> None:
    if cfg.obs_horizon < 1:
        raise ValueError(f"policy.obs_horizon must be >= 1, got {cfg.obs_horizon}")
    if cfg.horizon < cfg.obs_horizon:
        raise ValueError(f"policy.horizon ({cfg.horizon}) must be >= policy.obs_horizon ({cfg.obs_horizon})")
    if not 1 <= cfg.action_horizon <= cfg.horizon - cfg.obs_horizon + 1:
        raise ValueError(
            f"policy.action_horizon must be in [1, horizon - obs_horizon + 1] = [1, {cfg.horizon - cfg.obs_horizon + 1}],"
            f" got {cfg.action_horizon}"
        )


@POLICIES.register("diffusion", config=DiffusionConfig)
class DiffusionPolicy(Policy):
    def __init__(self, cfg: DiffusionConfig, denoiser_cfg, shapes: dict[str, list[int]], num_tasks: int = 0):
        super().__init__()
        validate_horizons(cfg)
        if cfg.sampler not in _SAMPLERS:
            raise ValueError(f"policy.sampler must be one of {sorted(_SAMPLERS)}, got {cfg.sampler!r}")
        if cfg.prediction_type not in ("epsilon", "sample"):
            raise ValueError(f"policy.prediction_type must be 'epsilon' or 'sample', got {cfg.prediction_type!r}")
        if "action" not in shapes:
            raise ValueError(f"shapes must include 'action'; got {sorted(shapes)}")
        self.cfg = cfg
        self.obs_horizon, self.horizon, self.action_horizon = cfg.obs_horizon, cfg.horizon, cfg.action_horizon
        self.obs_shapes = {k: list(v) for k, v in shapes.items() if k != "action"}
        self.action_dim = int(shapes["action"][0])
        self.num_tasks = num_tasks
        modes = {k: cfg.normalizer for k in self.obs_shapes} | {"action": "minmax"}
        self.normalizer = Normalizer({k: list(v) for k, v in shapes.items()}, modes=modes)
        self.encoder = StateEncoder(self.obs_shapes, cfg.obs_horizon, cfg.cond_dim, num_tasks)
        self.denoiser = DENOISERS.build(
            denoiser_cfg.name, denoiser_cfg, self.action_dim, cfg.horizon, cfg.cond_dim, self.encoder.n_tokens
        )
        sched_kwargs = dict(
            num_train_timesteps=cfg.num_train_timesteps,
            beta_schedule=cfg.beta_schedule,
            clip_sample=cfg.clip_sample,
            prediction_type=cfg.prediction_type,
        )
        self.train_scheduler = DDPMScheduler(**sched_kwargs)
        self.sampler = _SAMPLERS[cfg.sampler](**sched_kwargs)
        self.sampler.set_timesteps(cfg.num_inference_steps)

    # -- interface ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Stateless between chunks: nothing to reset."""

    def encode(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw obs -> condition tokens (B, N, Dc); validates keys, shapes and finiteness."""
        check_obs(obs, self.obs_shapes, self.obs_horizon)
        norm = {k: self.normalizer.normalize(k, obs[k].float()) for k in self.obs_shapes}
        return self.encoder(norm, obs.get("task_id"))

    @torch.no_grad()
    def predict_chunk(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        cond = self.encode(obs)
        x = self.sample(cond)
        actions = self.normalizer.unnormalize("action", x)
        start = self.obs_horizon - 1
        return actions[:, start : start + self.action_horizon]

    def sample(self, cond: torch.Tensor) -> torch.Tensor:
        """Condition tokens (B, N, Dc) -> normalized action window (B, H, Da)."""
        b = cond.shape[0]
        x = torch.randn(b, self.horizon, self.action_dim, device=cond.device)
        for t in self.sampler.timesteps:
            out = self.denoiser(x, t.to(cond.device).float().expand(b), cond)
            x = self.sampler.step(out, t, x).prev_sample
        return x

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        actions = batch["action"]
        if actions.shape[1:] != (self.horizon, self.action_dim):
            raise ValueError(f"batch['action'] has shape {tuple(actions.shape)}, expected (B, {self.horizon}, {self.action_dim})")
        obs = dict(batch["obs"])
        if "task_id" in batch:
            obs["task_id"] = batch["task_id"]
        cond = self.encode(obs)
        x0 = self.normalizer.normalize("action", actions)
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.cfg.num_train_timesteps, (x0.shape[0],), device=x0.device)
        xt = self.train_scheduler.add_noise(x0, noise, t)
        pred = self.denoiser(xt, t.float(), cond)
        target = noise if self.cfg.prediction_type == "epsilon" else x0
        loss = F.mse_loss(pred, target)
        return loss, {"loss": loss.item()}
