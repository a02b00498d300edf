"""Robot messages -> the policy's observation dict, without ROS.

Every policy observation key (a 1-D vector, e.g. Meta-World's ``state`` (39,)) is the concatenation,
in order, of sources, each the latest message of one topic:

    {"state": [
        {"joint_state": {"topic": "/joint_states", "names": ["hand_x", "hand_y", "hand_z", "gripper_opening"],
                         "field": "position"}},          # sensor_msgs/JointState, looked up BY NAME
        {"array": {"topic": "/object_state", "size": 35}},  # std_msgs/Float64MultiArray, all of .data
    ]}

An image key (shape (H, W, 3)) has exactly one source, a camera topic:

    {"rgb_static": [{"image": {"topic": "/camera/image_raw"}}]}                    # sensor_msgs/Image
    {"rgb_static": [{"image": {"topic": "/camera/image_raw/compressed", "compressed": true}}]}  # CompressedImage

Images are decoded when they arrive (rgb8, bgr8, rgba8, bgra8, mono8; JPEG/PNG for compressed ones)
to (H, W, 3) uint8 RGB, and resized (bilinear) to the policy's size when the aspect ratio agrees
within 2%; another aspect ratio or encoding makes the samples invalid with a reason.

The ROS node (or a test) hands message contents to ``update_joint_state`` / ``update_array`` /
``update_image`` / ``update_compressed_image``; each source keeps its receive time on a steady clock. Once per control tick ``sample()`` assembles the
current vectors; it is invalid, with a ``kind`` (the safety layer's hold kind) and a reason naming the
topic and joint, when a topic has not been heard from (``stale_obs``), a configured joint is missing from
the latest JointState (``obs_missing_joint``), a JointState names a joint twice (``obs_duplicate_joint``),
a field or array has the wrong length (``obs_wrong_length``), a value is not finite AFTER the cast to
float32 (``obs_non_finite``: 1e39 is finite in float64 and inf in float32), a value lies outside the
optional per-key ``ranges`` (``obs_out_of_range``), or a fault the caller attached to a message
(``fault=(kind, reason)``, e.g. the node's ``obs_bad_stamp``). Valid samples go into a history of the last ``obs_horizon`` samples (after
``reset()`` the first sample fills every slot, as after ``env.reset()`` in evaluation); ``observation()``
returns it in the policy's layout:

    obs[key]        (1, To, D) float32, oldest sample first
    obs[image key]  (1, To, H, W, 3) uint8 (the policy's image encoder converts and normalizes)
    obs["task_id"]  (1,)       long, only for multi-task bundles (num_tasks > 0)
    obs[lang key]   (1, To, E) float32 or (1, To, L) long: the current instruction's features
                    (``set_instruction``), only for language-conditioned bundles

A sample's ``stamp`` is the OLDEST receive time of the sources it used, so a caller's stale-observation
watchdog (``SafetyLayer.filter(..., obs_stamp)``) fires when any one source goes quiet.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

JOINT_FIELDS = ("position", "velocity", "effort")


class ObservationConfigError(ValueError):
    pass


@dataclass(frozen=True)
class JointStateSource:
    """Named joints of a sensor_msgs/JointState topic, in this order, from one field."""

    topic: str
    names: tuple[str, ...]
    field: str = "position"

    def __post_init__(self):
        _check_topic(self.topic)
        names = tuple(self.names) if not isinstance(self.names, str) else None
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ObservationConfigError(f"joint_state source on {self.topic}: names must be a non-empty list of joint names, "
                                         f"got {self.names!r}")
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise ObservationConfigError(f"joint_state source on {self.topic}: joint names {dup} appear twice")
        if self.field not in JOINT_FIELDS:
            raise ObservationConfigError(f"joint_state source on {self.topic}: field must be one of {list(JOINT_FIELDS)}, "
                                         f"got {self.field!r}")
        object.__setattr__(self, "names", names)

    @property
    def size(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class ArraySource:
    """All ``size`` values of a std_msgs/Float64MultiArray topic."""

    topic: str
    size: int

    def __post_init__(self):
        _check_topic(self.topic)
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ObservationConfigError(f"array source on {self.topic}: size must be an int >= 1, got {self.size!r}")


@dataclass(frozen=True)
class ImageSource:
    """The latest frame of a sensor_msgs/Image (or, with ``compressed``, CompressedImage) topic."""

    topic: str
    compressed: bool = False

    def __post_init__(self):
        _check_topic(self.topic)
        if not isinstance(self.compressed, bool):
            raise ObservationConfigError(f"image source on {self.topic}: compressed must be true or false, got {self.compressed!r}")

    @property
    def kind(self) -> str:
        return "compressed_image" if self.compressed else "image"


Source = JointStateSource | ArraySource | ImageSource
SOURCE_KINDS: dict[str, type] = {"joint_state": JointStateSource, "array": ArraySource, "image": ImageSource}
IMAGE_ENCODINGS = {"rgb8": (3, [0, 1, 2]), "bgr8": (3, [2, 1, 0]), "rgba8": (4, [0, 1, 2]), "bgra8": (4, [2, 1, 0]),
                   "mono8": (1, [0, 0, 0])}  # encoding -> (channels, channel order giving RGB)


def _check_topic(topic: Any) -> None:
    if not isinstance(topic, str) or not topic:
        raise ObservationConfigError(f"a source topic must be a non-empty string, got {topic!r}")


@dataclass
class ObservationSpec:
    """Observation key -> its sources, in concatenation order."""

    sources: dict[str, list[Source]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str) -> ObservationSpec:
        """From ``{key: [{"joint_state": {...}} | {"array": {...}}, ...]}`` or the same as a JSON string."""
        if isinstance(config, str):
            if not config.strip():
                raise ObservationConfigError("observation sources are empty: map every policy observation key to its topics")
            try:
                config = json.loads(config)
            except json.JSONDecodeError as e:
                raise ObservationConfigError(f"observation sources are not valid JSON: {e}") from e
        if not isinstance(config, Mapping) or not config:
            raise ObservationConfigError(f"observation sources must map observation keys to source lists, got {config!r:.200}")
        out: dict[str, list[Source]] = {}
        for key, items in config.items():
            if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or not items:
                raise ObservationConfigError(f"observation {key!r}: expected a non-empty list of sources, got {items!r:.200}")
            out[key] = []
            for item in items:
                if not isinstance(item, Mapping) or len(item) != 1:
                    raise ObservationConfigError(f"observation {key!r}: each source is one of "
                                                 f"{{{' | '.join(SOURCE_KINDS)}: {{...}}}}, got {item!r:.200}")
                (kind, params), = item.items()
                if kind not in SOURCE_KINDS or not isinstance(params, Mapping):
                    raise ObservationConfigError(f"observation {key!r}: unknown source kind {kind!r} "
                                                 f"(known: {list(SOURCE_KINDS)}) or parameters not a mapping")
                try:
                    out[key].append(SOURCE_KINDS[kind](**params))
                except TypeError as e:
                    raise ObservationConfigError(f"observation {key!r}: bad {kind} source {dict(params)!r}: {e}") from e
        return cls(out)

    def topics(self) -> dict[str, str]:
        """Topic -> message kind ("joint_state" | "array" | "image" | "compressed_image"); a topic serves one kind only."""
        kinds: dict[str, str] = {}
        for key, srcs in self.sources.items():
            for s in srcs:
                kind = "joint_state" if isinstance(s, JointStateSource) else "array" if isinstance(s, ArraySource) else s.kind
                if kinds.setdefault(s.topic, kind) != kind:
                    raise ObservationConfigError(f"topic {s.topic} is configured both as {kinds[s.topic]} and as {kind}")
        return kinds


@dataclass
class Sample:
    """One control tick's observation: vectors (key -> (D,)) when valid, else the reason it is not."""

    valid: bool
    stamp: float | None  # oldest receive time of the sources used (steady clock, s); None if invalid
    reason: str = ""
    vectors: dict[str, np.ndarray] | None = None
    kind: str = ""  # invalid: the hold kind (rtpolicy.deploy.safety: "stale_obs" or one of OBS_HOLDS)


