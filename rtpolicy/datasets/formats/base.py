"""What every demonstration format implements: read episodes under our key names, write them atomically.

Data flow (one episode at a time, so a store never has to fit in memory):

    SRC ──Format.read(path, keys)──► EpisodeSource: attrs, fps, keys, episodes() ─► {our key: (L, *shape)} per episode
                                                                                       │
    DST ◄──Format.write(source, path)── tmp folder/file beside DST, renamed onto DST at the end

Key names: a reader gives each of its native keys one of ours by its format's default rule (e.g. LeRobot
``observation.images.top`` -> ``rgb_top``, robomimic ``obs/agentview_image`` -> ``rgb_agentview``);
``keys`` (``task.dataset_keys``) maps our key -> a native key, or a list of native keys concatenated along
the feature axis, and overrides the defaults (a native key named there is not imported a second time).
A writer maps our keys back with the inverse rule, so zarr -> format -> zarr gives the same keys.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rtpolicy.errors import UserError
from rtpolicy.registry import Registry

DEFAULT_FPS = 10.0  # Meta-World's control rate with frame_skip 5 at 500 Hz is 80 Hz; the demo stores carry no rate


class FormatError(UserError):
    """A source that does not read as its format (names the file, the key and the episode), or a bad key map:
    CLIs print it as one line and exit 2 (``rtpolicy.errors``)."""


@dataclass
class EpisodeSource:
    """Episodes under our key names, read lazily.

    ``keys``: our key -> (feature shape, dtype) of every key each episode holds;
    ``episodes()``: yields one {key: (L, *shape)} per episode, in order;
    ``lengths``: (E,) episode lengths when known before reading (None otherwise);
    ``attrs``: JSON-able metadata carried between formats (env name, tasks, ...); ``fps``: control rate in Hz.
    """

    keys: dict[str, tuple[tuple[int, ...], np.dtype]]
    episodes: Callable[[], Iterator[dict[str, np.ndarray]]]
    where: str
    lengths: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    fps: float = DEFAULT_FPS

    @property
    def n_episodes(self) -> int | None:
        return None if self.lengths is None else len(self.lengths)

    def checked_episodes(self) -> Iterator[dict[str, np.ndarray]]:
        """``episodes()``, each checked against ``keys``: the same keys, feature shapes and dtypes (a dtype of the
        same kind is cast, e.g. one demo stored in float32 among float64 ones), equal lengths, finite values."""
        for i, ep in enumerate(self.episodes()):
            if set(ep) != set(self.keys):
                raise FormatError(f"{self.where}: episode {i} holds keys {sorted(ep)}, the dataset {sorted(self.keys)}")
            for k, (shape, dtype) in self.keys.items():
                x = ep[k]
                if tuple(x.shape[1:]) != tuple(shape):
                    raise FormatError(f"{self.where}: episode {i}: key {k!r} has feature shape {tuple(x.shape[1:])}, "
                                      f"episode 0 has {tuple(shape)}")
                if x.dtype != dtype:
                    if not np.can_cast(x.dtype, dtype, casting="same_kind"):
                        raise FormatError(f"{self.where}: episode {i}: key {k!r} is {x.dtype}, episode 0 is {np.dtype(dtype)}")
                    ep[k] = x.astype(dtype)
            check_episode(ep, self.where, i)
            yield ep

    def image_keys(self) -> list[str]:
        """Keys of uint8 (H, W, 3) frames."""
        return [k for k, (shape, dtype) in self.keys.items() if len(shape) == 3 and shape[2] == 3 and np.dtype(dtype) == np.uint8]


class Format:
    """One on-disk layout. Subclasses register with ``@FORMATS.register(name)`` and implement the four methods."""

    name: str = ""
    suffixes: tuple[str, ...] = ()  # file/folder name endings that name this format for a path that does not exist yet

    def detect(self, path: Path) -> bool:
        """True when the existing ``path`` is in this format (cheap: looks at names and headers only)."""
        raise NotImplementedError

    def read(self, path: Path, keys: Mapping[str, Any] | None = None, **options: Any) -> EpisodeSource:
        raise NotImplementedError

    def write(self, source: EpisodeSource, path: Path, **options: Any) -> None:
        """Write every episode of ``source`` to the new ``path`` (atomic: see :func:`atomic_path`)."""
        raise FormatError(f"{path}: rtpolicy reads {self.name} but does not write it")

    @classmethod
    def writable(cls) -> bool:
        return cls.write is not Format.write

    def fingerprint(self, path: Path) -> list:
        """What identifies the contents of ``path`` for a cache: (relative name, size, mtime) of its files."""
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        return [(str(p.relative_to(path)) if p != path else p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


FORMATS: Registry[Format] = Registry("dataset format")


# ---------------------------------------------------------------------------------------------------- key maps
def map_keys(native: Sequence[str], default: Callable[[str], str | None], keys: Mapping[str, Any] | None, where: str
             ) -> dict[str, list[str]]:
    """Our key -> the native keys it is made of (one, or several concatenated), from the default rule plus ``keys``.

    ``default(native)`` gives our name for a native key, or None to skip it (bookkeeping columns).
    """
    explicit: dict[str, list[str]] = {}
    for ours, src in (keys or {}).items():
        srcs = [src] if isinstance(src, str) else list(src) if isinstance(src, Sequence) else None
        if not srcs or not all(isinstance(s, str) for s in srcs):
            raise FormatError(f"{where}: dataset_keys[{ours!r}] must name a source key or a list of them, got {src!r}")
        if missing := [s for s in srcs if s not in native]:
            raise FormatError(f"{where}: dataset_keys[{ours!r}] names {missing}, which the dataset does not hold; "
                              f"its keys: {sorted(native)}")
        explicit[str(ours)] = srcs
    used = {s for srcs in explicit.values() for s in srcs}
    out: dict[str, list[str]] = {}
    for n in native:
        ours = default(n)
        if n in used or ours is None or ours in explicit:
            continue
        if ours in out:
            raise FormatError(f"{where}: source keys {out[ours][0]!r} and {n!r} both map to {ours!r}; "
                              f"name one of them in task.dataset_keys")
        out[ours] = [n]
    return out | explicit


def check_episode(ep: Mapping[str, np.ndarray], where: str, index: int) -> int:
    """The episode's length; raises naming the file, key and episode on unequal lengths or NaN/Inf."""
    lengths = {k: len(v) for k, v in ep.items()}
    if len(set(lengths.values())) != 1:
        raise FormatError(f"{where}: episode {index}: keys have different lengths {lengths}")
    for k, v in ep.items():
        if v.dtype.kind in "fc" and not np.isfinite(v).all():
            row = int(np.argwhere(~np.isfinite(v.reshape(len(v), -1)))[0][0])
            raise FormatError(f"{where}: episode {index}: key {k!r} has a non-finite value (NaN or inf) at step {row}")
    return next(iter(lengths.values()))


