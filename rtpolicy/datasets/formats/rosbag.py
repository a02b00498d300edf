"""ROS 2 bags (rosbag2, sqlite3 ``.db3`` or MCAP ``.mcap`` storage) -> episodes at a fixed control rate.

Read with the pure-Python ``rosbags`` library (no ROS install). The topic-to-key mapping is the deploy node's
``observation_sources`` specification (``rtpolicy.deploy.observation``), with the action as one more key, so
what the robot recorded and what the deployed policy reads are assembled by the same ``ObservationBuilder``
(``sources`` may also be the node's ``observation_sources`` parameter as it is, a JSON string)::

    sources = {"state":  [{"joint_state": {"topic": "/joint_states", "names": ["j1", "j2"]}},
                          {"array": {"topic": "/object_state", "size": 3}}],
               "rgb_top": [{"image": {"topic": "/camera/image_raw"}}],
               "action": [{"array": {"topic": "/teleop/cmd", "size": 6}}]}   # TwistStamped -> 6 values

An ``array`` source takes any message holding numbers: ``*MultiArray`` (``data``), ``Float64``/``Float32``,
``Twist``/``TwistStamped`` (linear xyz, angular xyz), ``Pose``/``PoseStamped`` (position xyz, orientation
xyzw), ``Vector3``/``Point`` (xyz, also stamped). For these fixed layouts a smaller ``size`` takes the leading
values (a Twist source of size 3 is its linear xyz: Meta-World's hand delta); a MultiArray must match ``size``.

Alignment (``rate`` Hz, ``max_age`` s): ticks run every 1/rate s from the bag's first message. At each tick a
key holds the latest message of each of its topics received at or before the tick (previous sample, never an
interpolation or a future message); a tick without a message no older than ``max_age`` from every source is a
gap. A message that does not assemble (a NaN/Inf value, a wrong size, a configured joint missing) inside an
episode is an error naming the bag, the episode, the key and the topic.

``tick_on`` (a list of topics, e.g. the action's): instead of every 1/rate s, a tick comes each time every one of
these topics has a new message since the last tick, at that message's time: one row per command of a teleoperator,
paired with the observation it responded to, whatever the phase of the recording (``rtpolicy record
sample_on=action`` does the same on the robot); an episode marker then also forgets the messages before it.
``rate`` then only sets the default ``max_age`` and the fps.

Episodes (``split``): ``gap`` (default for one bag): each run of valid ticks is an episode; ``bag`` (default for
a folder of bags): each bag is one episode (leading/trailing invalid ticks trimmed, a gap inside is an error);
``topic``: ``episode_topic`` delimits episodes (std_msgs/Bool true starts, false ends one; any other message
type marks a boundary), a gap inside is an error; an episode a Bool ``true`` opened and no ``false`` closed
before the next ``true`` or the end of the bag was cut off or discarded (``rtpolicy record`` stopped mid-episode,
or it missed the episode's start) and is dropped. Episodes shorter than ``min_length`` ticks are dropped.
Time is the bag's receive (log) time, or with ``stamp: header`` the messages' header stamps; stamps that go
back in time on a topic are an error naming the bag and topic.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rtpolicy.datasets.formats.base import (
    FORMATS,
    EpisodeSource,
    Format,
    FormatError,
    check_episode,
    concat_features,
    map_keys,
)

SPLITS = ("gap", "bag", "topic")


def _rosbags():
    try:
        from rosbags.highlevel import AnyReader
        from rosbags.typesys import Stores, get_typestore
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("ROS 2 bags need rosbags: pip install 'rtpolicy[formats]'") from e
    return AnyReader, get_typestore(Stores.ROS2_JAZZY)


def _is_bag(p: Path) -> bool:
    return (p.is_dir() and (p / "metadata.yaml").is_file()) or (p.is_file() and p.suffix in (".mcap", ".db3"))


def find_bags(path: Path) -> list[Path]:
    """The bags at ``path``: itself, or the bags directly inside a folder (sorted by name)."""
    if _is_bag(path):
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if _is_bag(p))
    return []


def _xyz(v) -> list[float]:
    return [v.x, v.y, v.z]


def message_numbers(msg: Any, msgtype: str, where: str, size: int | None = None) -> np.ndarray:
    """The numbers an ``array`` source of ``size`` values reads from a message (see the module docstring)."""
    values = _numbers(msg, msgtype, where)
    name = msgtype.rsplit("/", 1)[-1]
    if size is not None and size < values.size and not name.endswith("MultiArray"):
        return values[:size]
    return values


def _numbers(msg: Any, msgtype: str, where: str) -> np.ndarray:
    name = msgtype.rsplit("/", 1)[-1]
    if name.endswith("MultiArray"):
        return np.asarray(msg.data, dtype=np.float64).reshape(-1)
    if name in ("Float64", "Float32", "Int64", "Int32"):
        return np.asarray([msg.data], dtype=np.float64)
    for field in ("twist", "pose", "vector", "point"):  # the stamped variants
        if name.endswith("Stamped") and hasattr(msg, field):
            msg, name = getattr(msg, field), name.removesuffix("Stamped")
            break
    if name == "Twist":
        return np.asarray(_xyz(msg.linear) + _xyz(msg.angular))
    if name == "Pose":
        o = msg.orientation
        return np.asarray(_xyz(msg.position) + [o.x, o.y, o.z, o.w])
    if name in ("Vector3", "Point"):
        return np.asarray(_xyz(msg))
    raise FormatError(f"{where}: an array source cannot read numbers from a {msgtype} message")


_KIND_TYPES = {"joint_state": ("sensor_msgs/msg/JointState",), "image": ("sensor_msgs/msg/Image",),
               "compressed_image": ("sensor_msgs/msg/CompressedImage",)}


@FORMATS.register("rosbag")
class RosbagFormat(Format):
    name = "rosbag"
    suffixes = (".mcap", ".db3")

    def detect(self, path: Path) -> bool:
        return bool(find_bags(path))

    def read(self, path: Path, keys: Mapping[str, Any] | None = None, sources: Mapping[str, Any] | None = None,
             rate: float = 10.0, max_age: float | None = None, split: str | None = None, episode_topic: str = "",
             stamp: str = "receive", min_length: int = 1, image_size: Mapping[str, Any] | None = None,
             tick_on: Any = None, **options: Any) -> EpisodeSource:
        from rtpolicy.deploy.observation import (
            ImageSource,
            ObservationConfigError,
            ObservationSpec,
        )

        where = str(path)
        if options:
            raise FormatError(f"{where}: unknown rosbag options {sorted(options)} (known: sources, rate, max_age, split, "
                              f"episode_topic, stamp, min_length, image_size, tick_on)")
        bags = find_bags(path)
        if not bags:
            raise FormatError(f"{where}: no rosbag2 bag here (a folder with metadata.yaml, a .mcap or .db3 file, or a folder of them)")
        if not sources:
            raise FormatError(f"{where}: a bag needs `sources`: our key -> the topics it is made of (the deploy node's "
                              f"observation_sources format, the action included)")
        try:
            if isinstance(sources, str):  # the deploy node's observation_sources parameter is a JSON string
                sources = json.loads(sources)
            spec = ObservationSpec.from_config(dict(sources))
            kinds = spec.topics()
        except (ObservationConfigError, json.JSONDecodeError, TypeError, ValueError) as e:
            raise FormatError(f"{where}: sources: {e}") from e
        rate = float(rate)
        if not math.isfinite(rate) or rate <= 0:
            raise FormatError(f"{where}: rate must be a positive number of Hz, got {rate}")
        max_age = 2.0 / rate if max_age is None else float(max_age)
        split = split or ("bag" if len(bags) > 1 else "gap")
        if split not in SPLITS:
            raise FormatError(f"{where}: split must be one of {list(SPLITS)}, got {split!r}")
        if split == "topic" and not episode_topic:
            raise FormatError(f"{where}: split 'topic' needs episode_topic")
        if stamp not in ("receive", "header"):
            raise FormatError(f"{where}: stamp must be 'receive' or 'header', got {stamp!r}")
        tick_on = [tick_on] if isinstance(tick_on, str) else list(tick_on or [])
        if bad := [t for t in tick_on if t not in kinds]:
            raise FormatError(f"{where}: tick_on topics {bad} are not among the sources' topics {sorted(kinds)}")
        shapes: dict[str, list[int]] = {}
        for key, srcs in spec.sources.items():
            if isinstance(srcs[0], ImageSource):
                size = (image_size or {}).get(key) or _first_image_size(bags, srcs[0].topic, kinds[srcs[0].topic], where)
                shapes[key] = [int(size[0]), int(size[1]), 3]
            else:
                shapes[key] = [sum(s.size for s in srcs)]
        mapping = map_keys(list(spec.sources), lambda k: k, keys, where)
        key_shapes = {}
        for ours, srcs in mapping.items():
            if len(srcs) == 1:
                key_shapes[ours] = (tuple(shapes[srcs[0]]), np.dtype(np.uint8 if len(shapes[srcs[0]]) == 3 else np.float32))
            else:
                key_shapes[ours] = ((sum(math.prod(shapes[s]) for s in srcs),), np.dtype(np.float32))
        cfg = {"spec": spec, "shapes": shapes, "kinds": kinds, "sizes": array_sizes(spec), "rate": rate, "max_age": max_age, "split": split,
               "episode_topic": episode_topic, "stamp": stamp, "tick_on": tick_on}

        def episodes():
            i = 0
            for bag in bags:
                for ep in _bag_episodes(bag, **cfg):
                    if len(next(iter(ep.values()))) < max(1, int(min_length)):
                        continue
                    out = {ours: concat_features([ep[s] for s in srcs], where, ours) for ours, srcs in mapping.items()}
                    check_episode(out, where, i)
                    i += 1
                    yield out

        attrs = {"source": "rosbag2", "bags": [b.name for b in bags], "sources": dict(sources), "rate": rate,
                 "max_age": max_age, "split": split}
        return EpisodeSource(key_shapes, episodes, where, None, attrs, rate)


def _open(bag: Path):
    AnyReader, typestore = _rosbags()
    try:
        reader = AnyReader([bag], default_typestore=typestore)
        reader.open()
    except Exception as e:  # rosbags raises several unrelated types for unreadable bags
        raise FormatError(f"{bag}: cannot open the bag ({type(e).__name__}: {e})") from e
    return reader


def _first_image_size(bags: list[Path], topic: str, kind: str, where: str) -> tuple[int, int]:
    """(H, W) of the first frame on an image topic."""
    for bag in bags:
        reader = _open(bag)
        try:
            conns = [c for c in reader.connections if c.topic == topic]
            for conn, _, raw in reader.messages(connections=conns):
                msg = reader.deserialize(raw, conn.msgtype)
                if kind == "image":
                    return int(msg.height), int(msg.width)
                import io

                from PIL import Image

                with Image.open(io.BytesIO(bytes(msg.data))) as im:
                    return im.height, im.width
        finally:
            reader.close()
    raise FormatError(f"{where}: image topic {topic} has no messages in any bag")


def array_sizes(spec) -> dict[str, int]:
    """Topic -> the values its ``array`` sources read (the largest, when several keys read one topic)."""
    from rtpolicy.deploy.observation import ArraySource

    out: dict[str, int] = {}
    for srcs in spec.sources.values():
        for s in srcs:
            if isinstance(s, ArraySource):
                out[s.topic] = max(out.get(s.topic, 0), s.size)
    return out


def _bag_episodes(bag: Path, spec, shapes, kinds, sizes, rate, max_age, split, episode_topic, stamp, tick_on):
    """Episodes {key: (L, *shape)} of one bag (see the module docstring)."""
    from rtpolicy.deploy.observation import ObservationBuilder

    reader = _open(bag)
    try:
        by_topic = {c.topic: c for c in reader.connections}
        if missing := [t for t in kinds if t not in by_topic]:
            raise FormatError(f"{bag}: topic(s) {missing} are not in the bag (it has {sorted(by_topic)})")
        for t, kind in kinds.items():
            if kind in _KIND_TYPES and by_topic[t].msgtype not in _KIND_TYPES[kind]:
                raise FormatError(f"{bag}: topic {t} carries {by_topic[t].msgtype}, a {kind} source needs {_KIND_TYPES[kind][0]}")
        if split == "topic" and episode_topic not in by_topic:
            raise FormatError(f"{bag}: episode_topic {episode_topic} is not in the bag (it has {sorted(by_topic)})")
        builder = ObservationBuilder(spec, shapes, obs_horizon=1, clock=lambda: 0.0)
        conns = [c for c in reader.connections if c.topic in kinds or c.topic == episode_topic]
        strict = split != "gap"
        last_stamp: dict[str, float] = {}
        rows: list[dict[str, np.ndarray]] = []
        episodes: list[list[dict[str, np.ndarray]]] = []
        active = split != "topic"
        gap: tuple[float, str] | None = None  # first invalid tick after the current episode's last valid one

        def end_episode():
            nonlocal rows, gap
            if rows:
                episodes.append(rows)
            rows, gap = [], None

        def tick(t: float):
            nonlocal gap
            s = builder.current()
            if not s.valid and s.kind != "stale_obs" and active:  # bad data (NaN/Inf, wrong sizes, missing joints), not a gap
                raise FormatError(f"{bag}: episode {len(episodes)}, tick at {t:.3f} s: {s.reason}")
            if s.valid and t - s.stamp <= max_age + 1e-9:
                if not active:
                    return
                if gap is not None and rows:
                    raise FormatError(f"{bag}: a gap inside episode {len(episodes)} at {gap[0]:.3f} s ({gap[1]}); "
                                      f"use split: gap, a larger max_age, or fix the recording")
                rows.append({k: np.array(v) for k, v in s.vectors.items()})
                return
            if rows and not strict:
                end_episode()
            elif rows and gap is None:
                gap = (t, s.reason if not s.valid else f"a source is {t - s.stamp:.3f} s old, max_age is {max_age} s")

        t0, k, t_last, bool_markers = None, 0, -math.inf, False
        fresh: set[str] = set()  # tick_on topics heard since the last tick
        for conn, log_ns, raw in reader.messages(connections=conns):
            msg = reader.deserialize(raw, conn.msgtype)
            t = log_ns * 1e-9
            if stamp == "header" and hasattr(msg, "header"):
                t = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
            if t < last_stamp.get(conn.topic, -math.inf):
                raise FormatError(f"{bag}: topic {conn.topic}: timestamps go back in time ({last_stamp[conn.topic]:.6f} s "
                                  f"then {t:.6f} s)")
            last_stamp[conn.topic] = t
            t0 = t if t0 is None else t0
            while not tick_on and t0 + k / rate < t - 1e-9:  # ticks before this message see the messages so far
                tick(t0 + k / rate)
                k += 1
            t_last = max(t_last, t)
            if conn.topic == episode_topic:
                if bool_markers and active and conn.msgtype == "std_msgs/msg/Bool" and msg.data:
                    rows = []  # opened by true and never closed by false: not an episode
                end_episode()
                fresh.clear()
                if tick_on:  # a new episode pairs commands only with observations heard after its start
                    builder = ObservationBuilder(spec, shapes, obs_horizon=1, clock=lambda: 0.0)
                bool_markers = conn.msgtype == "std_msgs/msg/Bool"
                active = bool(msg.data) if bool_markers else True
                continue
            feed_message(builder, kinds[conn.topic], conn.topic, msg, conn.msgtype, t, f"{bag}: topic {conn.topic}",
                         sizes.get(conn.topic))
            if conn.topic in tick_on:
                fresh.add(conn.topic)
                if len(fresh) == len(tick_on):
                    fresh.clear()
                    tick(t)
        while not tick_on and t0 is not None and t0 + k / rate <= t_last + 1e-9:
            tick(t0 + k / rate)
            k += 1
        if bool_markers and active:  # opened by true, never closed: a recording cut off mid-episode
            rows = []
        end_episode()
    finally:
        reader.close()
    for ep in episodes:
        yield {k: np.stack([r[k] for r in ep]) for k in shapes}


def feed_message(builder, kind: str, topic: str, msg, msgtype: str, t: float, where: str, size: int | None = None) -> None:
    """One message (rosbags' or rclpy's: the fields are the same) -> ``builder`` as received at ``t``."""
    if kind == "joint_state":
        builder.update_joint_state(topic, list(msg.name), {"position": msg.position, "velocity": msg.velocity,
                                                           "effort": msg.effort}, stamp=t)
    elif kind == "array":
        builder.update_array(topic, message_numbers(msg, msgtype, where, size), stamp=t)
    elif kind == "image":
        builder.update_image(topic, msg.encoding, int(msg.height), int(msg.width), int(msg.step), bytes(msg.data), stamp=t)
    else:
        builder.update_compressed_image(topic, msg.format, bytes(msg.data), stamp=t)
