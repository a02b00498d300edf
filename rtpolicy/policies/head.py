"""The shared body of every denoising head: normalizer + observation encoder + denoiser.

A head subclasses :class:`DenoisingHead` and writes two things:
    sample(cond (B, N, Dc)) -> normalized action window (B, H, Da)
    denoise_loss(x0 (B, H, Da), cond (B, N, Dc)) -> (scalar loss, metrics)
Everything else (validation, normalization, the window convention, task ids) lives here once.

Window convention (per training sample and per inference call):
    obs      steps t-To+1 .. t          (B, To, Do)
    actions  steps t-To+1 .. t-To+H     (B, H, Da)   predicted by the denoiser
    executed steps t .. t+Ha-1          (B, Ha, Da)  returned by predict_chunk
"""

from __future__ import annotations

import contextlib

import torch

from rtpolicy.datasets.normalizer import Normalizer
from rtpolicy.policies.base import Policy, check_obs
from rtpolicy.policies.denoisers.base import DENOISERS
from rtpolicy.policies.encoders.observation import build_obs_encoder, split_keys
from rtpolicy.processors import ObservationProcessor, rotation_key


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


def denoiser_calls(policy, obs: dict[str, torch.Tensor], steady: bool = False) -> list[tuple[torch.Tensor, ...]]:
    """The arguments (x, t, cond) of every denoiser call in one ``predict_chunk(obs)`` right after ``reset()``.

    ``steady``: record the second call instead (a streaming tick without the warm start of the first).
    The policy is reset again afterwards.
    """
    calls: list[tuple[torch.Tensor, ...]] = []
    policy.reset()
    try:
        with torch.no_grad():
            if steady:
                policy.predict_chunk(obs)
            hook = policy.denoiser.register_forward_pre_hook(lambda _m, args: calls.append(tuple(a.detach() for a in args)))
            try:
                policy.predict_chunk(obs)
            finally:
                hook.remove()
    finally:
        policy.reset()
    return calls


class NoiseFeed:
    """Where a head's sampling noise comes from, in draw order: torch's RNG, recorded (``values=None``), or
    a given list of tensors (replay; an exported graph's noise inputs), so a given noise gives one output."""

    def __init__(self, values: list[torch.Tensor] | None = None, check: bool = True):
        self.values = None if values is None else list(values)
        self.drawn: list[torch.Tensor] = []
        self.check = check  # False while a graph is traced: the runtime checks its inputs itself

    def randn(self, shape: tuple[int, ...], device) -> torch.Tensor:
        if self.values is None:
            x = torch.randn(shape, device=device)
        else:
            if not self.values:
                raise ValueError(f"noise feed is empty; the head drew one more tensor of shape {tuple(shape)}")
            x = self.values.pop(0)
            if tuple(x.shape) != tuple(shape):
                raise ValueError(f"noise feed gave shape {tuple(x.shape)} where the head draws {tuple(shape)}")
        self.drawn.append(x)
        return x


