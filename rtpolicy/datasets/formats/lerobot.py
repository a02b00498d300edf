"""LeRobot dataset format v3.0 (what ``lerobot`` >= 0.4 records and shares), read and written without lerobot.

Layout (many episodes per file)::

    meta/info.json                         codebase_version "v3.0", fps, features {key: {dtype, shape, names, info}},
                                           data_path / video_path templates, totals
    meta/stats.json                        {key: {min, max, mean, std, count, q01..q99}} over all frames
    meta/tasks.parquet                     task_index + the task text (pandas index column)
    meta/episodes/chunk-000/file-000.parquet   per episode: episode_index, tasks, length, dataset_from_index/to_index,
                                           data/chunk_index, data/file_index, videos/<key>/{chunk_index, file_index,
                                           from_timestamp, to_timestamp}, meta/episodes/{chunk_index, file_index}
    data/chunk-000/file-000.parquet        one row per frame: every non-video feature (vectors as fixed-size lists,
                                           shape (1,) as scalars) + timestamp, frame_index, episode_index, index, task_index
    videos/<key>/chunk-000/file-000.mp4    the frames of many episodes back to back; episode e is
                                           [from_timestamp, to_timestamp) of its file

Our names: ``observation.state`` -> ``state``, ``observation.images.<cam>`` (and ``observation.image``) ->
``rgb_<cam>`` (``rgb_image``), ``observation.environment_state`` -> ``env_state``, other ``observation.<k>`` ->
``<k>``, ``action`` -> ``action``, ``next.reward`` / ``next.done`` -> ``reward`` / ``done``; ``task_index`` ->
``task_id`` when the dataset holds more than one task; timestamp/frame/episode indices are bookkeeping.

Videos are decoded with PyAV once, in order (each file is opened once and its episodes read back to back), when a
dataset is read: training reads a LeRobot folder through a zarr cache written on first use
(``rtpolicy.datasets.formats.open_dataset``), so each frame is decoded once, not once per epoch. The writer
encodes every camera with PyAV (h264, yuv420p, keyframe every 2 frames as LeRobot does, constant frame rate,
frame i of a file at pts i / fps), so frames come back within codec tolerance, not bit-exact.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from fractions import Fraction
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

CODEBASE_VERSION = "v3.0"
BOOKKEEPING = ("timestamp", "frame_index", "episode_index", "index", "task_index")
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
CHUNKS_SIZE = 1000  # files per chunk folder
DATA_FILE_MB = 100
VIDEO_FILE_MB = 200
_CODEC_NAMES = {"libx264": "h264", "libx265": "hevc", "libsvtav1": "av1"}  # encoder -> codec name in info.json
_RENAME = {"observation.state": "state", "observation.environment_state": "env_state", "observation.image": "rgb_image",
           "action": "action", "next.reward": "reward", "next.done": "done"}
_RENAME_INV = {v: k for k, v in _RENAME.items() if k != "observation.image"}


def _deps():
    try:
        import av
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(f"LeRobot datasets need pyarrow and av ({e.name} is missing): pip install 'rtpolicy[formats]'") from e
    return av, pa, pq


def default_name(native: str) -> str | None:
    """LeRobot feature name -> ours (None: bookkeeping)."""
    if native in BOOKKEEPING:
        return None
    if native in _RENAME:
        return _RENAME[native]
    if native.startswith("observation.images."):
        return "rgb_" + native.removeprefix("observation.images.").replace(".", "_")
    return native.removeprefix("observation.").replace(".", "_")


def native_name(ours: str) -> str:
    """Our key -> the LeRobot feature name (the inverse of :func:`default_name`)."""
    if ours in _RENAME_INV:
        return _RENAME_INV[ours]
    if ours == "task_id":
        return "task_index"
    if ours.startswith("rgb_") and len(ours) > 4:
        return "observation.images." + ours[4:]
    return "observation." + ours


def _column(table, key: str, shape: tuple[int, ...], dtype: str, where: str) -> np.ndarray:
    """A parquet column -> (n, *shape) numpy (fixed or variable lists flattened; scalars for shape (1,) or ())."""
    import pyarrow as pa

    col = table.column(key).combine_chunks()
    n = len(col)
    while pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
        if col.null_count:
            raise FormatError(f"{where}: column {key!r} has null rows")
        col = col.flatten()
    if col.null_count:
        raise FormatError(f"{where}: column {key!r} has null values")
    x = col.to_numpy(zero_copy_only=False)
    if dtype != "string":
        x = x.astype(np.dtype(dtype), copy=False)
    if x.size != n * math.prod(shape):
        raise FormatError(f"{where}: column {key!r} holds {x.size} values for {n} rows, expected shape {list(shape)} per row")
    return x.reshape(n, *shape)


# ---------------------------------------------------------------------------------------------------- video
class VideoCursor:
    """Decodes one mp4 file front to back; ``read(from_s, n)`` returns its n frames starting at time from_s:
    (n, H, W, 3) uint8. Reads in increasing time are sequential; an earlier time reopens the file (seek)."""

    def __init__(self, path: Path, fps: float, where: str):
        self.path, self.fps, self.where = path, fps, where
        self._container = None
        self._frames: Iterator | None = None
        self.decoded = 0  # frames decoded so far (the cost of a read: a seek lands on the keyframe before it)

    def _open(self, from_s: float):
        av, _, _ = _deps()
        self.close()
        try:
            self._container = av.open(str(self.path))
        except (av.error.FFmpegError, OSError) as e:
            raise FormatError(f"{self.where}: cannot open video {self.path} ({e})") from e
        stream = self._container.streams.video[0]
        if from_s > 0 and stream.time_base:
            self._container.seek(int(from_s / stream.time_base), stream=stream, backward=True, any_frame=False)
        self._frames = self._container.decode(stream)
        self._last = -math.inf

    def read(self, from_s: float, n: int, label: str) -> np.ndarray:
        av, _, _ = _deps()
        half = 0.5 / self.fps
        if self._frames is None or from_s < self._last - half:
            self._open(from_s)
        out: list[np.ndarray] = []
        try:
            while len(out) < n:
                frame = next(self._frames, None)
                if frame is None:
                    break
                self.decoded += 1
                if frame.time is None:
                    raise FormatError(f"{self.where}: {label}: video {self.path} has a frame without a timestamp")
                t = float(frame.time)
                self._last = t
                k = round((t - from_s) * self.fps)
                if k < 0:
                    continue  # before this episode (a seek lands on the keyframe before it)
                if k > len(out):
                    raise FormatError(f"{self.where}: {label}: video {self.path} has no frame at "
                                      f"{from_s + len(out) / self.fps:.4f} s (next frame at {t:.4f} s)")
                if k < len(out):
                    continue  # a duplicate timestamp
                out.append(frame.to_ndarray(format="rgb24"))
        except av.error.FFmpegError as e:
            raise FormatError(f"{self.where}: {label}: decoding {self.path} failed ({e})") from e
        if len(out) < n:
            raise FormatError(f"{self.where}: {label}: video {self.path} holds {len(out)} frames from {from_s:.4f} s, "
                              f"the episode has {n}")
        return np.stack(out)

    def close(self):
        if self._container is not None:
            self._container.close()
        self._container = self._frames = None


class VideoWriter:
    """Frames of many episodes back to back into one mp4 (frame i at pts i / fps)."""

    def __init__(self, path: Path, fps: float, height: int, width: int, codec: str, crf: int, gop: int):
        av, _, _ = _deps()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.n, self.bytes = path, 0, 0  # frames and encoded bytes so far
        self.container = av.open(str(path), "w")
        rate = Fraction(fps).limit_denominator(1001)
        self.stream = self.container.add_stream(codec, rate=rate)
        self.stream.width, self.stream.height = width, height
        even = height % 2 == 0 and width % 2 == 0
        self.stream.pix_fmt = "yuv420p" if even else "yuv444p"  # 4:2:0 needs even sides
        self.stream.codec_context.time_base = 1 / rate
        opts = {"g": str(gop)}
        if codec in ("h264", "libx264", "hevc", "libx265"):
            opts |= {"crf": str(crf), "preset": "veryfast"}
        elif codec == "libsvtav1":
            opts |= {"crf": str(crf), "preset": "10"}
        self.stream.options = opts
        self.info = {"video.height": height, "video.width": width, "video.codec": _CODEC_NAMES.get(codec, codec),
                     "video.pix_fmt": self.stream.pix_fmt, "video.is_depth_map": False, "video.fps": fps,
                     "video.channels": 3, "has_audio": False}

    def add(self, frames: np.ndarray) -> None:
        av, _, _ = _deps()
        for img in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts = self.n
            self.n += 1
            for packet in self.stream.encode(frame):
                self.bytes += packet.size
                self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


# ---------------------------------------------------------------------------------------------------- reading
def _read_tasks(root: Path, where: str) -> list[str]:
    _, _, pq = _deps()
    path = root / "meta/tasks.parquet"
    if not path.exists():
        return []
    t = pq.read_table(path)
    text = next((c for c in ("task", "__index_level_0__") if c in t.column_names), None)
    if "task_index" not in t.column_names or text is None:
        raise FormatError(f"{where}: meta/tasks.parquet needs columns task_index and task (or a pandas index), has {t.column_names}")
    idx, names = t.column("task_index").to_pylist(), t.column(text).to_pylist()
    out = [""] * (max(idx) + 1 if idx else 0)
    for i, name in zip(idx, names):
        out[i] = str(name)
    return out


def _read_episodes_meta(root: Path, where: str) -> dict[str, np.ndarray | list]:
    _, pa, pq = _deps()
    files = sorted((root / "meta/episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise FormatError(f"{where}: no meta/episodes/chunk-*/file-*.parquet; not a LeRobot v3 dataset")
    tables = []
    for f in files:
        schema = pq.read_schema(f)
        tables.append(pq.read_table(f, columns=[c for c in schema.names if not c.startswith("stats/")]))
    t = pa.concat_tables(tables, promote_options="default")
    for col in ("episode_index", "length", "dataset_from_index", "dataset_to_index", "data/chunk_index", "data/file_index"):
        if col not in t.column_names:
            raise FormatError(f"{where}: meta/episodes parquet has no column {col!r}")
    d = {c: t.column(c).to_pylist() for c in t.column_names}
    order = np.argsort(np.asarray(d["episode_index"]), kind="stable")
    return {c: [v[i] for i in order] for c, v in d.items()}


class _DataFiles:
    """The frame rows of one episode, reading each data parquet file once while episodes go in order."""

    def __init__(self, root: Path, template: str, columns: list[str], where: str):
        self.root, self.template, self.columns, self.where = root, template, columns, where
        self._key, self._table, self._ep = None, None, None

    def rows(self, chunk: int, file: int, episode: int):
        _, pa, pq = _deps()

        key = (chunk, file)
        if key != self._key:
            rel = self.template.format(chunk_index=chunk, file_index=file)
            path = self.root / rel
            if not path.exists():
                raise FormatError(f"{self.where}: episode {episode}: data file {rel} is missing")
            schema = pq.read_schema(path)
            if missing := [c for c in self.columns if c not in schema.names]:
                raise FormatError(f"{self.where}: {rel} has no column(s) {missing} (it has {schema.names})")
            self._table = pq.read_table(path, columns=self.columns)
            self._ep = self._table.column("episode_index").to_numpy()
            self._key, self._rel = key, rel
        mask = self._ep == episode
        return self._table.filter(pa.array(mask)), self._rel


@FORMATS.register("lerobot")
class LeRobotFormat(Format):
    name = "lerobot"
    suffixes = (".lerobot",)

    def detect(self, path: Path) -> bool:
        return path.is_dir() and (path / "meta/info.json").is_file()

    def read(self, path: Path, keys: Mapping[str, Any] | None = None, **options: Any) -> EpisodeSource:
        _deps()
        where = str(path)
        try:
            info = json.loads((path / "meta/info.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FormatError(f"{where}: meta/info.json is not readable JSON ({e})") from e
        version = str(info.get("codebase_version", "?"))
        if not version.startswith("v3"):
            raise FormatError(f"{where}: LeRobot codebase_version {version}; only v3.0 is read (convert older datasets "
                              f"with lerobot's convert_dataset_v21_to_v30)")
        feats = info.get("features")
        if not isinstance(feats, dict) or not feats:
            raise FormatError(f"{where}: meta/info.json has no features")
        fps = float(info.get("fps") or DEFAULT_FPS)
        tasks = _read_tasks(path, where)
        default = default_name
        if len(tasks) > 1:
            default = lambda n: "task_id" if n == "task_index" else default_name(n)
        mapping = map_keys(list(feats), default, keys, where)
        scalar = set(info.get("rtpolicy", {}).get("scalar_keys", []))
        spec: dict[str, tuple[tuple[int, ...], str]] = {}  # native key -> (shape, dtype: numpy | video | image)
        for srcs in mapping.values():
            for s in srcs:
                ft = feats[s]
                shape = tuple(int(d) for d in ft.get("shape", ()))
                if ft.get("dtype") in ("video", "image"):
                    if len(shape) != 3:
                        raise FormatError(f"{where}: feature {s!r} is a {ft['dtype']} of shape {list(shape)}, expected (H, W, C)")
                    shape = shape if shape[2] in (1, 3, 4) else (shape[1], shape[2], shape[0])  # (C, H, W) declared
                    spec[s] = ((shape[0], shape[1], 3), ft["dtype"])
                else:
                    spec[s] = (() if s in scalar or s in BOOKKEEPING else shape, str(ft.get("dtype")))
        shapes = {}
        for ours, srcs in mapping.items():
            dts = [np.uint8 if spec[s][1] in ("video", "image") else np.dtype(spec[s][1]) for s in srcs]
            if len(srcs) == 1:
                shapes[ours] = (spec[srcs[0]][0], np.dtype(dts[0]))
            else:
                shapes[ours] = ((sum(math.prod(spec[s][0]) for s in srcs),), np.result_type(*dts))
        eps = _read_episodes_meta(path, where)
        for s, (_, dt) in spec.items():
            cols = [f"videos/{s}/{c}" for c in ("chunk_index", "file_index", "from_timestamp")] if dt == "video" else []
            if missing := [c for c in cols if c not in eps]:
                raise FormatError(f"{where}: meta/episodes has no column(s) {missing} for the video feature {s!r}")
        lengths = np.asarray(eps["length"], dtype=np.int64)
        attrs = dict(info.get("rtpolicy", {}).get("attrs", {})) | {"tasks": tasks}
        if info.get("robot_type"):
            attrs.setdefault("robot_type", info["robot_type"])
        data_template = info.get("data_path") or DATA_PATH
        video_template = info.get("video_path") or VIDEO_PATH
        table_cols = [s for s, (_, dt) in spec.items() if dt != "video"]
        columns = list(dict.fromkeys(["episode_index", "frame_index", "timestamp", *table_cols]))

        def episodes():
            data = _DataFiles(path, data_template, columns, where)
            cursors: dict[tuple[str, Path], VideoCursor] = {}
            try:
                for i, ep_index in enumerate(eps["episode_index"]):
                    n = int(eps["length"][i])
                    label = f"episode {ep_index}"
                    rows, rel = data.rows(int(eps["data/chunk_index"][i]), int(eps["data/file_index"][i]), ep_index)
                    if rows.num_rows != n:
                        raise FormatError(f"{where}: {label}: {rel} holds {rows.num_rows} rows, meta/episodes says length {n}")
                    frame_index = rows.column("frame_index").to_numpy()
                    if not np.array_equal(frame_index, np.arange(n)):
                        raise FormatError(f"{where}: {label}: {rel} frame_index is not 0..{n - 1} in order")
                    ts = rows.column("timestamp").to_numpy().astype(np.float64)
                    if n > 1 and (bad := np.flatnonzero(np.diff(ts) <= 0)).size:
                        raise FormatError(f"{where}: {label}: {rel} timestamps are not increasing at frame {int(bad[0]) + 1} "
                                          f"({ts[bad[0]]} then {ts[bad[0] + 1]})")
                    native = {}
                    for s, (shape, dt) in spec.items():
                        if dt == "video":
                            vpath = path / video_template.format(video_key=s, chunk_index=int(eps[f"videos/{s}/chunk_index"][i]),
                                                                 file_index=int(eps[f"videos/{s}/file_index"][i]))
                            if not vpath.exists():
                                raise FormatError(f"{where}: {label}: video file {vpath.relative_to(path)} of {s!r} is missing")
                            cur = cursors.get((s, vpath))
                            if cur is None:
                                for k in [k for k in cursors if k[0] == s]:
                                    cursors.pop(k).close()
                                cur = cursors[(s, vpath)] = VideoCursor(vpath, fps, where)
                            native[s] = cur.read(float(eps[f"videos/{s}/from_timestamp"][i]), n, f"{label} {s!r}")
                        elif dt == "image":
                            native[s] = _decode_images(rows, s, shape, where, label)
                        else:
                            native[s] = _column(rows, s, shape, dt, f"{where}: {label}: {rel}")
                    ep = {ours: concat_features([native[s] for s in srcs], where, ours) for ours, srcs in mapping.items()}
                    check_episode(ep, where, ep_index)
                    yield ep
            finally:
                for cur in cursors.values():
                    cur.close()

        return EpisodeSource(shapes, episodes, where, lengths, attrs, fps)

    # ------------------------------------------------------------------------------------------------ writing
    def write(self, source: EpisodeSource, path: Path, overwrite: bool = False, vcodec: str = "h264", crf: int = 18,
              gop: int = 2, robot_type: str | None = None, data_file_mb: float = DATA_FILE_MB,
              video_file_mb: float = VIDEO_FILE_MB, chunks_size: int = CHUNKS_SIZE, **options: Any) -> None:
        """Episodes go into data/video files until one passes ``data_file_mb`` / ``video_file_mb`` (LeRobot's 100 / 200
        MB), then into the next file (``chunks_size`` files per chunk folder)."""
        if options:
            raise FormatError(f"{path}: unknown LeRobot writer options {sorted(options)}")
        _, pa, pq = _deps()
        image_keys = source.image_keys()
        names = {k: native_name(k) for k in source.keys}
        fps = source.fps
        fps_out = int(fps) if float(fps).is_integer() else fps
        task_names, more_tasks = _task_names(source)
        features: dict[str, dict] = {}
        scalar_keys = []
        for k, (shape, dtype) in source.keys.items():
            n = names[k]
            if k in image_keys:
                features[n] = {"dtype": "video", "shape": list(shape), "names": ["height", "width", "channels"]}
            elif k == "task_id":
                continue
            else:
                if shape == ():
                    scalar_keys.append(n)
                features[n] = {"dtype": np.dtype(dtype).name, "shape": list(shape) or [1], "names": None}
        for b, dt in zip(BOOKKEEPING, ("float32", "int64", "int64", "int64", "int64")):
            features[b] = {"dtype": dt, "shape": [1], "names": None}
        vector_keys = [k for k in source.keys if k not in image_keys and k != "task_id"]
        with atomic_path(path, overwrite) as tmp:
            tmp.mkdir()
            writers: dict[str, VideoWriter] = {}
            video_files: dict[str, tuple[int, int]] = {k: (0, 0) for k in image_keys}
            data_writer, data_file, data_bytes = None, (0, 0), 0
            stats = _Stats()
            ep_rows: list[dict[str, Any]] = []
            total = 0
            try:
                for e, ep in enumerate(source.checked_episodes()):
                    L = check_episode(ep, source.where, e)
                    task_idx = ep["task_id"].reshape(L).astype(np.int64) if "task_id" in ep else np.zeros(L, np.int64)
                    if more_tasks and task_idx.max() >= len(task_names):
                        task_names += [f"task {i}" for i in range(len(task_names), int(task_idx.max()) + 1)]
                    if task_idx.min() < 0 or task_idx.max() >= len(task_names):
                        raise FormatError(f"{source.where}: episode {e}: task_id {int(task_idx.max())} outside the "
                                          f"{len(task_names)} task names")
                    row: dict[str, Any] = {"episode_index": e, "tasks": sorted({task_names[t] for t in task_idx.tolist()}),
                                           "length": L, "dataset_from_index": total, "dataset_to_index": total + L}
                    cols = {names[k]: _arrow_column(ep[k]) for k in vector_keys}
                    cols |= {"timestamp": pa.array((np.arange(L) / fps).astype(np.float32)),
                             "frame_index": pa.array(np.arange(L, dtype=np.int64)),
                             "episode_index": pa.array(np.full(L, e, np.int64)),
                             "index": pa.array(np.arange(total, total + L, dtype=np.int64)),
                             "task_index": pa.array(task_idx)}
                    table = pa.table(cols)
                    if data_writer is not None and data_bytes > data_file_mb * 2**20:
                        data_writer.close()
                        data_writer, data_file = None, _next_file(*data_file, chunks_size)
                    if data_writer is None:
                        p = tmp / DATA_PATH.format(chunk_index=data_file[0], file_index=data_file[1])
                        p.parent.mkdir(parents=True, exist_ok=True)
                        schema = table.schema.with_metadata({"huggingface": json.dumps(_hf_metadata(features))})
                        data_writer, data_bytes = pq.ParquetWriter(p, schema, compression="snappy"), 0
                    data_writer.write_table(table.replace_schema_metadata(data_writer.schema.metadata))
                    data_bytes += table.nbytes  # uncompressed, as LeRobot sizes its files
                    row |= {"data/chunk_index": data_file[0], "data/file_index": data_file[1]}
                    for k in image_keys:
                        frames = ep[k]
                        w = writers.get(k)
                        if w is not None and w.bytes > video_file_mb * 2**20:
                            w.close()
                            writers.pop(k)
                            w, video_files[k] = None, _next_file(*video_files[k], chunks_size)
                        if w is None:
                            c, f = video_files[k]
                            w = writers[k] = VideoWriter(tmp / VIDEO_PATH.format(video_key=names[k], chunk_index=c, file_index=f),
                                                         fps, frames.shape[1], frames.shape[2], vcodec, crf, gop)
                            features[names[k]]["info"] = w.info
                        start = w.n
                        w.add(frames)
                        row |= {f"videos/{names[k]}/chunk_index": video_files[k][0], f"videos/{names[k]}/file_index": video_files[k][1],
                                f"videos/{names[k]}/from_timestamp": start / fps, f"videos/{names[k]}/to_timestamp": (start + L) / fps}
                    row |= {"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0}
                    stats.add({names[k]: ep[k] for k in source.keys if k != "task_id"} | {
                        "timestamp": np.arange(L) / fps, "frame_index": np.arange(L), "episode_index": np.full(L, e),
                        "index": np.arange(total, total + L), "task_index": task_idx}, {names[k] for k in image_keys})
                    ep_rows.append(row)
                    total += L
            finally:
                if data_writer is not None:
                    data_writer.close()
                for w in writers.values():
                    w.close()
            if not ep_rows:
                raise FormatError(f"{source.where}: no episodes to write")
            ep_table = pa.Table.from_pylist(ep_rows)
            (tmp / "meta/episodes/chunk-000").mkdir(parents=True)
            pq.write_table(ep_table, tmp / EPISODES_PATH.format(chunk_index=0, file_index=0), compression="snappy")
            _write_tasks(tmp / "meta/tasks.parquet", task_names)
            info = {
                "codebase_version": CODEBASE_VERSION, "robot_type": robot_type or source.attrs.get("robot_type"),
                "total_episodes": len(ep_rows), "total_frames": total, "total_tasks": len(task_names),
                "chunks_size": chunks_size, "data_files_size_in_mb": data_file_mb, "video_files_size_in_mb": video_file_mb,
                "fps": fps_out, "splits": {"train": f"0:{len(ep_rows)}"}, "data_path": DATA_PATH,
                "video_path": VIDEO_PATH if image_keys else None, "features": features,
                "rtpolicy": {"scalar_keys": scalar_keys, "attrs": jsonable({k: v for k, v in source.attrs.items() if k != "tasks"})},
            }
            (tmp / "meta/info.json").write_text(json.dumps(info, indent=4))
            (tmp / "meta/stats.json").write_text(json.dumps(stats.result(), indent=4))


def _next_file(chunk: int, file: int, chunks_size: int) -> tuple[int, int]:
    return (chunk + 1, 0) if file == chunks_size - 1 else (chunk, file + 1)


def _arrow_column(x: np.ndarray):
    """(n,) -> scalars; (n, d) -> fixed_size_list<d>; (n, a, b, ...) -> nested fixed-size lists."""
    import pyarrow as pa

    arr = pa.array(np.ascontiguousarray(x).reshape(-1))
    for d in reversed(x.shape[1:]):
        arr = pa.FixedSizeListArray.from_arrays(arr, int(d))
    return arr


def _hf_metadata(features: dict) -> dict:
    """The ``huggingface`` schema metadata `datasets` writes (LeRobot reads features from info.json anyway)."""
    out = {}
    for k, ft in features.items():
        if ft["dtype"] in ("video", "image"):
            continue
        value = {"dtype": ft["dtype"], "_type": "Value"}
        if ft["shape"] == [1]:
            out[k] = value
        elif len(ft["shape"]) == 1:
            out[k] = {"feature": value, "length": ft["shape"][0], "_type": "List"}
        else:
            out[k] = {"shape": ft["shape"], "dtype": ft["dtype"], "_type": f"Array{len(ft['shape'])}D"}
    return {"info": {"features": out}}


def _task_names(source: EpisodeSource) -> tuple[list[str], bool]:
    """(task texts by task index, whether more may be named "task <i>" as task ids appear)."""
    tasks = source.attrs.get("tasks")
    if isinstance(tasks, list) and tasks and all(isinstance(t, str) for t in tasks):
        return list(tasks), False
    if "task_id" in source.keys:
        return [f"task {i}" for i in range(int(source.attrs.get("num_tasks") or 0))], True
    env_args = source.attrs.get("env_args")
    name = source.attrs.get("task") or (env_args.get("env_name") if isinstance(env_args, dict) else None)
    return [str(name or "demonstration")], False


def _write_tasks(path: Path, names: list[str]) -> None:
    """tasks.parquet as pandas writes a DataFrame indexed by task text (what LeRobot reads with pandas)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pandas_meta = {
        "index_columns": ["__index_level_0__"],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                            "metadata": {"encoding": "UTF-8"}}],
        "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64", "metadata": None},
                    {"name": None, "field_name": "__index_level_0__", "pandas_type": "unicode", "numpy_type": "object", "metadata": None}],
        "attributes": {}, "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.0",
    }
    table = pa.table({"task_index": pa.array(np.arange(len(names), dtype=np.int64)), "__index_level_0__": pa.array(names, pa.string())})
    pq.write_table(table.replace_schema_metadata({"pandas": json.dumps(pandas_meta)}), path)