def concat_features(parts: list[np.ndarray], where: str, ours: str) -> np.ndarray:
    """Several native keys -> one of ours: (L, d1) + (L, d2) -> (L, d1 + d2); scalars per step count as (L, 1)."""
    if len(parts) == 1:
        return parts[0]
    parts = [p.reshape(len(p), -1) for p in parts]
    if len({p.dtype for p in parts}) > 1:
        parts = [p.astype(np.result_type(*parts)) for p in parts]
    return np.concatenate(parts, axis=1)


# ---------------------------------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(dst: Path, overwrite: bool = False) -> Iterator[Path]:
    """A fresh temporary path beside ``dst`` to write into; renamed onto ``dst`` when the block succeeds,
    removed when it raises. An existing ``dst`` is refused unless ``overwrite`` (then replaced at the end).
    Temporary paths of killed writers (their pid is gone) are removed first."""
    dst = Path(dst)
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite (overwrite=True) to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    for stale in dst.parent.glob(f".{dst.name}.tmp-*"):  # left by a writer that was killed
        pid = stale.name[len(f".{dst.name}.tmp-"):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(stale)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if dst.exists() or dst.is_symlink():
            old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            _remove(old)
        else:
            os.replace(tmp, dst)
    except BaseException:
        _remove(tmp)
        raise


def jsonable(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``attrs`` that JSON can hold (metadata carried between formats)."""
    import json

    out = {}
    for k, v in attrs.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        out[str(k)] = v
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()
