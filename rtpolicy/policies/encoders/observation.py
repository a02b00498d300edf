"""The observation encoder of every denoising head: vector, image and language keys -> condition tokens.

Keys are told apart by their feature shape (and the language key by name):
    (D,)        vector key  -> StateEncoder: one token per obs step (all vector keys concatenated)
    (H, W, 3)   image key   -> ImageEncoder: one token per camera per obs step
    lang_key    (E,)        -> LanguageToken: one token from the newest step's embedding
    lang_tokens (L,)        -> instruction token ids (never normalized): the VLA encoder's language input, or
                               without a VLA backbone a WordsToken (learned word embeddings, one token)
A task id adds one learned token (row ``num_tasks``: the null task for classifier-free guidance).
With ``slot_key`` set, the last ``slot_count * slot_size`` dims of that vector key are object slots, and
``slot_queries`` tokens made from the task / language tokens attend over them (:mod:`.slots`).

:func:`build_obs_encoder` returns a plain :class:`StateEncoder` when every key is a vector and there
is no language key and no slots, so state-only policies keep their parameters, names and outputs, and the
:class:`~rtpolicy.policies.encoders.vla.VLAEncoder` when ``cfg.vla_backbone`` is set.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rtpolicy.policies.encoders.language import LanguageToken, WordsToken, vocab_size
from rtpolicy.policies.encoders.slots import SlotAttention, slot_layout
from rtpolicy.policies.encoders.state import StateEncoder

DEFAULT_LANG_KEY = "lang_emb"
TOKENS_KEY = "lang_tokens"  # (L,) long instruction token ids, 0 = pad: the VLA encoder's language input


def is_image_shape(shape) -> bool:
    """True for an (H, W, 3) feature shape."""
    return len(shape) == 3 and int(shape[2]) == 3


def split_keys(shapes: dict[str, list[int]], lang_key: str = DEFAULT_LANG_KEY) -> tuple[list[str], list[str], str | None]:
    """(vector keys, image keys, language key or None) of an obs spec; ValueError for any other shape.

    The language key is ``lang_key`` (embeddings) or :data:`TOKENS_KEY` (token ids); at most one of them.
    """
    vector, image, lang = [], [], None
    for key in sorted(shapes):
        shape = list(shapes[key])
        if key in (lang_key, TOKENS_KEY):
            if len(shape) != 1:
                raise ValueError(f"language key {key!r} must have shape (E,) or (L,), got {shape}")
            if lang is not None:
                raise ValueError(f"obs keys {lang!r} and {key!r} are both language inputs; keep one")
            lang = key
        elif len(shape) == 1:
            vector.append(key)
        elif is_image_shape(shape):
            image.append(key)
        else:
            raise ValueError(f"obs key {key!r} has shape {shape}; expected a vector (D,) or an RGB image (H, W, 3)")
    return vector, image, lang


def _opt(cfg: Any, name: str, default: Any) -> Any:
    value = None if cfg is None else getattr(cfg, name, None)
    return default if value is None else value


def build_image_encoder(shapes: dict[str, list[int]], obs_horizon: int, dim: int, cfg: Any) -> nn.Module | None:
    """The ImageEncoder of the image keys in ``shapes`` with the EncoderConfig's settings (None: no image keys)."""
    if not shapes:
        return None
    from rtpolicy.policies.encoders.image import ImageEncoder, load_image_weights  # torchvision: image policies only

    encoder = ImageEncoder(
        shapes, obs_horizon, dim,
        backbone=_opt(cfg, "image_backbone", "resnet18"), shared=bool(_opt(cfg, "shared_backbone", True)),
        num_keypoints=int(_opt(cfg, "num_keypoints", 32)), crop_fraction=float(_opt(cfg, "crop_fraction", 0.9)),
        color_jitter=float(_opt(cfg, "color_jitter", 0.0)), frozen=bool(_opt(cfg, "freeze_image", False)),
    )
    if _opt(cfg, "image_weights", ""):
        load_image_weights(encoder, str(cfg.image_weights))
    return encoder


class TaskToken(nn.Embedding):
    """task_id (B,) long in [-1, num_tasks) -> (B, 1, D); -1 selects the learned null task (last row)."""

    def __init__(self, num_tasks: int, dim: int):
        super().__init__(num_tasks + 1, dim)

    def forward(self, task_id: torch.Tensor | None) -> torch.Tensor:
        if task_id is None:
            raise ValueError("multi-task policy needs obs['task_id'] (B,) long")
        task_id = task_id.long()
        null = self.num_embeddings - 1
        if task_id.max() >= null or task_id.min() < -1:
            raise ValueError(f"task_id must be in [-1, {null - 1}], got {task_id.tolist()}")
        return super().forward(torch.where(task_id < 0, null, task_id))[:, None]