def ranges_from_normalizer(stats: Mapping[str, Sequence[float]], shapes: Mapping[str, Sequence[int]], margin: float
                           ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A bundle's ``normalizer`` stats ({"<key>.min": [...], "<key>.max": [...], "<key>.fitted": ...}) -> per 1-D
    key the accepted (lo, hi), each (D,): [min - margin * r, max + margin * r] with r = max(max - min, 0.01)
    (a dim constant in training still gets some room). Keys without fitted min/max are not checked."""
    if not margin >= 0:
        raise ObservationConfigError(f"observation range margin must be >= 0 (a fraction of the training range), got {margin}")
    out = {}
    for key, shape in shapes.items():
        lo, hi, fitted = stats.get(f"{key}.min"), stats.get(f"{key}.max"), stats.get(f"{key}.fitted")
        if len(shape) != 1 or lo is None or hi is None or not np.asarray(fitted if fitted is not None else 1).all():
            continue
        lo, hi = np.asarray(lo, dtype=np.float64).reshape(-1), np.asarray(hi, dtype=np.float64).reshape(-1)
        if lo.shape != (shape[0],) or hi.shape != (shape[0],):
            raise ObservationConfigError(f"normalizer stats of {key!r} have {lo.size} dims, the policy observes {shape[0]}")
        r = np.maximum(hi - lo, 0.01)
        out[key] = (lo - margin * r, hi + margin * r)
    return out


class ObservationBuilder:
    """Latest messages -> policy observations. Thread-safe: updates may come from other threads than sample().

    Args:
        spec: an ObservationSpec (or its config mapping / JSON string).
        shapes: the bundle's observation shapes, key -> [D] (1-D keys only).
        obs_horizon: To, the number of samples in an observation.
        num_tasks, task_id: multi-task bundles need a task id in [0, num_tasks) (None: not chosen yet,
            samples are invalid until ``set_task_id``).
        clock: steady clock for receive stamps (seconds).
        language: (key, shape) of a language-conditioned bundle's instruction input (not a topic source:
            samples are invalid until ``set_instruction``); None: the policy takes no instruction.
        ranges: key -> (lo (D,), hi (D,)) accepted values (see ``ranges_from_normalizer``); None: no check.
    """

    def __init__(self, spec: ObservationSpec | Mapping[str, Any] | str, shapes: Mapping[str, Sequence[int]], obs_horizon: int,
                 num_tasks: int = 0, task_id: int | None = None, clock: Callable[[], float] = time.monotonic,
                 language: tuple[str, Sequence[int]] | None = None,
                 ranges: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None):
        self.spec = spec if isinstance(spec, ObservationSpec) else ObservationSpec.from_config(spec)
        if obs_horizon < 1:
            raise ObservationConfigError(f"obs_horizon must be >= 1, got {obs_horizon}")
        self.obs_horizon, self.num_tasks, self.clock = int(obs_horizon), int(num_tasks), clock
        self.shapes = {k: [int(d) for d in v] for k, v in shapes.items()}
        self.language = (str(language[0]), tuple(int(d) for d in language[1])) if language is not None else None
        if self.language is not None and self.language[0] in self.shapes:
            raise ObservationConfigError(f"{self.language[0]!r} is the instruction input; it has no topic source")
        if missing := sorted(set(self.shapes) - set(self.spec.sources)):
            raise ObservationConfigError(f"the policy observes {missing} but no sources are configured for them "
                                         f"(configured: {sorted(self.spec.sources)})")
        if extra := sorted(set(self.spec.sources) - set(self.shapes)):
            raise ObservationConfigError(f"sources are configured for {extra}, which the policy does not observe "
                                         f"(it observes {sorted(self.shapes)})")
        for key, shape in self.shapes.items():
            srcs = self.spec.sources[key]
            if len(shape) == 3:
                if shape[2] != 3 or len(srcs) != 1 or not isinstance(srcs[0], ImageSource):
                    raise ObservationConfigError(f"observation {key!r} is an image {shape}: it needs (H, W, 3) and exactly one "
                                                 f"image source, got {len(srcs)} source(s) {[type(s).__name__ for s in srcs]}")
                continue
            if len(shape) != 1 or any(isinstance(s, ImageSource) for s in srcs):
                raise ObservationConfigError(f"observation {key!r} has shape {shape}: vector keys take joint_state/array sources, "
                                             "image keys (H, W, 3) one image source")
            total = sum(s.size for s in srcs)
            if total != shape[0]:
                parts = " + ".join(f"{s.size} ({s.topic})" for s in srcs)
                raise ObservationConfigError(f"observation {key!r}: sources give {parts} = {total} values, the policy expects {shape[0]}")
        self.ranges = {}
        for key, (lo, hi) in (ranges or {}).items():
            if key not in self.shapes or len(self.shapes[key]) != 1:
                raise ObservationConfigError(f"ranges given for {key!r}, which is not a vector the policy observes")
            lo, hi = (np.broadcast_to(np.asarray(x, dtype=np.float64), (self.shapes[key][0],)) for x in (lo, hi))
            self.ranges[key] = (lo, hi)
        self.kinds = self.spec.topics()
        self._lock = threading.Lock()
        # topic -> (name index, fields, stamp, fault); fault: None or (kind, reason) the message was refused for
        self._joint: dict[str, tuple[dict[str, int], dict[str, np.ndarray], float, tuple[str, str] | None]] = {}
        self._array: dict[str, tuple[np.ndarray, float, tuple[str, str] | None]] = {}
        self._image: dict[str, tuple[np.ndarray | None, float, str]] = {}  # topic -> (HWC uint8 | None, stamp, error)
        self._image_size = {srcs[0].topic: tuple(self.shapes[k][:2]) for k, srcs in self.spec.sources.items()
                            if len(self.shapes[k]) == 3}
        self._history: collections.deque[dict[str, np.ndarray]] = collections.deque(maxlen=self.obs_horizon)
        self.task_id: int | None = None
        self.set_task_id(task_id)
        self._instruction: np.ndarray | None = None

    # ---------------------------------------------------------------- inputs
    def set_task_id(self, task_id: int | None) -> None:
        if task_id is not None and task_id < 0:
            task_id = None
        if self.num_tasks == 0 and task_id is not None:
            raise ObservationConfigError(f"task_id {task_id} given, but the policy is single-task (num_tasks=0)")
        if task_id is not None and not 0 <= task_id < self.num_tasks:
            raise ObservationConfigError(f"task_id must be in [0, {self.num_tasks}), got {task_id}")
        self.task_id = task_id

    def set_instruction(self, features: np.ndarray | None) -> None:
        """The current instruction's features (the bundle's language input, see ``instruction_encoder``);
        None: no instruction (samples are invalid)."""
        if self.language is None:
            raise ObservationConfigError("this policy is not language-conditioned: it takes no instruction")
        if features is not None:
            features = np.asarray(features)
            if features.shape != self.language[1]:
                raise ObservationConfigError(f"instruction features have shape {features.shape}, "
                                             f"the policy's {self.language[0]!r} is {self.language[1]}")
            if features.dtype.kind == "f" and not np.isfinite(features).all():
                raise ObservationConfigError("instruction features have non-finite values")
        with self._lock:
            self._instruction = None if features is None else features.copy()

    def update_joint_state(self, topic: str, names: Sequence[str], fields: Mapping[str, Sequence[float]],
                           stamp: float | None = None, fault: tuple[str, str] | None = None) -> None:
        """A JointState's contents: joint names and field name -> values (position/velocity/effort, may be empty).
        ``fault``: (kind, reason) the caller refuses this message for (samples are invalid until the next one)."""
        self._check_kind(topic, "joint_state")
        index = {n: i for i, n in enumerate(names)}
        if fault is None and len(index) != len(names):
            dup = sorted({n for n in names if list(names).count(n) > 1})
            fault = ("obs_duplicate_joint", f"{topic} names joints {_clip(dup)} more than once")
        values = {f: np.asarray(fields.get(f, ()), dtype=np.float64) for f in JOINT_FIELDS}
        with self._lock:
            self._joint[topic] = (index, values, self.clock() if stamp is None else stamp, fault)

    def update_array(self, topic: str, data: Sequence[float], stamp: float | None = None,
                     fault: tuple[str, str] | None = None) -> None:
        self._check_kind(topic, "array")
        with self._lock:
            self._array[topic] = (np.asarray(data, dtype=np.float64), self.clock() if stamp is None else stamp, fault)

    def update_image(self, topic: str, encoding: str, height: int, width: int, step: int, data: bytes | Sequence[int],
                     stamp: float | None = None, fault: tuple[str, str] | None = None) -> None:
        """A sensor_msgs/Image's fields; decoded here (not at sample time) to (H, W, 3) RGB at the policy's size."""
        self._check_kind(topic, "image")
        try:
            if encoding not in IMAGE_ENCODINGS:
                raise ValueError(f"encoding {encoding!r} is not supported (use one of {sorted(IMAGE_ENCODINGS)})")
            channels, order = IMAGE_ENCODINGS[encoding]
            buf = np.frombuffer(bytes(data), dtype=np.uint8)
            if height < 1 or width < 1 or step < width * channels or buf.size < step * height:
                raise ValueError(f"{width}x{height} {encoding} with step {step} needs {step * height} bytes, got {buf.size}")
            rows = buf[: step * height].reshape(height, step)[:, : width * channels].reshape(height, width, channels)
            frame, error = self._fit(topic, np.ascontiguousarray(rows[..., order])), ""
        except ValueError as e:
            frame, error = None, str(e)
        self._store_image(topic, frame, error, stamp, fault)

    def update_compressed_image(self, topic: str, fmt: str, data: bytes | Sequence[int], stamp: float | None = None,
                                fault: tuple[str, str] | None = None) -> None:
        """A sensor_msgs/CompressedImage's format and bytes (JPEG or PNG), decoded here."""
        import io

        from PIL import Image, UnidentifiedImageError

        self._check_kind(topic, "compressed_image")
        try:
            with Image.open(io.BytesIO(bytes(data))) as im:
                frame, error = self._fit(topic, np.asarray(im.convert("RGB"))), ""
        except (UnidentifiedImageError, OSError, ValueError) as e:
            frame, error = None, f"cannot decode the {_clip(fmt) if fmt else 'unnamed'} compressed image: {e}"
        self._store_image(topic, frame, error, stamp, fault)

    def _fit(self, topic: str, frame: np.ndarray) -> np.ndarray:
        """(h, w, 3) uint8 -> the policy's (H, W, 3): resized when the aspect ratios agree within 2%."""
        H, W = self._image_size[topic]
        h, w = frame.shape[:2]
        if (h, w) == (H, W):
            return frame
        if abs((w / h) / (W / H) - 1) > 0.02:
            raise ValueError(f"frame is {w}x{h}, the policy expects {W}x{H}: the aspect ratios differ; "
                             "crop or configure the camera")
        from PIL import Image

        return np.asarray(Image.fromarray(frame).resize((W, H), Image.BILINEAR))

    def _store_image(self, topic: str, frame: np.ndarray | None, error: str, stamp: float | None,
                     fault: tuple[str, str] | None = None) -> None:
        if fault is not None:
            frame, error = None, fault
        elif frame is None:
            error = ("obs_bad_image", f"{topic}: {error}")
        with self._lock:
            self._image[topic] = (frame, self.clock() if stamp is None else stamp, error)

    def _check_kind(self, topic: str, kind: str) -> None:
        if self.kinds.get(topic) != kind:
            raise ValueError(f"topic {topic} is not configured as a {kind} source (configured: {self.kinds})")

    # ---------------------------------------------------------------- outputs
    def _read(self, src: Source) -> tuple[np.ndarray | None, float | None, tuple[str, str] | None]:
        """(values, stamp, None) or (None, None, (kind, reason))."""
        if src.topic not in {ImageSource: self._image, ArraySource: self._array}.get(type(src), self._joint):
            return None, None, ("stale_obs", f"no message yet on {src.topic}")
        if isinstance(src, ImageSource):
            frame, stamp, error = self._image[src.topic]
            return (frame, stamp, None) if frame is not None else (None, None, error)
        if isinstance(src, ArraySource):
            data, stamp, fault = self._array[src.topic]
            if fault is not None:
                return None, None, fault
            if data.shape != (src.size,):
                return None, None, ("obs_wrong_length", f"{src.topic} has {data.size} values, expected {src.size}")
            return data, stamp, None
        index, values, stamp, fault = self._joint[src.topic]
        if fault is not None:
            return None, None, fault
        if missing := [n for n in src.names if n not in index]:
            return None, None, ("obs_missing_joint", f"joints {missing} missing from {src.topic} (it names {_clip(sorted(index))})")
        vals = values[src.field]
        if vals.size != len(index):
            return None, None, ("obs_wrong_length", f"{src.topic} has {vals.size} {src.field} values for {len(index)} joint names")
        return vals[[index[n] for n in src.names]], stamp, None

    def _check_values(self, key: str, vec: np.ndarray) -> tuple[str, str] | None:
        """(kind, reason) when the float32 vector of ``key`` is non-finite or out of its range, else None."""
        if (bad := np.flatnonzero(~np.isfinite(vec))).size:
            return "obs_non_finite", f"observation {key!r}: non-finite values at {self._where(key, bad)} as float32"
        if key in self.ranges:
            lo, hi = self.ranges[key]
            if (bad := np.flatnonzero((vec < lo) | (vec > hi))).size:
                i = int(bad[0])
                return "obs_out_of_range", (f"observation {key!r}: values outside the training range (with margin) at "
                                            f"{self._where(key, bad)}; e.g. {float(vec[i]):.4g} not in [{lo[i]:.4g}, {hi[i]:.4g}]")
        return None

    def _where(self, key: str, idx: np.ndarray) -> str:
        """Indices of key's vector -> 'indices [..] (topic a: [..], topic b: [..])' naming each source."""
        parts, start = [], 0
        for src in self.spec.sources[key]:
            local = [int(i) - start for i in idx if start <= i < start + src.size]
            if local:
                names = [src.names[i] for i in local] if isinstance(src, JointStateSource) else local
                parts.append(f"{src.topic}: {_clip(names)}")
            start += src.size
        return f"indices {_clip(idx.tolist())} ({'; '.join(parts)})"

    def current(self) -> Sample:
        """The latest messages assembled into vectors; nothing is added to the history."""
        vectors, stamps = {}, []
        with self._lock:
            for key, srcs in self.spec.sources.items():
                parts = []
                for src in srcs:
                    vals, stamp, fault = self._read(src)
                    if vals is None:
                        return Sample(False, None, f"observation {key!r}: {fault[1]}", kind=fault[0])
                    parts.append(vals)
                    stamps.append(stamp)
                if len(self.shapes[key]) == 3:  # an image: one source, already uint8 (H, W, 3)
                    vectors[key] = parts[0]
                    continue
                with np.errstate(over="ignore"):  # checked after the cast: what the policy would get
                    vec = np.concatenate(parts).astype(np.float32)
                if (fault := self._check_values(key, vec)) is not None:
                    return Sample(False, None, fault[1], kind=fault[0])
                vectors[key] = vec
        if self.num_tasks and self.task_id is None:
            return Sample(False, None, "multi-task policy and no task chosen: set task_id or publish a task name as instruction",
                          kind="obs_no_task")
        if self.language is not None and self._instruction is None:
            return Sample(False, None, "language-conditioned policy and no instruction yet: publish one on the instruction topic",
                          kind="obs_no_instruction")
        return Sample(True, min(stamps), "", vectors)

    def sample(self) -> Sample:
        """``current()``; a valid sample is appended to the history (filling it after a reset)."""
        s = self.current()
        if s.valid:
            assert s.vectors is not None
            with self._lock:
                if not self._history:
                    self._history.extend([s.vectors] * self.obs_horizon)
                else:
                    self._history.append(s.vectors)
        return s

    def joint_values(self, names: Sequence[str], field: str = "position") -> np.ndarray | None:
        """Latest ``field`` values of these joints from the first joint_state topic naming them all (None: none yet)."""
        with self._lock:
            for index, values, _, fault in self._joint.values():
                vals = values[field]
                if fault is not None:
                    continue
                if all(n in index for n in names) and vals.size == len(index):
                    out = vals[[index[n] for n in names]]
                    if np.isfinite(out).all():
                        return out.copy()
        return None

    def reset(self) -> None:
        """Forget the history (a new episode); the latest messages are kept."""
        with self._lock:
            self._history.clear()

    @property
    def history_len(self) -> int:
        with self._lock:
            return len(self._history)

    def observation(self) -> dict[str, torch.Tensor]:
        """The history as the policy's observation dict (see the module docstring)."""
        with self._lock:
            if not self._history:
                raise RuntimeError("no valid observation sampled since the last reset")
            hist = list(self._history)
            task_id = self.task_id
            instruction = self._instruction
        obs = {k: torch.from_numpy(np.stack([h[k] for h in hist]))[None] for k in self.shapes}
        if self.num_tasks:
            obs["task_id"] = torch.tensor([task_id], dtype=torch.long)
        if self.language is not None and instruction is not None:
            obs[self.language[0]] = torch.from_numpy(np.stack([instruction] * len(hist)))[None]
        return obs


def _clip(x: Any, n: int = 200) -> str:
    """``str(x)`` cut to ``n`` characters (echoed input never makes a long log line)."""
    s = x if isinstance(x, str) else repr(x)
    return s if len(s) <= n else f"{s[:n]}... ({len(s)} chars)"


def sources_json(config: Mapping[str, Any]) -> str:
    """A sources config as the JSON string the ROS node takes (``observation_sources`` parameter)."""
    ObservationSpec.from_config(config)  # fail here, not on the robot
    return json.dumps(config)


__all__ = ["ArraySource", "ImageSource", "JointStateSource", "ObservationBuilder", "ObservationConfigError", "ObservationSpec", "Sample",
           "ranges_from_normalizer", "sources_json"]
