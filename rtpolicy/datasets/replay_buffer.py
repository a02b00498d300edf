"""A zarr replay buffer in the diffusion_policy layout, readable from stores written by other tools.

Layout (zarr format 2 or 3):
    data/<key>          (N, *shape)  one array per key, all episodes concatenated along axis 0 (steps)
    meta/episode_ends   (E,)         int64 cumulative ends: episode i is rows [ends[i-1], ends[i])
    root attributes                  JSON-able metadata (env name, obs spec, ...), see ``ReplayBuffer.attrs``

Crash consistency: ``add_episode`` writes the data arrays first and ``meta/episode_ends`` last, so a
writer killed mid-append leaves the store at its last complete episode. Rows past ``episode_ends[-1]``
(the leftovers of such an append) are ignored on open, with a warning, and overwritten by the next append.
A trailing ``episode_ends`` entry holding the fill value (a killed resize-then-write) is ignored the same way.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from rtpolicy.errors import UserError

_ENDS_CHUNK = 10_000
_CHUNK_BYTES = 4 << 20  # default time chunk: ~4 MiB, at most _MAX_CHUNK_STEPS steps
_MAX_CHUNK_STEPS = 1000
# image arrays (steps, H, W, C): a few frames per chunk, so a training window decodes only the frames it uses
_IMAGE_CHUNK_BYTES = 128 << 10  # ~128 KiB: 6 frames of 84x84x3, 1 of 256x256x3
_MAX_IMAGE_CHUNK_STEPS = 16
# zarr 3 by default skips writing chunks equal to the fill value; a missing chunk would then be
# indistinguishable from a lost one, so every write here stores every chunk.
_WRITE_ALL = {"write_empty_chunks": True}


class ReplayBufferError(UserError):
    """A store that is not a valid replay buffer, or an episode that does not fit the store."""


async def _list_keys(store, prefix: str) -> set[str]:
    return {k async for k in store.list_prefix(prefix)}


def _first_missing_chunk(arr: zarr.Array, n_rows: int) -> tuple[str, int] | None:
    """(chunk key, first row) of the first chunk (or shard) covering rows [0, n_rows) that is absent from the store."""
    block = arr.shards or arr.chunks
    grid = [math.ceil(n_rows / block[0])] + [math.ceil(s / b) for s, b in zip(arr.shape[1:], block[1:])]
    path = arr.store_path.path
    stored = sync(_list_keys(arr.store_path.store, path + "/"))
    for coords in itertools.product(*map(range, grid)):
        key = arr.metadata.encode_chunk_key(coords)
        if f"{path}/{key}" not in stored:
            return key, coords[0] * block[0]
    return None


def default_chunk_steps(shape: tuple[int, ...], dtype) -> int:
    """Steps per time chunk for an array of feature ``shape``: ~4 MiB (at most 1000 steps) for vectors,
    ~128 KiB (1 to 16 frames) for images (H, W, C)."""
    step_bytes = max(1, int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
    if len(shape) == 3:
        return max(1, min(_MAX_IMAGE_CHUNK_STEPS, _IMAGE_CHUNK_BYTES // step_bytes))
    return max(1, min(_MAX_CHUNK_STEPS, _CHUNK_BYTES // step_bytes))


class ReplayBuffer:
    """Episodes of per-step arrays in a zarr group; open with :meth:`create`, :meth:`open` or :meth:`open_or_create`."""

    def __init__(self, root: zarr.Group, writable: bool, where: str, check_chunks: bool = True):
        self._root, self._writable, self._where = root, writable, where
        if not isinstance(root.get("data"), zarr.Group):
            raise ReplayBufferError(f"{where}: missing group 'data'; not a replay buffer")
        meta = root.get("meta")
        ends_arr = meta.get("episode_ends") if isinstance(meta, zarr.Group) else None
        if not isinstance(ends_arr, zarr.Array):
            raise ReplayBufferError(f"{where}: missing array 'meta/episode_ends'; not a replay buffer")
        self._group = root["data"]
        self._ends_arr = ends_arr.with_config(_WRITE_ALL)
        self._ends = self._read_ends(where)
        n_steps = self.n_steps
        self._arrays: dict[str, zarr.Array] = {}
        tails = []
        for key, arr in self._group.arrays():
            if arr.ndim < 1:
                raise ReplayBufferError(f"{where}: data/{key} is 0-dimensional; expected (steps, *shape)")
            if arr.shape[0] < n_steps:
                raise ReplayBufferError(
                    f"{where}: truncated: data/{key} has {arr.shape[0]} rows but meta/episode_ends ends at {n_steps}"
                )
            if arr.shape[0] > n_steps:
                tails.append(f"data/{key} ({arr.shape[0] - n_steps} rows)")
            if check_chunks and n_steps and (missing := _first_missing_chunk(arr, n_steps)):
                raise ReplayBufferError(
                    f"{where}: data/{key} is missing chunk {missing[0]!r} (from row {missing[1]}) inside the "
                    f"recorded {n_steps} steps; zarr would silently read fill values there. If the store was written "
                    f"with write_empty_chunks=False, open it with check_chunks=False"
                )
            self._arrays[key] = arr.with_config(_WRITE_ALL)
        if tails:
            warnings.warn(
                f"{where}: ignoring rows past meta/episode_ends[-1]={n_steps} left by an interrupted append: "
                f"{', '.join(tails)}; the next append overwrites them",
                stacklevel=3,
            )

    def _read_ends(self, where: str) -> np.ndarray:
        arr = self._ends_arr
        try:
            ends = np.asarray(arr[:])
        except Exception as e:
            raise ReplayBufferError(f"{where}: meta/episode_ends failed to decode ({type(e).__name__}: {e})") from e
        if ends.ndim != 1 or ends.dtype.kind not in "iu":
            raise ReplayBufferError(f"{where}: meta/episode_ends must be a 1-D integer array, got shape {ends.shape} dtype {ends.dtype}")
        ends = ends.astype(np.int64)
        if len(ends) and arr.fill_value is not None and ends[-1] == arr.fill_value and (len(ends) == 1 or ends[-1] <= ends[-2]):
            warnings.warn(f"{where}: ignoring an unwritten trailing meta/episode_ends entry left by an interrupted append", stacklevel=4)
            ends = ends[:-1]
        if len(ends) and ends[0] <= 0:
            raise ReplayBufferError(f"{where}: meta/episode_ends[0] must be positive, got {ends[0]}")
        if (bad := np.flatnonzero(np.diff(ends) <= 0)).size:
            i = int(bad[0]) + 1
            raise ReplayBufferError(
                f"{where}: meta/episode_ends must be strictly increasing, but entry {i} is {ends[i]} after {ends[i - 1]}"
            )
        return ends

    # ------------------------------------------------------------------ constructors
    @classmethod
    def create(cls, path: str | os.PathLike, zarr_format: int = 3) -> ReplayBuffer:
        """A new empty buffer at ``path`` (refuses any existing file or non-empty folder)."""
        p = Path(path)
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            raise FileExistsError(f"{p} already exists; open it with ReplayBuffer.open({str(p)!r}, mode='a') to append")
        if zarr_format not in (2, 3):
            raise ValueError(f"zarr_format must be 2 or 3, got {zarr_format}")
        root = zarr.open_group(p, mode="w", zarr_format=zarr_format)
        root.create_group("data")
        root.create_group("meta").create_array("episode_ends", shape=(0,), chunks=(_ENDS_CHUNK,), dtype="int64", fill_value=0)
        return cls(root, writable=True, where=str(p))

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r", check_chunks: bool = True) -> ReplayBuffer:
        """Open and validate an existing store; mode "r" (read-only) or "a" (append)."""
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"no replay buffer at {p}")
        try:
            root = zarr.open_group(p, mode="r" if mode == "r" else "r+", use_consolidated=False)  # never stale metadata
        except (zarr.errors.BaseZarrError, ValueError) as e:
            raise ReplayBufferError(f"{p} is not a zarr group, so not a replay buffer ({type(e).__name__}: {e})") from e
        return cls(root, writable=mode == "a", where=str(p), check_chunks=check_chunks)

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, zarr_format: int = 3) -> ReplayBuffer:
        """Open ``path`` for appending if it holds anything, else create an empty buffer there."""
        p = Path(path)
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            return cls.open(p, mode="a")
        return cls.create(p, zarr_format=zarr_format)

    # ------------------------------------------------------------------ reading
    @property
    def keys(self) -> list[str]:
        return sorted(self._arrays)

    @property
    def attrs(self):
        """The root group's attributes: a mutable mapping of JSON-able values, saved with the store."""
        return self._root.attrs

    @property
    def episode_ends(self) -> np.ndarray:
        """(E,) int64 cumulative episode ends (read-only view)."""
        view = self._ends.view()
        view.flags.writeable = False
        return view

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.diff(self._ends, prepend=0)

    @property
    def n_episodes(self) -> int:
        return len(self._ends)

    @property
    def n_steps(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, key: str) -> zarr.Array:
        """The zarr array of ``key``; it may hold rows past ``n_steps`` (see the module docstring)."""
        if key not in self._arrays:
            raise KeyError(f"replay buffer has no key {key!r}; available keys: {self.keys}")
        return self._arrays[key]

    def shape(self, key: str) -> tuple[int, ...]:
        """Feature shape of ``key`` (its array shape without the step axis)."""
        return tuple(self[key].shape[1:])

    def _read(self, key: str, start: int, stop: int) -> np.ndarray:
        arr = self[key]
        try:
            return arr[start:stop]
        except Exception as e:  # a codec failure: find the chunk to name it
            c = arr.chunks[0]
            for s in range(start - start % c, stop, c):
                try:
                    arr[max(s, start) : min(s + c, stop)]
                except Exception as e2:
                    raise ReplayBufferError(
                        f"{self._where}: data/{key}: the chunk holding rows [{s}, {s + c}) failed to decode "
                        f"({type(e2).__name__}: {e2})"
                    ) from e2
            raise ReplayBufferError(f"{self._where}: data/{key}: reading rows [{start}, {stop}) failed ({type(e).__name__}: {e})") from e

    def load(self, keys: list[str] | None = None) -> dict[str, np.ndarray]:
        """All recorded steps in memory: {key: (n_steps, *shape)}."""
        return {k: self._read(k, 0, self.n_steps) for k in (self.keys if keys is None else keys)}

    def get_episode(self, i: int, keys: list[str] | None = None) -> dict[str, np.ndarray]:
        """Episode ``i`` (negative counts from the end): {key: (L, *shape)}."""
        if not -self.n_episodes <= i < self.n_episodes:
            raise IndexError(f"episode {i} out of range for a buffer with {self.n_episodes} episodes")
        i %= self.n_episodes
        start = int(self._ends[i - 1]) if i else 0
        return {k: self._read(k, start, int(self._ends[i])) for k in (self.keys if keys is None else keys)}

    def __repr__(self) -> str:
        return f"ReplayBuffer({self._where!r}, episodes={self.n_episodes}, steps={self.n_steps}, keys={self.keys})"

    # ------------------------------------------------------------------ writing
    def _check_episode(self, data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not isinstance(data, Mapping) or not data:
            raise ReplayBufferError(f"add_episode needs a non-empty dict of arrays, got {type(data).__name__} {data!r:.80}")
        out, lengths = {}, {}
        for key, value in data.items():
            if not isinstance(key, str) or not key or "/" in key:
                raise ReplayBufferError(f"episode key {key!r} must be a non-empty string without '/'")
            x = np.asarray(value)
            if x.ndim < 1:
                raise ReplayBufferError(f"episode[{key!r}] is a scalar; expected shape (steps, *shape)")
            if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
                raise ReplayBufferError(f"episode[{key!r}] has non-numeric dtype {x.dtype}")
            if x.dtype.kind in "fc" and len(bad := np.argwhere(~np.isfinite(x))):
                raise ReplayBufferError(f"episode[{key!r}] has a non-finite value (NaN or inf) at row {bad[0][0]}")
            out[key], lengths[key] = x, len(x)
        if len(set(lengths.values())) != 1 or 0 in lengths.values():
            raise ReplayBufferError(f"episode arrays must all have the same length >= 1; got lengths {lengths}")
        if self.n_episodes:
            if set(out) != set(self._arrays):
                missing, extra = sorted(set(self._arrays) - set(out)), sorted(set(out) - set(self._arrays))
                raise ReplayBufferError(f"episode keys differ from the store's {self.keys}: missing {missing}, unexpected {extra}")
            for key, x in out.items():
                arr = self._arrays[key]
                if x.shape[1:] != arr.shape[1:]:
                    raise ReplayBufferError(f"episode[{key!r}] has feature shape {x.shape[1:]}, expected {arr.shape[1:]} (as stored)")
                if x.dtype != arr.dtype:
                    raise ReplayBufferError(f"episode[{key!r}] has dtype {x.dtype}, expected {arr.dtype} (as stored)")
        return out

    def _prepare_arrays(self, data: dict[str, np.ndarray], chunk_steps: int | None) -> None:
        """Before the first committed episode: drop leftover arrays that do not fit it, create the missing ones."""
        for key, arr in list(self._arrays.items()):
            if key not in data or arr.shape[1:] != data[key].shape[1:] or arr.dtype != data[key].dtype:
                del self._group[key], self._arrays[key]
        for key, x in data.items():
            if key not in self._arrays:
                steps = chunk_steps or default_chunk_steps(x.shape[1:], x.dtype)
                arr = self._group.create_array(
                    key, shape=(0, *x.shape[1:]), chunks=(steps, *(max(1, d) for d in x.shape[1:])), dtype=x.dtype, fill_value=0
                )
                self._arrays[key] = arr.with_config(_WRITE_ALL)

    def put_attrs(self, attrs: Mapping[str, Any]) -> None:
        """Replace the store's attrs with ``attrs`` (JSON-able) in one metadata write, from a deep copy, so
        nothing the caller keeps shares state with zarr's cached metadata."""
        self._root.attrs.put(json.loads(json.dumps(dict(attrs))))

    def add_episode(self, data: Mapping[str, np.ndarray], chunk_steps: int | None = None,
                    attrs: Mapping[str, Any] | None = None) -> None:
        """Append one episode {key: (L, *shape)}; validated before anything is written.

        ``attrs``: the store's bookkeeping as it is with this episode (e.g. its seed appended), written in
        one piece after the episode's rows and just before the commit point (its ``meta/episode_ends``
        entry). A writer killed between the two leaves attrs that describe one episode more than the
        store holds, which a resuming writer can tell from ``n_episodes`` and repair; never the reverse.

        ``chunk_steps`` sets the time chunk of arrays created by this call (the first episode);
        by default ~4 MiB per chunk, at most 1000 steps, for vectors and ~128 KiB, at most 16 steps,
        for images (H, W, C) (see :func:`default_chunk_steps`), always whole feature dims.
        """
        if not self._writable:
            raise ReplayBufferError(f"{self._where} is open read-only; use ReplayBuffer.open(path, mode='a') to append")
        if chunk_steps is not None and (not isinstance(chunk_steps, int) or chunk_steps < 1):
            raise ValueError(f"chunk_steps must be a positive int, got {chunk_steps!r}")
        data = self._check_episode(data)
        if not self.n_episodes:
            self._prepare_arrays(data, chunk_steps)
        start = self.n_steps
        stop = start + len(next(iter(data.values())))
        for key, x in data.items():  # rows past `start` are uncommitted: safe to overwrite
            arr = self._arrays[key]
            arr.resize((stop, *arr.shape[1:]))
            arr[start:stop] = x
        if attrs is not None:
            self.put_attrs(attrs)
        n = self.n_episodes  # commit point: one more episode end
        self._ends_arr.resize((n + 1,))
        self._ends_arr[n] = stop
        self._ends = np.append(self._ends, np.int64(stop))