class NoiseDraws:
    """Sampling noise drawn through one place, so a :class:`NoiseFeed` can record or replay it: the eager
    heads and the ONNX Runtime policy (whose graphs take the noise as inputs) both draw here."""

    _feed: NoiseFeed | None = None

    def randn(self, *shape: int, device=None) -> torch.Tensor:
        """Standard normal noise (shape) for sampling; every draw at inference goes through here."""
        return torch.randn(shape, device=device) if self._feed is None else self._feed.randn(shape, device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Noise shaped (and, from torch's RNG, laid out) like ``x``."""
        return torch.randn_like(x) if self._feed is None else self._feed.randn(tuple(x.shape), x.device)

    @contextlib.contextmanager
    def noise_feed(self, feed: NoiseFeed):
        """Inside: sampling noise comes from ``feed`` (recorded or replayed)."""
        prev, self._feed = self._feed, feed
        try:
            yield feed
        finally:
            self._feed = prev


class DenoisingHead(Policy, NoiseDraws):
    """cfg needs obs_horizon, horizon, action_horizon, normalizer ('minmax'|'meanstd'), cond_dim.

    ``processor`` (rtpolicy.processors; None: none) is the policy's observation processor; its ``rotations``
    widen the encoder's input for those keys (quaternions read as rotation-matrix columns, :meth:`features`).
    """

    def __init__(self, cfg, denoiser_cfg, shapes: dict[str, list[int]], num_tasks: int = 0, processor=None):
        super().__init__()
        self.processor = processor if processor is not None else ObservationProcessor()
        validate_horizons(cfg)
        if "action" not in shapes:
            raise ValueError(f"shapes must include 'action'; got {sorted(shapes)}")
        self.cfg = cfg
        self.obs_horizon, self.horizon, self.action_horizon = cfg.obs_horizon, cfg.horizon, cfg.action_horizon
        self.data_horizon = cfg.horizon  # action steps per training window, from t-To+1
        # action steps a window may pad past an episode's end (repeating its last action); with Ha - 1
        # (diffusion_policy's convention) the Ha executed actions are always real ones
        self.pad_after = cfg.action_horizon - 1
        self.obs_shapes = {k: list(v) for k, v in shapes.items() if k != "action"}
        self.action_dim = int(shapes["action"][0])
        self.num_tasks = num_tasks
        enc_cfg = getattr(cfg, "encoder", None)  # an EncoderConfig (policy.encoder.*); None: its defaults
        vector, _, self.lang_key = split_keys(self.obs_shapes, getattr(enc_cfg, "lang_key", None) or "lang_emb")
        self.norm_keys = vector  # images are scaled inside the image encoder, embeddings are unit vectors already
        # a key's quaternions (processor.rotations) are read as rotation-matrix columns, normalized as their own key
        rotated = {rotation_key(k): [6 * len(self.processor.rotations[k])] for k in vector if k in self.processor.rotations}
        modes = {k: cfg.normalizer for k in [*vector, *rotated]} | {"action": "minmax"}
        self.normalizer = Normalizer({k: list(shapes[k]) for k in [*vector, "action"]} | rotated, modes=modes)
        features = self.obs_shapes | self.processor.feature_shapes({k: self.obs_shapes[k] for k in vector})
        self.encoder = build_obs_encoder(features, cfg.obs_horizon, cfg.cond_dim, num_tasks, enc_cfg)
        self.denoiser = DENOISERS.build(
            denoiser_cfg.name, denoiser_cfg, self.action_dim, cfg.horizon, cfg.cond_dim, self.encoder.n_tokens
        )
        # a frozen image encoder also takes its cached keypoints (B, To, 2K) in place of a camera's frames
        self.keypoint_shapes: dict[str, list[int]] = {}
        if getattr(enc_cfg, "freeze_image", False):
            from rtpolicy.policies.encoders.image import find_image_encoder

            images = find_image_encoder(self.encoder)
            self.keypoint_shapes = {k: [images.keypoint_dim] for k in images.keys} if images is not None else {}

    def reset(self) -> None:
        """Stateless between chunks: nothing to reset."""

    def features(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw obs (validated) -> condition tokens (B, N, Dc): vector keys normalized (their quaternions, if the
        processor names any, as rotation-matrix columns), the rest as they are."""
        x = {k: self.normalizer.normalize(k, obs[k].float()) if k in self.norm_keys else obs[k] for k in self.obs_shapes}
        for k in self.processor.rotations:
            if k in self.norm_keys:
                rot = self.normalizer.normalize(rotation_key(k), self.processor.rotation_features(k, obs[k].float()))
                x[k] = self.processor.rotate(k, x[k], rot)
        return self.encoder(x, obs.get("task_id"))

    def encode(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw obs -> condition tokens (B, N, Dc); validates keys, shapes and finiteness.

        Vector keys are normalized here; image keys (B, To, H, W, 3) uint8 (or, for a frozen image
        encoder, their cached keypoints (B, To, 2K)) go to the encoder as they are; a language embedding
        may come as (B, E) instead of (B, To, E).
        """
        lang = obs.get(self.lang_key) if self.lang_key is not None else None
        if lang is not None and lang.ndim == 2:
            obs = obs | {self.lang_key: lang[:, None].expand(-1, self.obs_horizon, -1)}
        shapes = self.obs_shapes | {k: v for k, v in self.keypoint_shapes.items() if k in obs and obs[k].ndim == 3}
        if self._feed is None or self._feed.check:
            check_obs(obs, shapes, self.obs_horizon)
        return self.features(obs)

    def unconditional(self, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``obs`` without its instruction and task: task_id -1 (the null task), the language key zeroed
        (a zero embedding / all-pad token ids: the null instruction). For classifier-free guidance."""
        out = dict(obs)
        if "task_id" in out:
            out["task_id"] = torch.full_like(out["task_id"], -1)
        if self.lang_key is not None and self.lang_key in out:
            out[self.lang_key] = torch.zeros_like(out[self.lang_key])
        return out

    @torch.no_grad()
    def predict_chunk(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.start_chunk()
        return self.to_chunk(self.sample(self.encode(obs)))

    def start_chunk(self) -> None:
        """Tell a stateful denoiser wrapper (e.g. a feature cache) that the next call is a chunk's first."""
        start = getattr(self.denoiser, "start_chunk", None)
        if start is not None:
            start()

    def to_chunk(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized window (B, H, Da) -> the raw actions to execute from now (B, Ha, Da)."""
        start = self.obs_horizon - 1
        return self.normalizer.unnormalize("action", x[:, start : start + self.action_horizon])

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        actions = batch["action"]
        if actions.shape[1:] != (self.data_horizon, self.action_dim):
            raise ValueError(
                f"batch['action'] has shape {tuple(actions.shape)}, expected (B, {self.data_horizon}, {self.action_dim})"
            )
        obs = dict(batch["obs"])
        if "task_id" in batch:
            task_id = batch["task_id"]
            p_drop = getattr(self.cfg, "cond_dropout", 0.0)
            if self.training and p_drop > 0:  # classifier-free guidance: learn the task-free model too
                task_id = torch.where(torch.rand(task_id.shape, device=task_id.device) < p_drop, -1, task_id)
            obs["task_id"] = task_id
        loss, metrics = self.denoise_loss(self.normalizer.normalize("action", actions), self.encode(obs))
        aux = getattr(self.denoiser, "aux_loss", None)  # e.g. MoDE's expert load balancing
        if aux is not None:
            loss = loss + aux
            metrics = metrics | {"aux": aux.item()}
        return loss, metrics

    def prepare(self, windows: torch.Tensor) -> None:
        """Fit data-dependent state (e.g. anchors) on normalized training windows (N, data_horizon, Da)."""

    def sample(self, cond: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def denoise_loss(self, x0: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:  # pragma: no cover
        raise NotImplementedError
