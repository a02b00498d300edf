"""Training windows over replay-buffer episodes (the diffusion_policy convention).

For an episode of length L, windows of ``horizon`` steps start at s in
``range(-pad_before, L - horizon + pad_after + 1)``; steps outside the episode repeat its first or last
step (never a neighbouring episode's). With pad_before = To - 1 the first window's current step
(index To - 1) is the episode's first step; with pad_after = Ha - 1 the last windows keep Ha actions
(a head sets its own ``pad_after``: the streaming head's H - 1 makes every step a current step once).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from rtpolicy.datasets.replay_buffer import ReplayBuffer


def split_episodes(n_episodes: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, val), each (n_episodes,): round(n * val_fraction) validation episodes,
    at least one when val_fraction > 0 and n >= 2, and always at least one training episode."""
    if n_episodes < 1:
        raise ValueError(f"need at least one episode to split, got n_episodes={n_episodes}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(n_episodes * val_fraction)
    if val_fraction > 0 and n_episodes >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, n_episodes - 1)
    val = np.zeros(n_episodes, dtype=bool)
    val[np.random.default_rng(seed).choice(n_episodes, size=n_val, replace=False)] = True
    return ~val, val


class SequenceSampler:
    """Fixed-length windows over arrays {key: (N, *shape)} split by ``episode_ends`` (E,).

    Arrays are numpy arrays in memory or anything sliceable along steps (e.g. a zarr array, read
    lazily: a window reads one contiguous row range, so only the chunks holding its steps are decoded).
    ``key_horizon`` limits a key to the first k steps of each window (e.g. observations: To).
    """

    def __init__(
        self,
        data: dict[str, np.ndarray],
        episode_ends: np.ndarray,
        horizon: int,
        pad_before: int = 0,
        pad_after: int = 0,
        episode_mask: np.ndarray | None = None,
        key_horizon: dict[str, int] | None = None,
    ):
        ends = np.asarray(episode_ends, dtype=np.int64)
        if ends.ndim != 1 or (ends.size and (ends[0] <= 0 or np.any(np.diff(ends) <= 0))):
            raise ValueError(f"episode_ends must be 1-D, positive and strictly increasing, got {ends}")
        if horizon < 1 or pad_before < 0 or pad_after < 0:
            raise ValueError(f"need horizon >= 1 and pads >= 0, got horizon={horizon} pad_before={pad_before} pad_after={pad_after}")
        n_steps = int(ends[-1]) if ends.size else 0
        for key, x in data.items():
            if x.shape[0] < n_steps:
                raise ValueError(f"data[{key!r}] has {x.shape[0]} rows but episode_ends ends at {n_steps}")
        self.key_horizon = dict(key_horizon or {})
        for key, h in self.key_horizon.items():
            if key not in data or not 1 <= h <= horizon:
                raise ValueError(f"key_horizon[{key!r}]={h}: key must be in data {sorted(data)} and 1 <= h <= horizon={horizon}")
        mask = np.ones(len(ends), dtype=bool) if episode_mask is None else np.asarray(episode_mask, dtype=bool)
        if mask.shape != ends.shape:
            raise ValueError(f"episode_mask has shape {mask.shape}, expected ({len(ends)},) (one entry per episode)")
        self.data, self.horizon = data, horizon
        self._begins = np.concatenate([[0], ends[:-1]])
        self._lengths = ends - self._begins
        sel = np.flatnonzero(mask)
        counts = np.maximum(self._lengths[sel] - horizon + pad_before + pad_after + 1, 0)
        self._episode = np.repeat(sel, counts)  # per window: its episode and its start relative to the episode
        self._start = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) - pad_before

    def __len__(self) -> int:
        return len(self._episode)

    def sample(self, idx: int, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Window ``idx``: {key: (key_horizon.get(key, horizon), *shape)}, edge-padded within its episode,
        for every key (or only ``keys``)."""
        if not -len(self) <= idx < len(self):
            raise IndexError(f"window {idx} out of range for {len(self)} windows")
        ep, s = self._episode[idx], self._start[idx]
        begin, length = self._begins[ep], self._lengths[ep]
        out = {}
        for key in self.data if keys is None else keys:
            x = self.data[key]
            steps = np.arange(s, s + self.key_horizon.get(key, self.horizon))
            rows = begin + np.clip(steps, 0, length - 1)
            if isinstance(x, np.ndarray):
                out[key] = x[rows]
            else:  # lazy store: read the covered rows once, then pick (edge padding repeats rows)
                lo = int(rows[0])
                out[key] = np.asarray(x[lo : int(rows[-1]) + 1])[rows - lo]
        return out


def is_image_key(buffer: ReplayBuffer, key: str) -> bool:
    """True when ``key`` holds uint8 RGB frames, feature shape (H, W, 3)."""
    shape = buffer.shape(key)
    return len(shape) == 3 and shape[2] == 3 and buffer[key].dtype == np.uint8


def _obs_tensor(x: np.ndarray, image: bool) -> torch.Tensor:
    """Frames stay uint8, integer keys (e.g. lang_tokens ids) become long, the rest float32."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t if image else t.long() if x.dtype.kind in "iu" else t.float()


class SequenceDataset(Dataset):
    """Training windows from a replay buffer.

    Item: {"obs": {key: float32 (To, *shape), or long for integer keys such as lang_tokens},
    "action": float32 (H, Da)} plus, if the store has a
    per-step ``task_id`` key, "task_id": long scalar taken at the window's current step (index To - 1).
    Image keys (feature shape (H, W, 3)) stay uint8 (To, H, W, 3) and are read from the store per item
    (only the chunks holding the window's frames are decoded); every other key is loaded into memory.
    Obs steps are t-To+1 .. t and action steps t-To+1 .. t-To+H, the window every policy head reads.
    ``arrays``: in-memory per-step arrays (n_steps, ...) served in place of stored obs keys, e.g. the
    cached keypoints of a frozen image encoder (computed by the training loop).
    ``pad_after``: action steps a window may repeat past its episode's end; None is Ha - 1 (the head's
    ``pad_after``; the streaming head's is H - 1).
    """

    def __init__(
        self,
        buffer: ReplayBuffer,
        obs_keys: list[str],
        action_key: str,
        obs_horizon: int,
        horizon: int,
        action_horizon: int,
        episode_mask: np.ndarray | None = None,
        arrays: dict[str, np.ndarray] | None = None,
        pad_after: int | None = None,
    ):
        if obs_horizon < 1 or horizon < obs_horizon:
            raise ValueError(f"need 1 <= obs_horizon <= horizon, got obs_horizon={obs_horizon} horizon={horizon}")
        if not 1 <= action_horizon <= horizon - obs_horizon + 1:
            raise ValueError(
                f"action_horizon must be in [1, horizon - obs_horizon + 1] = [1, {horizon - obs_horizon + 1}], got {action_horizon}"
            )
        if not obs_keys:
            raise ValueError("obs_keys is empty; need at least one observation key")
        missing = [k for k in [*obs_keys, action_key] if k not in buffer.keys]
        if missing:
            raise ValueError(f"keys {missing} are not in the replay buffer; available keys: {buffer.keys}")
        if len(buffer.shape(action_key)) != 1:
            raise ValueError(f"action key {action_key!r} has feature shape {buffer.shape(action_key)}, expected (Da,)")
        self.has_task = "task_id" in buffer.keys
        if self.has_task and (buffer.shape("task_id") not in ((), (1,)) or buffer["task_id"].dtype.kind not in "iu"):
            raise ValueError(f"task_id must be one integer per step, got shape {buffer.shape('task_id')} dtype {buffer['task_id'].dtype}")
        keys = list(dict.fromkeys([*obs_keys, action_key] + ["task_id"] * self.has_task))
        self.obs_keys, self.action_key, self.obs_horizon = list(obs_keys), action_key, obs_horizon
        arrays = dict(arrays or {})
        for key, arr in arrays.items():
            if key not in obs_keys or len(arr) != buffer.n_steps:
                raise ValueError(f"arrays[{key!r}] must stand in for an obs key with one row per stored step "
                                 f"({buffer.n_steps}); got {len(arr)} rows for obs keys {obs_keys}")
        self.image_keys = [k for k in obs_keys if k not in arrays and is_image_key(buffer, k)]
        key_horizon = {k: obs_horizon for k in keys if k != action_key}
        data = (buffer.load([k for k in keys if k not in self.image_keys and k not in arrays])
                | {k: buffer[k] for k in self.image_keys} | arrays)
        self.sampler = SequenceSampler(
            data, buffer.episode_ends, horizon, pad_before=obs_horizon - 1,
            pad_after=action_horizon - 1 if pad_after is None else pad_after,
            episode_mask=episode_mask, key_horizon=key_horizon,
        )
        if len(self.sampler) == 0:
            mask = np.ones(buffer.n_episodes, bool) if episode_mask is None else np.asarray(episode_mask, bool)
            raise ValueError(
                f"no training windows: {int(mask.sum())} selected episodes, the longest "
                f"{int(buffer.episode_lengths[mask].max(initial=0))} steps, for horizon={horizon}, "
                f"obs_horizon={obs_horizon}, action_horizon={action_horizon}"
            )

    def __len__(self) -> int:
        return len(self.sampler)

    def action_windows(self) -> torch.Tensor:
        """Every window's actions (N, H, Da) float32, in item order, without reading any observation
        (e.g. camera frames): the windows a head's ``prepare`` fits."""
        key = self.action_key
        return torch.from_numpy(np.stack([self.sampler.sample(i, [key])[key] for i in range(len(self))])).float()

    def __getitem__(self, idx: int) -> dict:
        w = self.sampler.sample(idx)
        To = self.obs_horizon
        item = {
            "obs": {k: _obs_tensor(w[k][:To], k in self.image_keys) for k in self.obs_keys},
            "action": torch.from_numpy(w[self.action_key]).float(),
        }
        if self.has_task:
            item["task_id"] = torch.tensor(int(w["task_id"][To - 1].reshape(-1)[0]), dtype=torch.long)
        return item
