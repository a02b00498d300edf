"""Our own layout: a zarr replay buffer (diffusion_policy's ``data/<key>`` + ``meta/episode_ends``).

Native keys are ours already; ``keys`` may still rename or concatenate them. ``attrs["fps"]``, when a
writer recorded one, is the control rate.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rtpolicy.datasets.formats.base import (
    DEFAULT_FPS,
    FORMATS,
    EpisodeSource,
    Format,
    FormatError,
    atomic_path,
    check_episode,
    concat_features,
    jsonable,
    map_keys,
)
from rtpolicy.datasets.replay_buffer import ReplayBuffer, ReplayBufferError


@FORMATS.register("zarr")
class ZarrFormat(Format):
    name = "zarr"
    suffixes = (".zarr",)

    def detect(self, path: Path) -> bool:
        return path.is_dir() and ((path / "zarr.json").exists() or (path / ".zgroup").exists())

    def read(self, path: Path, keys: Mapping[str, Any] | None = None, **options: Any) -> EpisodeSource:
        try:
            buf = ReplayBuffer.open(path)
        except ReplayBufferError as e:
            raise FormatError(str(e)) from e
        where = str(path)
        mapping = map_keys(buf.keys, lambda k: k, keys, where)
        shapes = {}
        for ours, srcs in mapping.items():
            if len(srcs) == 1:
                shapes[ours] = (buf.shape(srcs[0]), buf[srcs[0]].dtype)
            else:
                dt = np.result_type(*[buf[s].dtype for s in srcs])
                shapes[ours] = ((sum(int(np.prod(buf.shape(s))) for s in srcs),), dt)

        def episodes():
            ends = buf.episode_ends
            for i in range(buf.n_episodes):
                start, stop = (int(ends[i - 1]) if i else 0), int(ends[i])
                native = {s: np.asarray(buf[s][start:stop]) for srcs in mapping.values() for s in srcs}
                ep = {ours: concat_features([native[s] for s in srcs], where, ours) for ours, srcs in mapping.items()}
                check_episode(ep, where, i)
                yield ep

        attrs = dict(buf.attrs)
        return EpisodeSource(shapes, episodes, where, buf.episode_lengths, attrs, float(attrs.get("fps", DEFAULT_FPS)))

    def write(self, source: EpisodeSource, path: Path, overwrite: bool = False, **options: Any) -> None:
        with atomic_path(path, overwrite) as tmp:
            buf = ReplayBuffer.create(tmp)
            buf.attrs.update(jsonable(source.attrs) | {"fps": source.fps})
            for i, ep in enumerate(source.checked_episodes()):
                try:
                    buf.add_episode(ep)
                except ReplayBufferError as e:
                    raise FormatError(f"{source.where}: episode {i}: {e}") from e
            if not buf.n_episodes:
                raise FormatError(f"{source.where}: no episodes to write")

