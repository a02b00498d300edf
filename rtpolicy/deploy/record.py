"""Record demonstrations on the robot: observation sources + teleoperated commands -> zarr, one episode at a time.

    rtpolicy record output=demos.zarr observation_sources='{"state": [...]}' \\
        action_sources='{"action": [{"array": {"topic": "/rtpolicy/cmd_twist", "size": 3}},
                                    {"array": {"topic": "/rtpolicy/cmd_gripper", "size": 1}}]}' \\
        message_types='{"/rtpolicy/cmd_twist": "geometry_msgs/msg/TwistStamped"}' [bag=demos.mcap] [--ros-args ...]

``observation_sources`` is the deploy node's parameter as it is (``rtpolicy.deploy.observation``), so what is
recorded is what the deployed policy will read, assembled by the same ``ObservationBuilder``;
``action_sources`` has the same form (the commanded action as one more key, e.g. a teleoperation topic).
An ``array`` source subscribes to std_msgs/Float64MultiArray unless ``message_types`` names another type
(TwistStamped, Twist, PoseStamped, Float64, ...; read as in ``rtpolicy.datasets.formats.rosbag``: a Twist
source of size 3 is its linear xyz).

Each control tick of an open episode appends one row {key: (*shape)}: the latest message of every source,
when all are at most ``max_age_s`` old (at the tick; with sample_on=action, when the command was sent) and assemble (joints present, sizes right, finite); other ticks are
skipped and counted (``gaps`` in the episode's record). A new episode uses only messages received after it
started (a reset robot's old state never opens it). Ticks (``sample_on``):
    timer    every 1/``control_rate_hz`` s on a steady timer. A recorder sampling at a fixed rate next to a
             robot and a teleoperator running at the same rate pairs each observation with the command
             answering it or with the one before, depending on the three clocks' phases.
    action   one row per message on the first action topic (a command), by publish time (the RMW's source
             timestamps): the other action topics' messages sent with it (closest in time), and each
             observation topic's last message sent before it, i.e. the observation it answered. A teleoperator
             publishing one command per observation at the control rate gives one row per control step,
             whatever the phases and the order the messages are handled in. A command's row is made once every
             topic has moved past it (or after max_age_s). ``rtpolicy-convert`` reads a bag (logged at publish
             time) alike with ``--options '{..., "tick_on": [<action topics>]}'``.

Episodes (std_msgs/Bool true on ``episode_topic`` starts one, false ends it; std_msgs/String ``episode`` on
``reset_topic`` ends the open one and starts the next, which is what ``rtpolicy sim`` publishes at each
episode end and what the deploy node listens to; the ``recording`` parameter does the same as the Bool,
``ros2 param set /rtpolicy_record recording true|false``, through the node's parameter service):
the rows of an ended episode are appended to the zarr store ``output`` with ``ReplayBuffer.add_episode``
(data first, ``meta/episode_ends`` last, the episode's record in the store attrs just before), so a recorder
killed at any moment leaves the store at its last complete episode. An episode open at shutdown, shorter
than ``min_length`` rows, or begun before the recorder was connected to every source (more than ``max_age_s``
before the subscription matched a publisher and before the topic's first message: discovery still going, a
node started late; only for an episode a reset or Bool started, whose start the robot announced) is discarded,
with a warning naming the topic; in the bag it is left unended, so conversion drops it too. ``max_episodes`` > 0
exits after that many episodes.

``bag``: also write every message of the sources, as received (serialized, receive time), into a rosbag2 bag
(``bag_storage`` mcap or sqlite3, written with ``rosbags``), with a std_msgs/Bool on ``episode_topic`` at
each start (true) and end (false); written beside and renamed into place when the recorder stops. Convert it
with the same sources::

    rtpolicy-convert demos.mcap demos.zarr --option sources=... --option rate=20 --option split=topic \\
        --option episode_topic=/rtpolicy/record/episode
"""

from __future__ import annotations

import collections
import importlib
import json
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from rcl_interfaces.msg import SetParametersResult
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.node import Node
from rclpy.qos import (
    QoSDurabilityPolicy,
    QoSHistoryPolicy,
    QoSProfile,
    QoSReliabilityPolicy,
)
from rclpy.serialization import deserialize_message
from std_msgs.msg import Bool, String