class ObservationEncoder(nn.Module):
    """Normalized vector obs + raw image obs (+ language embedding, task id) -> tokens (B, N, D).

    obs[vector key]  (B, To, D_k) float, normalized
    obs[image key]   (B, To, H, W, 3) uint8 (or float 0-255)
    obs[lang_key]    (B, To, E) or (B, E) float (the newest step is used)
    task_id          (B,) long, only when ``num_tasks > 0``
    ->               (B, N, D), tokens in the order [state (To)] [images (C*To)] [task (1)] [language (1)] [slots (Q)]

    ``cfg``: an EncoderConfig (rtpolicy.config); None or missing fields take its defaults.
    """

    def __init__(self, shapes: dict[str, list[int]], obs_horizon: int, dim: int, num_tasks: int = 0, cfg: Any = None):
        super().__init__()
        self.lang_key = _opt(cfg, "lang_key", DEFAULT_LANG_KEY)
        vector, image, lang = split_keys(shapes, self.lang_key)
        self.lang_key = lang or self.lang_key  # lang_tokens when the policy reads token ids
        if not vector and not image:
            raise ValueError(f"the policy needs at least one vector or image obs key besides language; got {sorted(shapes)}")
        self.state = StateEncoder({k: shapes[k] for k in vector}, obs_horizon, dim) if vector else None
        self.images = build_image_encoder({k: shapes[k] for k in image}, obs_horizon, dim, cfg)
        self.task = TaskToken(num_tasks, dim) if num_tasks > 0 else None
        p_drop = float(_opt(cfg, "lang_dropout", 0.1))
        if lang == TOKENS_KEY:
            self.lang = WordsToken(vocab_size(_opt(cfg, "vla_backbone", "") or "minilm"), dim, p_drop)
        else:
            self.lang = LanguageToken(int(shapes[lang][0]), dim, p_drop, bool(_opt(cfg, "lang_norm", False))) if lang else None
        self.vector_keys, self.image_keys = vector, image
        self.slot_key = _opt(cfg, "slot_key", "")
        self.slots = None
        if self.slot_key:
            if self.slot_key not in vector:
                raise ValueError(f"policy.encoder.slot_key={self.slot_key!r} is not one of the vector obs keys {vector}")
            count, size = int(_opt(cfg, "slot_count", 0)), int(_opt(cfg, "slot_size", 0))
            self.slot_offset = slot_layout(self.slot_key, shapes[self.slot_key], count, size)
            self.slots = SlotAttention(count, size, dim, int(_opt(cfg, "slot_queries", 2)))
        self.n_tokens = (
            (obs_horizon if vector else 0) + (self.images.n_tokens if image else 0) + (num_tasks > 0) + (lang is not None)
            + (self.slots.queries if self.slots is not None else 0)
        )
        self.dim = dim

    def forward(self, obs: dict[str, torch.Tensor], task_id: torch.Tensor | None = None) -> torch.Tensor:
        tokens, ctx = [], []
        if self.state is not None:
            tokens.append(self.state({k: obs[k] for k in self.vector_keys}))
        if self.images is not None:
            tokens.append(self.images({k: obs[k] for k in self.image_keys}))
        if self.task is not None:
            ctx.append(self.task(task_id))
        if self.lang is not None:
            emb = obs.get(self.lang_key)
            if emb is None:
                raise ValueError(f"language-conditioned policy needs obs[{self.lang_key!r}] (B, E) or (B, To, E)")
            ctx.append(self.lang(emb[:, -1] if emb.ndim == 3 else emb))
        tokens += ctx
        if self.slots is not None:
            x = obs[self.slot_key][:, -1, self.slot_offset:]
            slots = x.reshape(x.shape[0], self.slots.count, self.slots.size)
            tokens.append(self.slots(slots, torch.cat(ctx, dim=1) if ctx else None))
        return torch.cat(tokens, dim=1)


def build_obs_encoder(shapes: dict[str, list[int]], obs_horizon: int, dim: int, num_tasks: int = 0, cfg: Any = None) -> nn.Module:
    """The encoder for an obs spec: VLAEncoder when ``cfg.vla_backbone`` is set, StateEncoder when it is
    vectors only (no language), else ObservationEncoder.

    All three have ``n_tokens``, ``dim`` and ``forward(obs, task_id) -> (B, n_tokens, dim)``.
    """
    if _opt(cfg, "vla_backbone", ""):
        from rtpolicy.policies.encoders.vla import VLAEncoder  # transformers: imported only for VLA policies

        return VLAEncoder(shapes, obs_horizon, dim, num_tasks, cfg)
    vector, image, lang = split_keys(shapes, _opt(cfg, "lang_key", DEFAULT_LANG_KEY))
    if not image and lang is None and not _opt(cfg, "slot_key", ""):
        return StateEncoder(shapes, obs_horizon, dim, num_tasks)
    return ObservationEncoder(shapes, obs_horizon, dim, num_tasks, cfg)
