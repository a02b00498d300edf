"""The policy's observation processor: raw observations -> the features its network reads.

Envs, stores and the robot's topics carry raw observations (state vectors, camera frames, the
instruction as text or as an index into the env's instruction list). What a policy's network reads
beyond that is made here, by one object built from the policy config, saved in the checkpoint
(``meta["processor"]``) and the deploy bundle (``bundle["processor"]``), and called by training, the
evaluation rollouts and the ROS node alike:

    obs["instruction_id"] (B,) or (B, To) long, an index into ``instructions``
        -> obs[lang key] (B, To, E) float32 sentence embedding (``lang_emb``, MiniLM)
           or (B, To, L) long token ids (``lang_tokens``, the VLA backbone's tokenizer)
    instruction text (the node's instruction topic) -> (E,) / (L,) via :meth:`ObservationProcessor.instruction`

Every instruction is featurized alone (a batch of one) and memoized per text, so the features of a text
are the same bits whichever path asks first. Normalization stays the first layer of the policy (its
stats live in the weights and the exported graphs); a frozen image encoder's keypoints are cached by
training (``rtpolicy.training.cached_keypoints``) from the same encoder the policy runs.

Orientations: ``rotations`` {vector key: [start, ...]} names the quaternions (x, y, z, w) inside a vector
observation (an env family declares them, :func:`rtpolicy.envs.env_rotations`). A quaternion and its
negation are one rotation, and simulators pick the sign freely: robosuite's ``*_to_robot0_eef_quat``
flips sign several times per episode, a jump across the whole fitted range of an input. The policy's
input layer (inside the network and its exported graphs) replaces each by the first two columns of its
rotation matrix, which are continuous and the same for q and -q, normalized like any other input (their
own normalizer key, :func:`rotation_key`):

    raw (..., D) -> normalized (..., D) with each quaternion's 4 dims replaced by its 6 -> (..., D + 2 * len(starts))

The raw observation keeps its shape, so stores, envs, the bundle's observation spec and the node's range
checks are unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

INSTRUCTION_KEY = "instruction_id"
LANG_KEYS = ("lang_emb", "lang_tokens")


@functools.lru_cache(maxsize=None)
def _featurize(kind: str, model: str, length: int, text: str) -> np.ndarray:
    """One instruction text -> (E,) float32 embedding or (L,) int64 token ids (memoized per process)."""
    if kind == "sentence_embedding":
        from rtpolicy.policies.encoders.language import instruction_cache

        return instruction_cache()([text])[0].float().numpy()
    if kind == "token_ids":
        from rtpolicy.policies.encoders.vla import tokenize_instructions

        return tokenize_instructions([text], model, length)[0].numpy().astype(np.int64)
    raise ValueError(f"unknown language input kind {kind!r}; expected sentence_embedding or token_ids")


class ObservationProcessor:
    """Raw observation dict -> the policy network's input dict (see the module docstring).

    Args:
        language: None (the policy reads no instruction) or {"key": "lang_emb", "kind": "sentence_embedding",
            "model": "minilm"} / {"key": "lang_tokens", "kind": "token_ids", "model": <backbone>, "length": L}.
        instructions: the texts ``obs["instruction_id"]`` indexes (the env family's instruction list).
        rotations: {vector key: [start, ...]}: the quaternions (x, y, z, w) at ``[start, start + 4)`` that the
            network reads as rotation-matrix columns (:meth:`rotate`); {} / None: none.
    """

    def __init__(self, language: Mapping[str, Any] | None = None, instructions: Sequence[str] = (),
                 rotations: Mapping[str, Sequence[int]] | None = None):
        self.language = dict(language) if language else None
        self.instructions = [str(t) for t in instructions]
        if self.language is not None and self.language.get("key") not in LANG_KEYS:
            raise ValueError(f"processor language key must be one of {LANG_KEYS}, got {self.language.get('key')!r}")
        self.rotations: dict[str, list[int]] = {}
        for key, starts in (rotations or {}).items():
            starts = [int(i) for i in starts]
            if starts != sorted(starts) or any(b - a < 4 for a, b in zip(starts, starts[1:])) or (starts and starts[0] < 0):
                raise ValueError(f"processor rotations[{key!r}] must be increasing quaternion starts >= 0, 4 apart; got {starts}")
            if starts:
                self.rotations[str(key)] = starts

    def __deepcopy__(self, memo):  # immutable: an EMA copy of the policy shares it
        return self

    # -- building and saving ------------------------------------------------------------------------
    @classmethod
    def for_policy(cls, policy_cfg: Any, obs_keys: Sequence[str], instructions: Sequence[str] = (),
                   rotations: Mapping[str, Sequence[int]] | None = None) -> ObservationProcessor:
        """The processor of a policy config reading ``obs_keys``: a language step when they name ``lang_emb``
        (MiniLM) or ``lang_tokens`` (the ``encoder.vla_backbone`` tokenizer, ``encoder.lang_tokens_len`` ids);
        the env's ``rotations`` of the keys it reads."""
        enc = _get(policy_cfg, "encoder") or {}
        rotations = {k: v for k, v in (rotations or {}).items() if k in obs_keys}
        if "lang_tokens" in obs_keys:
            language = {"key": "lang_tokens", "kind": "token_ids", "model": str(_get(enc, "vla_backbone") or "minilm"),
                        "length": int(_get(enc, "lang_tokens_len") or 16)}
        elif "lang_emb" in obs_keys:
            language = {"key": "lang_emb", "kind": "sentence_embedding", "model": "minilm"}
        else:
            return cls(rotations=rotations)
        if not instructions:
            raise ValueError(f"obs key {language['key']!r} needs the env's instruction list (obs['instruction_id'] indexes "
                             "it); this env family has none")
        return cls(language, instructions, rotations)

    def config(self) -> dict[str, Any]:
        """JSON-able; :meth:`from_config` rebuilds the same processor (``rotations`` only when there are any)."""
        cfg: dict[str, Any] = {"language": self.language, "instructions": list(self.instructions)}
        return cfg | ({"rotations": dict(self.rotations)} if self.rotations else {})

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> ObservationProcessor:
        cfg = cfg or {}
        return cls(cfg.get("language"), cfg.get("instructions") or (), cfg.get("rotations"))

    # -- keys and shapes ---------------------------------------------------------------------------
    @property
    def lang_key(self) -> str | None:
        return self.language["key"] if self.language else None

    def raw_keys(self, obs_keys: Sequence[str]) -> list[str]:
        """The keys a store or env must provide for a policy reading ``obs_keys``."""
        return list(dict.fromkeys(INSTRUCTION_KEY if k == self.lang_key else k for k in obs_keys))

    def output_shapes(self) -> dict[str, list[int]]:
        """{key: shape} of what this processor adds (the language feature); {} without one."""
        if not self.language:
            return {}
        return {self.lang_key: list(self.instruction(self.instructions[0]).shape)}

    def feature_shapes(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
        """{key: raw shape} -> {key: the shape the network's encoder reads}: 2 more dims per rotation."""
        out = {k: list(v) for k, v in shapes.items()}
        for key, starts in self.rotations.items():
            if key in out:
                if len(out[key]) != 1 or starts[-1] + 4 > out[key][0]:
                    raise ValueError(f"processor rotations[{key!r}] = {starts} do not fit obs {key!r} of shape {out[key]}")
                out[key] = [out[key][0] + 2 * len(starts)]
        return out

    def rotation_features(self, key: str, raw: torch.Tensor) -> torch.Tensor:
        """raw (..., D) -> (..., 6 n): the rotation-matrix columns of the key's n quaternions (x, y, z, w), in order.
        The policy normalizes them as their own normalizer key :func:`rotation_key` (fitted by training)."""
        return torch.cat([quat_to_rot6d(raw[..., s : s + 4]) for s in self.rotations[key]], dim=-1)

    def rotate(self, key: str, normalized: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        """normalized (..., D) and the key's normalized :meth:`rotation_features` (..., 6 n) -> (..., D + 2 n): each
        quaternion's 4 dims replaced by its 6 rotation features."""
        parts, i = [], 0
        for j, s in enumerate(self.rotations[key]):
            parts += [normalized[..., i:s], rotations[..., 6 * j : 6 * j + 6]]
            i = s + 4
        parts.append(normalized[..., i:])
        return torch.cat(parts, dim=-1)

    # -- featurizing -------------------------------------------------------------------------------
    def instruction(self, text: str) -> np.ndarray:
        """An instruction text -> the policy's language input (E,) float32 or (L,) int64."""
        if not self.language:
            raise ValueError("this policy is not language-conditioned: it takes no instruction")
        lang = self.language
        return _featurize(lang["kind"], str(lang.get("model", "minilm")), int(lang.get("length", 0)), str(text))

    @functools.cached_property
    def _table(self) -> torch.Tensor:
        """(len(instructions), *feature shape): each instruction's features, rows in instruction order."""
        return torch.from_numpy(np.stack([self.instruction(t) for t in self.instructions]))

    def __call__(self, obs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """obs with ``instruction_id`` (B,) or (B, To) long -> obs with the language key (B, To, *feature) on the
        ids' device, ``instruction_id`` dropped; obs unchanged (a new dict) for a policy without language."""
        out = dict(obs)
        if not self.language:
            return out
        if INSTRUCTION_KEY not in out:
            if self.lang_key in out:  # already featurized (e.g. a node sample)
                return out
            raise KeyError(f"language-conditioned policy: the observation has no {INSTRUCTION_KEY!r} (nor {self.lang_key!r})")
        ids = torch.as_tensor(out.pop(INSTRUCTION_KEY)).long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self.instructions)):
            raise ValueError(f"{INSTRUCTION_KEY} out of range [0, {len(self.instructions)}): {ids.unique().tolist()[:8]}")
        out[self.lang_key] = self._table[ids.cpu()].to(ids.device)
        return out


def rotation_key(key: str) -> str:
    """The normalizer key of obs ``key``'s rotation features (:meth:`ObservationProcessor.rotation_features`)."""
    return f"{key}:rotations"


def quat_to_rot6d(q: torch.Tensor) -> torch.Tensor:
    """Quaternions (..., 4) (x, y, z, w), unit -> (..., 6) the first two columns of their rotation matrices
    (column-major: R00, R10, R20, R01, R11, R21). Quadratic in q, so q and -q give the same features. An
    all-zero q (robosuite's relative quaternions before its first step) gives the identity's columns."""
    x, y, z, w = q.unbind(-1)
    return torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y + z * w), 2 * (x * z - y * w),
                        2 * (x * y - z * w), 1 - 2 * (x * x + z * z), 2 * (y * z + x * w)], dim=-1)


def _get(cfg: Any, key: str) -> Any:
    if cfg is None:
        return None
    if isinstance(cfg, Mapping):
        return cfg.get(key)
    return getattr(cfg, key, None)