from rtpolicy.deploy import rosparams
from rtpolicy.deploy.observation import (
    ImageSource,
    ObservationBuilder,
    ObservationConfigError,
    ObservationSpec,
)

NODE_NAME = "rtpolicy_record"
COMMAND_QOS = QoSProfile(history=QoSHistoryPolicy.KEEP_LAST, depth=10, reliability=QoSReliabilityPolicy.RELIABLE,
                         durability=QoSDurabilityPolicy.VOLATILE)
# best effort matches reliable and best-effort publishers alike; a bag wants every message, so keep some
SOURCE_QOS = QoSProfile(history=QoSHistoryPolicy.KEEP_LAST, depth=50, reliability=QoSReliabilityPolicy.BEST_EFFORT,
                        durability=QoSDurabilityPolicy.VOLATILE)
KIND_TYPES = {"joint_state": "sensor_msgs/msg/JointState", "image": "sensor_msgs/msg/Image",
              "compressed_image": "sensor_msgs/msg/CompressedImage", "array": "std_msgs/msg/Float64MultiArray"}
BAG_STORAGES = ("mcap", "sqlite3")
SAMPLE_ON = ("timer", "action")
RECENT = 32  # messages kept per topic to find the one a command answered

PARAMETERS: dict[str, tuple[Any, str]] = {
    "output": ("", "zarr store the episodes are appended to (created if absent); '' = none (bag only)"),
    "observation_sources": ("", "JSON, the deploy node's observation_sources (see rtpolicy.deploy.observation)"),
    "action_sources": ("", 'JSON, the same form for the commanded action, e.g. {"action": [{"array": {"topic": ..., "size": 4}}]}'),
    "message_types": ("", 'JSON {topic: "pkg/msg/Type"} for array topics that are not std_msgs/msg/Float64MultiArray'),
    "image_size": ("", 'JSON {image key: [H, W]}; a key not named keeps the size of its first frame'),
    "control_rate_hz": (20.0, "sample_on=timer: rows per second of an open episode; the store's fps"),
    "sample_on": ("timer", "timer: a row every control period | action: a row per command (message of the first action topic)"),
    "max_age_s": (0.0, "a tick whose oldest source is older than this is skipped; 0: two control periods"),
    "recording": (False, "true: an episode is open (set it to start/end one; true at launch starts the first at once)"),
    "episode_topic": ("/rtpolicy/record/episode", "std_msgs/Bool in: true starts an episode, false ends it"),
    "reset_topic": ("/rtpolicy/reset", "std_msgs/String in: 'episode' ends the open episode and starts the next"),
    "max_episodes": (0, "exit after this many recorded episodes; 0: never"),
    "min_length": (2, "episodes with fewer rows are discarded"),
    "bag": ("", "also write the raw messages into this rosbag2 bag (a new path); '' = no bag"),
    "bag_storage": ("mcap", f"bag storage: {' | '.join(BAG_STORAGES)}"),
}


def _message_class(msgtype: str):
    pkg, kind, name = (msgtype.split("/") + ["", ""])[:3]
    try:
        return getattr(importlib.import_module(f"{pkg}.{kind}"), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"message type {msgtype!r} is not importable here (pkg/msg/Type): {e}") from e


def _json(name: str, text: str, default: Any) -> Any:
    if not text.strip():
        return default
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"parameter {name}: not valid JSON ({e})") from e


