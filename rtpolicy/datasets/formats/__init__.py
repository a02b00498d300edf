"""Bring your own demonstrations: zarr, LeRobot v3, robomimic HDF5 and ROS 2 bags, read and written.

    fmt = detect_format(path)                       # "zarr" | "lerobot" | "robomimic" | "rosbag"
    source = read_dataset(path, keys={"state": "observation.state"})  # EpisodeSource under our key names
    write_dataset(source, "out.hdf5")               # format from the suffix (or fmt=...), atomic, never clobbers
    buffer = open_dataset(task_cfg)                 # what training reads: a ReplayBuffer

Training reads every format through a zarr replay buffer: a zarr store opens as it is; any other format is
converted once into ``task.dataset_cache`` (a zarr store named by the source's path, file sizes and mtimes,
key map and options, so an edited source or another key map makes a new one) and read from there. LeRobot
videos are thus decoded once, sequentially, rather than seeked into for every training window.
Each format is one module registered in ``FORMATS``; a new one is a module plus an import line below.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rtpolicy.datasets.formats.base import (
    FORMATS,
    EpisodeSource,
    Format,
    FormatError,
    atomic_path,
)

# one import per format module: each registers itself in FORMATS
from rtpolicy.datasets.formats import zarr_store, lerobot, robomimic, rosbag  # noqa: F401  isort: skip

CACHE_VERSION = 1


def detect_format(path: str | Path) -> str:
    """The registered format of an existing ``path``; raises FormatError naming the path when none matches."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no dataset at {p}")
    for name, entry in FORMATS.items():
        if entry.cls().detect(p):
            return name
    raise FormatError(f"{p}: cannot tell its format (not a zarr store, a LeRobot v3 folder with meta/info.json, an HDF5 "
                      f"file or a rosbag2 bag); name it with task.dataset_format / --from ({', '.join(FORMATS.names())})")


def format_for_new_path(path: str | Path) -> str:
    """The format a destination path names by its ending (e.g. ``.zarr``, ``.hdf5``); LeRobot for anything else."""
    name = Path(path).name.lower()
    for fmt, entry in FORMATS.items():
        if any(name.endswith(s) for s in entry.cls.suffixes):
            return fmt
    return "lerobot"


def get_format(name: str) -> Format:
    try:
        return FORMATS.build(name)
    except KeyError as e:
        raise FormatError(str(e.args[0])) from None


def read_dataset(path: str | Path, fmt: str | None = None, keys: Mapping[str, Any] | None = None, **options: Any) -> EpisodeSource:
    """Episodes of the dataset at ``path`` under our key names (see ``base`` for ``keys``)."""
    p = Path(path)
    fmt = fmt or detect_format(p)
    if not p.exists():
        raise FileNotFoundError(f"no dataset at {p}")
    return get_format(fmt).read(p, dict(keys or {}), **options)


def write_dataset(source: EpisodeSource, path: str | Path, fmt: str | None = None, overwrite: bool = False, **options: Any) -> str:
    """Write ``source`` to the new ``path`` in ``fmt`` (default: from the path's ending); returns the format."""
    fmt = fmt or format_for_new_path(path)
    get_format(fmt).write(source, Path(path), overwrite=overwrite, **options)
    return fmt


def convert(src: str | Path, dst: str | Path, src_format: str | None = None, dst_format: str | None = None,
            keys: Mapping[str, Any] | None = None, overwrite: bool = False, read_options: Mapping[str, Any] | None = None,
            write_options: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """SRC -> DST between any two registered formats; returns (src format, dst format)."""
    src_p, dst_p = Path(src), Path(dst)
    if src_p.resolve() == dst_p.resolve():
        raise FormatError(f"{src_p}: source and destination are the same path")
    src_format = src_format or detect_format(src_p)
    source = read_dataset(src_p, src_format, keys, **dict(read_options or {}))
    dst_format = write_dataset(source, dst_p, dst_format, overwrite=overwrite, **dict(write_options or {}))
    return src_format, dst_format


def cache_path(path: Path, fmt: str, keys: Mapping[str, Any], options: Mapping[str, Any], cache_dir: str | Path) -> Path:
    """Where the zarr copy of a non-zarr dataset lives: named by the source's contents, key map and options."""
    fingerprint = get_format(fmt).fingerprint(path)
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, fmt, str(path.resolve()), fingerprint, dict(keys), dict(options)],
                                       sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{path.name}-{fmt}-{digest}.zarr"


def open_dataset(task_cfg: Any):
    """The replay buffer training reads for ``task_cfg.dataset`` (an existing path) in any format.

    Uses ``task_cfg.dataset_format`` ("" = detect), ``dataset_keys`` (our key -> source key or list of keys),
    ``dataset_options`` (reader options, e.g. a bag's sources and rate) and ``dataset_cache`` (folder of
    converted stores). A zarr store with no key map opens directly.
    """
    from omegaconf import DictConfig, ListConfig, OmegaConf

    from rtpolicy.datasets.replay_buffer import ReplayBuffer

    def plain(v, name: str) -> dict:
        v = OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v
        if v is not None and not isinstance(v, Mapping):
            raise FormatError(f"task.{name} must be a mapping, got {v!r:.200}")
        return dict(v or {})

    path = Path(task_cfg.dataset)
    fmt = str(getattr(task_cfg, "dataset_format", "") or "") or detect_format(path)
    keys = plain(getattr(task_cfg, "dataset_keys", None), "dataset_keys")
    options = plain(getattr(task_cfg, "dataset_options", None), "dataset_options")
    if fmt == "zarr" and not keys:
        return ReplayBuffer.open(path)
    cache = cache_path(path, fmt, keys, options, getattr(task_cfg, "dataset_cache", "") or "data/cache")
    if not cache.exists():
        print(f"[rtpolicy] reading {fmt} dataset {path} into {cache} (once; later runs reuse it)")
        source = read_dataset(path, fmt, keys, **options)
        try:
            get_format("zarr").write(source, cache)
        except (FileExistsError, OSError):
            if not cache.exists():  # else another run wrote the same cache meanwhile
                raise
    return ReplayBuffer.open(cache)


__all__ = ["FORMATS", "EpisodeSource", "Format", "FormatError", "atomic_path", "cache_path", "convert", "detect_format",
           "format_for_new_path", "get_format", "open_dataset", "read_dataset", "write_dataset"]