def _decode_images(rows, key: str, shape, where: str, label: str) -> np.ndarray:
    """An ``image`` feature (PNG/JPEG bytes in a struct column) -> (n, H, W, 3) uint8."""
    import io

    from PIL import Image

    out = []
    for i, item in enumerate(rows.column(key).to_pylist()):
        data = item.get("bytes") if isinstance(item, dict) else None
        if not data:
            raise FormatError(f"{where}: {label}: image {key!r} frame {i} has no embedded bytes")
        with Image.open(io.BytesIO(data)) as im:
            out.append(np.asarray(im.convert("RGB")))
    return np.stack(out)


class _Stats:
    """meta/stats.json: per feature min, max, mean, std, count and q01..q99 over all frames; cameras per channel,
    scaled to [0, 1], shaped (3, 1, 1) as LeRobot stores them."""

    QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)

    def __init__(self):
        self.vec: dict[str, list[np.ndarray]] = {}
        self.img: dict[str, dict[str, np.ndarray]] = {}

    def add(self, ep: dict[str, np.ndarray], image_keys: set[str]) -> None:
        for k, x in ep.items():
            if k in image_keys:
                px = x.reshape(-1, 3).astype(np.float64) / 255.0
                s = self.img.setdefault(k, {"sum": np.zeros(3), "sq": np.zeros(3), "min": np.full(3, np.inf),
                                            "max": np.full(3, -np.inf), "n": np.zeros(1), "frames": np.zeros(1)})
                s["sum"] += px.sum(0)
                s["sq"] += (px**2).sum(0)
                s["min"] = np.minimum(s["min"], px.min(0))
                s["max"] = np.maximum(s["max"], px.max(0))
                s["n"] += len(px)
                s["frames"] += len(x)
            else:
                self.vec.setdefault(k, []).append(np.asarray(x).reshape(len(x), -1))

    def result(self) -> dict[str, dict[str, list]]:
        out = {}
        for k, parts in self.vec.items():
            x = np.concatenate(parts).astype(np.float64)
            out[k] = {"min": x.min(0).tolist(), "max": x.max(0).tolist(), "mean": x.mean(0).tolist(), "std": x.std(0).tolist(),
                      "count": [len(x)]} | {f"q{round(q * 100):02d}": np.quantile(x, q, axis=0).tolist() for q in self.QUANTILES}
        for k, s in self.img.items():
            mean = s["sum"] / s["n"]
            std = np.sqrt(np.maximum(s["sq"] / s["n"] - mean**2, 0))
            out[k] = {name: v.reshape(3, 1, 1).tolist() for name, v in
                      (("min", s["min"]), ("max", s["max"]), ("mean", mean), ("std", std))} | {"count": [int(s["frames"][0])]}
        return out