class RecorderNode(Node):
    """See the module docstring. One single-threaded executor: callbacks and ticks never overlap."""

    def __init__(self, overrides: dict[str, Any] | None = None, node_name: str = NODE_NAME, **kwargs: Any):
        super().__init__(node_name, parameter_overrides=rosparams.parameter_overrides(overrides, PARAMETERS), **kwargs)
        rosparams.declare(self, PARAMETERS)
        self.p = p = rosparams.values(self, PARAMETERS)
        if not p["output"] and not p["bag"]:
            raise ValueError("give output=STORE.zarr and/or bag=PATH: there is nowhere to record to")
        if not p["control_rate_hz"] > 0 or p["max_episodes"] < 0 or p["min_length"] < 1:
            raise ValueError(f"need control_rate_hz > 0, max_episodes >= 0, min_length >= 1; got {p['control_rate_hz']}, "
                             f"{p['max_episodes']}, {p['min_length']}")
        obs = _json("observation_sources", p["observation_sources"], None)
        act = _json("action_sources", p["action_sources"], None)
        if not isinstance(obs, dict) or not obs or not isinstance(act, dict) or not act:
            raise ValueError("observation_sources and action_sources must both be JSON objects {key: [sources]}")
        if both := sorted(set(obs) & set(act)):
            raise ValueError(f"keys {both} are in both observation_sources and action_sources")
        try:
            self.spec = ObservationSpec.from_config({**obs, **act})
            self.kinds = self.spec.topics()
        except ObservationConfigError as e:
            raise ValueError(str(e)) from e
        types = _json("message_types", p["message_types"], {})
        if not isinstance(types, dict) or (bad := sorted(set(types) - {t for t, k in self.kinds.items() if k == "array"})):
            raise ValueError(f"message_types names topics that are no array source: {bad if isinstance(types, dict) else types}")
        self.msgtypes = {t: types.get(t, KIND_TYPES[k]) if k == "array" else KIND_TYPES[k] for t, k in self.kinds.items()}
        self.classes = {t: _message_class(mt) for t, mt in self.msgtypes.items()}
        from rtpolicy.datasets.formats.rosbag import array_sizes

        self.sizes = array_sizes(self.spec)
        sizes = _json("image_size", p["image_size"], {})
        self.image_keys = {k: s[0].topic for k, s in self.spec.sources.items() if isinstance(s[0], ImageSource)}
        if not isinstance(sizes, dict) or (bad := sorted(set(sizes) - set(self.image_keys))):
            raise ValueError(f"image_size names keys that are no image source: {bad if isinstance(sizes, dict) else sizes}")
        self.shapes: dict[str, list[int]] = {k: [sum(s.size for s in srcs)] for k, srcs in self.spec.sources.items()
                                             if k not in self.image_keys}
        self.shapes.update({k: [int(sizes[k][0]), int(sizes[k][1]), 3] for k in sizes})
        self.max_age = p["max_age_s"] or 2.0 / p["control_rate_hz"]
        if p["sample_on"] not in SAMPLE_ON:
            raise ValueError(f"sample_on must be one of {list(SAMPLE_ON)}, got {p['sample_on']!r}")
        self.action_topics = {s.topic for k in act for s in self.spec.sources[k]}
        self.trigger = self.spec.sources[next(iter(act))][0].topic  # sample_on=action: a message here is a command
        self._pending: collections.deque = collections.deque()  # publish ns of the commands awaiting their row
        self.buffer = None
        if p["output"]:
            from rtpolicy.datasets.replay_buffer import ReplayBuffer

            self.buffer = ReplayBuffer.open_or_create(p["output"])
            if self.buffer.n_episodes and set(self.buffer.keys) != set(self.spec.sources):
                raise ValueError(f"{p['output']} holds keys {self.buffer.keys}; these sources record {sorted(self.spec.sources)}")
        self.bag = self._open_bag() if p["bag"] else None
        self._recent: dict[str, collections.deque] = {}  # topic -> the last RECENT (publish ns, serialized message) of this episode
        self.boundary_ns, self.announced = 0, False
        self.builder: ObservationBuilder | None = None
        self.rows: list[dict[str, np.ndarray]] | None = None  # None: no episode open
        self.gaps = 0
        self.episodes = 0  # ended and handed to the writer by this node
        self.written = 0  # appended to the store
        self.discarded = 0
        self._writes: queue.Queue = queue.Queue()
        self._writer = threading.Thread(target=self._write_episodes, name="rtpolicy-record-writer", daemon=True)
        self._writer.start()
        self.started_at = 0.0
        # topic -> when the recorder was first connected to a publisher of it (ns): the matched event or the first
        # message's publish time, whichever came first; an episode that started before that misses its start
        self._connected: dict[str, int] = {}
        for topic, cls in self.classes.items():
            matched = SubscriptionEventCallbacks(matched=lambda st, t=topic: st.current_count and self._on_connected(t, time.time_ns()))
            self.create_subscription(cls, topic, lambda raw, info, t=topic: self._on_message(t, raw, info), SOURCE_QOS, raw=True,
                                     event_callbacks=matched)
        self.create_subscription(Bool, p["episode_topic"], lambda m, info: self._on_episode(m, info), COMMAND_QOS)
        self.create_subscription(String, p["reset_topic"], lambda m, info: self._on_reset(m, info), COMMAND_QOS)
        self.add_on_set_parameters_callback(self._on_parameters)
        # sample_on=action: the timer resolves commands left waiting (and wakes the executor, so signals are handled)
        self.create_timer(1.0 / p["control_rate_hz"], self._tick)
        if p["recording"]:
            self.start_episode()
        where = ", ".join(x for x in (p["output"] and f"store {p['output']}", p["bag"] and f"bag {p['bag']}") if x)
        self.get_logger().info(f"recording {sorted(self.spec.sources)} from {sorted(self.kinds)} at "
                               f"{p['control_rate_hz']:g} Hz into {where}")

    # ---------------------------------------------------------------- episodes
    def start_episode(self, boundary_ns: int | None = None) -> None:
        """Open an episode; only messages published at or after ``boundary_ns`` (default: now) go into it. One
        announced by a message (``boundary_ns`` given: a reset, a Bool) must be heard from its start on."""
        if self.rows is not None:
            return
        self.rows, self.gaps, self.started_at = [], 0, time.time()
        self.announced = boundary_ns is not None
        self.boundary_ns = time.time_ns() if boundary_ns is None else boundary_ns
        self._recent.clear()
        self._pending.clear()
        self._mark(True, self.boundary_ns)
        self.builder = None  # built at the first row with every image size known
        self.get_logger().info(f"episode {self.episodes} started")

    def end_episode(self, commit: bool = True, at_ns: int | None = None) -> None:
        """Close the open episode; when ``commit`` and long enough, the writer thread appends it to the store."""
        if self.rows is None:
            return
        self._resolve(flush=True)
        rows, self.rows = self.rows, None
        if not commit:
            why = "not ended"
        elif len(rows) < self.p["min_length"]:
            why = f"min_length {self.p['min_length']}"
        else:
            why = self._missed_start()
        if why:  # and in the bag an episode never ended is dropped on conversion
            self.discarded += 1
            self.get_logger().warning(f"episode discarded ({len(rows)} rows; {why})")
            return
        self._mark(False, time.time_ns() if at_ns is None else at_ns - 1)
        record = {"length": len(rows), "gaps": self.gaps, "start_time": self.started_at, "end_time": time.time()}
        self.episodes += 1
        self._writes.put((rows, record))
        if self.p["max_episodes"] and self.episodes >= self.p["max_episodes"]:
            self._writes.join()
            self.get_logger().info(f"{self.episodes} episodes recorded; exiting")
            raise SystemExit(0)  # out of the executor's spin; destroy_node closes the bag

    def _write_episodes(self) -> None:
        """Writer thread: one episode at a time, in order, so a commit never delays the next episode's ticks."""
        while True:
            item = self._writes.get()
            try:
                if item is None:
                    return
                rows, record = item
                if self.buffer is not None:
                    data = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
                    attrs = dict(self.buffer.attrs)
                    attrs.setdefault("fps", self.p["control_rate_hz"])
                    attrs.setdefault("record", {k: self.p[k] for k in ("observation_sources", "action_sources", "message_types",
                                                                        "control_rate_hz")} | {"max_age_s": self.max_age})
                    attrs["recorded_episodes"] = [*attrs.get("recorded_episodes", [])[: self.buffer.n_episodes], record]
                    self.buffer.add_episode(data, attrs=attrs)  # data, attrs, then meta/episode_ends: the commit
                self.get_logger().info(f"episode {self.written} recorded: {record}")
                self.written += 1
            except Exception as e:  # noqa: BLE001  a full disk, a store changed under us: said; the store keeps its last episode
                self.get_logger().error(f"episode not recorded: {type(e).__name__}: {e}")
            finally:
                self._writes.task_done()

    # ---------------------------------------------------------------- inputs
    def _on_message(self, topic: str, raw: bytes, info: dict | None = None) -> None:
        """Every source message: into the bag at once; kept (with its publish time) while an episode is open."""
        ts = _sent_ns(info)
        self._on_connected(topic, ts)
        if self.bag is not None:
            self.bag[0].write(self.bag[1][topic], ts, raw)
        if self.rows is None or ts < self.boundary_ns:
            return
        self._recent.setdefault(topic, collections.deque(maxlen=RECENT)).append((ts, raw))
        if self.p["sample_on"] != "action":
            return
        if topic == self.trigger:
            self._pending.append(ts)
        self._resolve()

    def _missed_start(self) -> str:
        """Why an announced episode misses its start (a source connected more than max_age_s after it), or ""."""
        if not self.announced:
            return ""
        late_ns = self.boundary_ns + int(self.max_age * 1e9)
        late = [f"{t} only {(ns - self.boundary_ns) * 1e-9:.2f} s after it began" for t in self.kinds
                if (ns := self._connected.get(t, self.boundary_ns)) > late_ns]
        return "its start is missing: the recorder was connected to " + ", ".join(late) if late else ""

    def _on_connected(self, topic: str, at_ns: int) -> None:
        self._connected[topic] = min(self._connected.get(topic, at_ns), at_ns)

    def _resolve(self, flush: bool = False) -> None:
        """sample_on=action: rows for the pending commands (messages of the first action topic) whose messages are
        known, oldest first. A command waits until every other topic has a message published after it (topics are
        delivered in order, so the ones it needs are in by then), until max_age_s has passed, or the episode ends.
        Its row: the command; the other action topics' messages published closest to it (sent together with it);
        every observation topic's latest message published before it (the observation it answered)."""
        now = time.time_ns()
        while self._pending:
            command_ns = self._pending[0]
            heard = all(t in self._recent and self._recent[t][-1][0] > command_ns for t in self.kinds if t != self.trigger)
            if not (heard or flush or now - command_ns > self.max_age * 1e9):
                return
            self._pending.popleft()
            chosen = {}
            for topic, recent in self._recent.items():
                if topic in self.action_topics:
                    chosen[topic] = min(recent, key=lambda m: abs(m[0] - command_ns))
                elif older := [m for m in recent if m[0] <= command_ns]:
                    chosen[topic] = older[-1]
            self._row(chosen, command_ns)

    def _on_episode(self, msg: Bool, info: dict | None = None) -> None:
        self.start_episode(_sent_ns(info)) if msg.data else self.end_episode()

    def _on_reset(self, msg: String, info: dict | None = None) -> None:
        if msg.data == "episode":
            t = _sent_ns(info)
            self.end_episode(at_ns=t)
            self.start_episode(t)

    def _on_parameters(self, params) -> SetParametersResult:
        for param in params:
            if param.name == "recording":
                try:
                    on = rosparams.coerce("recording", param.value, False)
                except ValueError as e:
                    return SetParametersResult(successful=False, reason=str(e))
                self.start_episode() if on else self.end_episode()
            elif param.name in PARAMETERS:
                return SetParametersResult(successful=False, reason=f"{param.name} is read at start only; only recording changes")
        return SetParametersResult(successful=True)

    # ---------------------------------------------------------------- rows
    def _tick(self) -> None:
        if self.rows is None:
            return
        if self.p["sample_on"] == "action":
            self._resolve()
        else:
            self._row()

    def _row(self, chosen: dict | None = None, command_ns: int | None = None) -> None:
        """One row from ``chosen`` (topic -> (publish ns, message); default: the latest message of every topic)."""
        if chosen is None:
            chosen = {topic: recent[-1] for topic, recent in self._recent.items()}
        if self.builder is None:
            if any(k not in self.shapes and t not in chosen for k, t in self.image_keys.items()):
                self.gaps += 1  # wait for the first frame of each camera (its size)
                return
            for key, topic in self.image_keys.items():
                if key not in self.shapes:
                    msg = deserialize_message(chosen[topic][1], self.classes[topic])
                    self.shapes[key] = list(_frame_size(msg, self.kinds[topic])) + [3]
            self.builder = ObservationBuilder(self.spec, self.shapes, obs_horizon=1, clock=time.time)
            self._fed = {}
        from rtpolicy.datasets.formats.rosbag import feed_message

        for topic, (ts, raw) in chosen.items():
            if self._fed.get(topic) != ts:  # each message decoded once
                msg = deserialize_message(raw, self.classes[topic])
                feed_message(self.builder, self.kinds[topic], topic, msg, self.msgtypes[topic], ts * 1e-9, f"topic {topic}",
                             self.sizes.get(topic))
                self._fed[topic] = ts
        s = self.builder.current()
        now = time.time() if command_ns is None else command_ns * 1e-9  # sample_on=action: the age when commanded
        if not s.valid or now - s.stamp > self.max_age:
            self.gaps += 1
            why = s.reason if not s.valid else f"a source is {now - s.stamp:.3f} s old, max_age_s is {self.max_age:g}"
            self.get_logger().warning(f"row skipped: {why}", throttle_duration_sec=2.0)
            return
        self.rows.append({k: np.array(v) for k, v in s.vectors.items()})

    # ---------------------------------------------------------------- bag
    def _open_bag(self):
        from rosbags.rosbag2 import StoragePlugin, Writer
        from rosbags.typesys import Stores, get_typestore

        from rtpolicy.datasets.formats.base import atomic_path

        storage = self.p["bag_storage"]
        if storage not in BAG_STORAGES:
            raise ValueError(f"bag_storage must be one of {list(BAG_STORAGES)}, got {storage!r}")
        dst = Path(self.p["bag"])
        if dst.exists():
            raise ValueError(f"bag {dst} already exists; give a new path")
        ctx = atomic_path(dst)
        tmp = ctx.__enter__()  # renamed onto dst when the node is destroyed
        typestore = get_typestore(Stores.ROS2_JAZZY)
        writer = Writer(tmp, version=9, storage_plugin={"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}[storage])
        writer.open()
        conns = {t: writer.add_connection(t, mt, typestore=typestore) for t, mt in self.msgtypes.items()}
        conns[self.p["episode_topic"]] = writer.add_connection(self.p["episode_topic"], "std_msgs/msg/Bool", typestore=typestore)
        marker = {v: typestore.serialize_cdr(typestore.types["std_msgs/msg/Bool"](data=v), "std_msgs/msg/Bool") for v in (True, False)}
        return writer, conns, marker, ctx

    def _mark(self, start: bool, at_ns: int) -> None:
        if self.bag is not None:
            writer, conns, marker, _ = self.bag
            writer.write(conns[self.p["episode_topic"]], at_ns, marker[start])

    def destroy_node(self) -> None:
        if self.rows is not None:
            self.end_episode(commit=False)
        self._writes.put(None)
        self._writer.join()
        if self.bag is not None:
            writer, _, _, ctx = self.bag
            self.bag = None
            writer.close()
            ctx.__exit__(None, None, None)
        super().destroy_node()


def _sent_ns(info: dict | None) -> int:
    """A message's publish time (the RMW's source timestamp, ns, system clock); now when the RMW gives none."""
    ts = (info or {}).get("source_timestamp") or 0
    return int(ts) if ts > 0 else time.time_ns()


def _frame_size(msg, kind: str) -> tuple[int, int]:
    if kind == "image":
        return int(msg.height), int(msg.width)
    import io

    from PIL import Image

    with Image.open(io.BytesIO(bytes(msg.data))) as im:
        return im.height, im.width


def main(argv: list[str] | None = None) -> int:
    """``rtpolicy record output=STORE [key=value ...] [--ros-args ...]``; returns the exit code."""
    from rtpolicy.deploy.rosnodes import spin_node

    overrides, ros_args = rosparams.parse_key_values(list(sys.argv[1:] if argv is None else argv))
    try:
        return spin_node(lambda context: RecorderNode(overrides, context=context), ros_args)
    except SystemExit as e:  # max_episodes reached
        return int(e.code or 0)
