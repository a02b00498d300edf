"""The policy as a ROS 2 lifecycle node: observations in, safe commands out, at a fixed control rate.

    rtpolicy deploy bundle=bundles/reach observation_sources='{"state": [...]}' [key=value ...] [--ros-args ...]

Lifecycle (``rclpy.lifecycle``; drive it with ``ros2 lifecycle set /rtpolicy configure`` or ``autostart``):
    configure   load and verify the bundle, build the policy, ObservationBuilder, ActionScheduler and
                SafetyLayer, create publishers and subscriptions. Any problem (bad bundle, sources that
                do not add up to the bundle's shapes, bad limits) -> FAILURE, reason logged and kept in
                ``configure_error``; the node stays up, unconfigured, and can be configured again.
    activate    start the control timer (steady clock) and the InferenceWorker thread.
    deactivate / shutdown / error   publish a hold command, stop the timer and the worker.

Control tick k (timer at ``control_rate_hz``; k counts control periods since activation, so a late
tick skips steps and counts them as deadline misses):

    1. take the latest message of each sensor topic (stored by the sensor thread, below), sample them
       into the observation history (invalid: a hold kind and a reason, logged)
    2. a = scheduler.pop(k)                            the action queued for this step, or None
    3. SafetyLayer.filter(a, now, obs stamp, fault)    e-stop / invalid obs (own kind each) / stale obs /
                                                       empty queue / non-finite -> hold; else clamp,
                                                       velocity, acceleration
    4. publish (by the bundle's action kind, below): the only place commands go out, once per tick
    5. submit the observation to the InferenceWorker, as obs_step = k + 1, only when the observation
       passed (no e-stop, no invalid or stale observation) and the queue needs a chunk

Sensors: the sensor subscriptions live on a second, internal node (``<name>_sensors``) spun by its own
thread and executor, so a sensor flood never queues in front of the control timer. Their QoS keeps
one message (KEEP_LAST 1, best effort), the thread takes at most one message per topic per
``sensor_poll_hz`` period, and a callback only stores the message and its receive time: older messages
of a flood are dropped inside the RMW, all decoding happens once per tick on the control thread.
``stale_by``: ``receive`` (default) ages a sample by its receive time (steady clock); ``stamp`` by the
messages' header stamps (sensor_msgs/JointState, Image, CompressedImage; arrays have none and use the
receive time), against the node's clock; a stamp more than ``max_clock_skew_s`` in the future, or 0,
holds as ``obs_bad_stamp``.

A chunk computed from the observation of tick k is for steps k+1, k+2, ...: the command of tick k is
already out when the observation is taken, and one control period is the inference budget. A chunk
that arrives d periods later than that has its first d rows dropped (the scheduler's delay and
``dropped_actions``). Submission: the streaming head every tick; chunk heads when the worker is idle
and no more than (last delay + 1) steps are still queued, i.e. after about ``action_horizon - delay``
steps of the current chunk have run, so that the next chunk lands before the queue runs dry.

Published per tick, by ``action.kind`` of the bundle:
    ee_delta        geometry_msgs/TwistStamped on twist_topic: the delta dims as linear x, y, z (then
                    angular x, y, z), in the bundle's action units (Meta-World: hand displacement per
                    control step, 1 = 1 cm); std_msgs/Float64MultiArray on gripper_topic: the other dims.
    joint_position  trajectory_msgs/JointTrajectory on trajectory_topic: this step's command then the
                    queued chunk, filtered by the same limits, at time_from_start = (i + 1) / rate;
                    std_msgs/Float64MultiArray on command_topic: this step's command (forward command
                    controller). No command goes out before the hold position is known from the
                    observed joint positions of the bundle's joint names.
    joint_velocity  std_msgs/Float64MultiArray on command_topic.

Operator topics: std_msgs/Bool ``true`` on estop_topic latches the e-stop (``false`` does NOT clear it).
The e-stop is subscribed from construction to destruction, both transient-local (a latched ``true``
published before this node started is seen) and volatile (plain publishers); the latch belongs to the
node, not to the configuration (configure / cleanup never clear it), and with ``estop_state_file`` it
is also kept on disk, so a restarted process starts latched. std_msgs/String on reset_topic:
``reset_estop`` clears the e-stop (and the file) and drops the queued actions;
``episode`` starts a new episode (policy.reset(), observation history, queue, in-flight inference).
std_msgs/String on instruction_topic: a task name of a multi-task bundle selects its task id; for a
language-conditioned bundle (the language step of its ``processor``, rtpolicy.processors) the text is encoded once on arrival (MiniLM sentence
embedding or backbone token ids, memoized per string) and conditions every following chunk; until the
first instruction (or the ``instruction`` parameter) the node holds.
diagnostic_msgs/DiagnosticArray on diagnostics_topic at ``diagnostics_rate_hz``: see ``stats()``.
Repeated operator warnings are throttled and echoed input is cut to ``ECHO_CHARS`` characters.
See docs/deploy_safety.md for what each hold means and what the node does and does not guarantee.
"""

from __future__ import annotations

import collections
import gc
import logging
import math
import sys
import threading
import time
import traceback
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import TwistStamped
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.duration import Duration
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.node import Node
from rclpy.qos import QoSDurabilityPolicy, QoSHistoryPolicy, QoSProfile, QoSReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Bool, Float64MultiArray, String
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from rtpolicy.deploy import rosparams
from rtpolicy.deploy.observation import ObservationBuilder, ranges_from_normalizer
from rtpolicy.deploy.safety import HOLDS, EstopLatch, SafetyLayer, SafetyLimits
from rtpolicy.deploy.scheduler import BLENDS, ActionScheduler, InferenceWorker

NODE_NAME = "rtpolicy"
RESET_EPISODE, RESET_ESTOP = "episode", "reset_estop"
COMMAND_QOS = QoSProfile(history=QoSHistoryPolicy.KEEP_LAST, depth=10, reliability=QoSReliabilityPolicy.RELIABLE,
                         durability=QoSDurabilityPolicy.VOLATILE)
# a latched e-stop publisher's last message reaches subscribers that join later
ESTOP_LATCHED_QOS = QoSProfile(history=QoSHistoryPolicy.KEEP_LAST, depth=1, reliability=QoSReliabilityPolicy.RELIABLE,
                               durability=QoSDurabilityPolicy.TRANSIENT_LOCAL)
# sensors: only the latest message matters; a flood is dropped inside the RMW, not queued for Python
SENSOR_QOS = QoSProfile(history=QoSHistoryPolicy.KEEP_LAST, depth=1, reliability=QoSReliabilityPolicy.BEST_EFFORT,
                        durability=QoSDurabilityPolicy.VOLATILE)
STALE_BY = ("receive", "stamp")
ECHO_CHARS = 80  # operator input echoed in a log line is cut to this
THROTTLE_S = 5.0  # a repeated operator warning is logged at most once per this many seconds
SCHED_COUNTERS = ("chunks", "late_chunks", "dropped_actions", "empty_pops")
DIAG_LATENCIES = 500  # at most this many latencies (ms) since the last message in diagnostics' inference_ms_recent

# name -> (default, description); the default's type is the parameter's type (see rosparams)
PARAMETERS: dict[str, tuple[Any, str]] = {
    "bundle": ("", "policy bundle folder (rtpolicy.deploy.export); its SHA-256 is verified on configure"),
    "control_rate_hz": (0.0, "control rate; 0: the bundle's"),
    "device": ("cpu", "torch device for inference, e.g. cpu or cuda"),
    "backend": ("torch", "inference runtime: torch | ort (ort: the bundle's ONNX graphs in ONNX Runtime on the CPU; "
                         "needs a bundle exported with --onnx and the ort extra)"),
    "intra_op_threads": (1, "backend=ort: ONNX Runtime intra-op threads (leave a core to the control timer)"),
    "ort_spinning": (False, "backend=ort: worker threads spin between calls (lower latency, but they take cores from "
                            "the control timer)"),
    "blend": ("latest", f"how a new chunk meets queued actions: {' | '.join(BLENDS)}"),
    "ensemble_k": (0.01, "blend=ensemble: weight exp(-k i) of the i-th oldest prediction"),
    "rtc_overlap": (4, "blend=rtc: steps crossfaded after the committed prefix"),
    "stale_obs_s": (0.5, "hold when the oldest observation source is older than this (s)"),
    "stale_by": ("receive", f"age of an observation by: {' | '.join(STALE_BY)} (header stamps; arrays use the receive time)"),
    "max_clock_skew_s": (0.05, "stale_by=stamp: header stamps up to this far in the future count as now; further: hold"),
    "obs_range_margin": (-1.0, "hold when an observation leaves the bundle's training [min, max] widened by this fraction "
                               "of the range on each side; < 0: no range check"),
    "sensor_poll_hz": (0.0, "the sensor thread takes at most one message per topic this often; 0: 4 x the control rate"),
    "estop_state_file": ("", "JSON file keeping the e-stop latch across restarts ('': memory only); read on configure"),
    "max_velocity": ([0.0], "per-dim limit (action units/s): one value for all dims or one per dim; <= 0: none"),
    "max_acceleration": ([0.0], "per-dim limit (action units/s^2): one value or one per dim; <= 0: none"),
    "observation_sources": ("", 'JSON: {obs key: [{"joint_state": {"topic", "names", "field"}} | {"array": {"topic", "size"}} '
                                '| {"image": {"topic", "compressed"}}, ...]} (see rtpolicy.deploy.observation)'),
    "task_id": (-1, "task id for multi-task bundles; -1: none (or chosen by instruction_topic)"),
    "twist_topic": ("/rtpolicy/cmd_twist", "ee_delta: geometry_msgs/TwistStamped out"),
    "gripper_topic": ("/rtpolicy/cmd_gripper", "ee_delta: std_msgs/Float64MultiArray out (non-delta dims)"),
    "command_topic": ("/rtpolicy/command", "joint kinds: std_msgs/Float64MultiArray out (this step's command)"),
    "trajectory_topic": ("/rtpolicy/joint_trajectory", "joint_position: trajectory_msgs/JointTrajectory out"),
    "estop_topic": ("/rtpolicy/estop", "std_msgs/Bool in (transient-local and volatile): true latches the e-stop; "
                                        "read at construction"),
    "reset_topic": ("/rtpolicy/reset", f"std_msgs/String in: '{RESET_EPISODE}' or '{RESET_ESTOP}'"),
    "instruction_topic": ("/rtpolicy/instruction", "std_msgs/String in: task name (multi-task bundles) or instruction "
                                                    "text (language-conditioned bundles)"),
    "instruction": ("", "language-conditioned bundles: the instruction to start with; '': wait for instruction_topic"),
    "diagnostics_topic": ("/diagnostics", "diagnostic_msgs/DiagnosticArray out"),
    "diagnostics_rate_hz": (1.0, "diagnostics publish rate"),
    "frame_id": ("base_link", "header.frame_id of TwistStamped / JointTrajectory"),
}


def _echo(text: str) -> str:
    """Operator input for a log line: repr, cut to ECHO_CHARS characters with the full length noted."""
    return repr(text) if len(text) <= ECHO_CHARS else f"{text[:ECHO_CHARS]!r}... ({len(text)} chars)"


def _pct(xs, q: float) -> float:
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


class _RosLogHandler(logging.Handler):
    """Forwards the deploy runtime's Python log records (scheduler, safety) to the node's ROS logger."""

    def __init__(self, node: LifecycleNode):
        super().__init__(logging.INFO)
        self.node = node

    def emit(self, record: logging.LogRecord) -> None:
        log = self.node.get_logger()
        msg = self.format(record)
        if record.levelno >= logging.ERROR:
            log.error(msg)
        elif record.levelno >= logging.WARNING:
            log.warning(msg)
        else:
            log.info(msg)


TWIST_AXES = ("linear.x", "linear.y", "linear.z", "angular.x", "angular.y", "angular.z")


def check_twist_axes(axes: Any, n: int) -> list[str]:
    """The Twist component of each of the ``n`` delta dims: the bundle's ``action.twist_axes``, or by
    default linear x, y, z then angular x, y, z in order. Raises ValueError on unknown or repeated axes."""
    axes = list(TWIST_AXES[:n]) if axes is None else list(axes)
    if len(axes) != n or any(a not in TWIST_AXES for a in axes) or len(set(axes)) != n:
        raise ValueError(f"action.twist_axes must name {n} distinct Twist components from {list(TWIST_AXES)}, got {axes}")
    return axes


class PolicyNode(LifecycleNode):
    """See the module docstring. ``overrides``: parameter values (coerced to the declared types).

    For tests and tools: ``predict`` (obs dict -> (Ha, Da) chunk) is the callable the inference thread
    runs and may be wrapped after configure; ``stats()`` returns what diagnostics publish.
    """

    def __init__(self, overrides: dict[str, Any] | None = None, node_name: str = NODE_NAME, freeze_gc: bool = False,
                 **kwargs: Any):
        over = rosparams.parameter_overrides(overrides, PARAMETERS)
        self.freeze_gc = freeze_gc  # the deploy process: see on_activate
        super().__init__(node_name, parameter_overrides=over + list(kwargs.pop("parameter_overrides", [])), **kwargs)
        rosparams.declare(self, PARAMETERS)
        self._lock = threading.RLock()  # control tick vs transitions and operator commands
        self._log_handler = _RosLogHandler(self)
        logging.getLogger("rtpolicy.deploy").addHandler(self._log_handler)
        self._steady = Clock(clock_type=ClockType.STEADY_TIME)
        self._control_group = MutuallyExclusiveCallbackGroup()
        self._operator_group = MutuallyExclusiveCallbackGroup()
        self._diag_group = MutuallyExclusiveCallbackGroup()
        self.configure_error: str | None = None
        self.policy = self.bundle = self.builder = self.scheduler = self.safety = self.worker = None
        self.predict = None
        self._pubs: dict[str, Any] = {}
        self._subs: list[Any] = []
        self._timer = self._diag_timer = None
        self._active = False
        self._policy_reset_pending = self._episode_reset_pending = False
        self._sched_past = dict.fromkeys(SCHED_COUNTERS, 0)  # scheduler counters of earlier episodes
        self._tick_times: collections.deque | None = None
        self.episode = 0
        self.instruction = ""
        self.encode_instruction = None  # language-conditioned bundles: text -> the policy's language input
        self.operator_msgs = dict.fromkeys(("estop", "reset", "instruction"), 0)
        # sensors: topic -> (latest message, steady receive time), written by the sensor thread
        self._latest: dict[str, tuple[Any, float]] = {}
        self._latest_lock = threading.Lock()
        self.sensor_msgs = 0  # sensor messages taken from the RMW (a flood's others are dropped there)
        self._sensor_node: Node | None = None
        self._sensor_executor: SingleThreadedExecutor | None = None
        self._sensor_thread: threading.Thread | None = None
        self._sensor_stop = threading.Event()
        # the e-stop: one latch for the node's life, subscribed from now on (see the module docstring)
        self.estop_latch = EstopLatch()
        estop_topic = rosparams.coerce("estop_topic", self.get_parameter("estop_topic").value, PARAMETERS["estop_topic"][0])
        quiet = SubscriptionEventCallbacks(incompatible_qos=lambda event: None)  # a volatile publisher matches the other one
        self._estop_subs = [self.create_subscription(Bool, estop_topic, self._on_estop, qos, callback_group=self._operator_group,
                                                     event_callbacks=quiet)
                            for qos in (ESTOP_LATCHED_QOS, COMMAND_QOS)]

    # ================================================================== lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._configure()
        except Exception as e:  # any configuration problem: FAILURE with the reason, the node stays up
            self.configure_error = f"{type(e).__name__}: {e}"
            self.get_logger().error(f"configure failed: {self.configure_error}")
            self._cleanup()
            return TransitionCallbackReturn.FAILURE
        self.configure_error = None
        b = self.bundle
        self.get_logger().info(
            f"configured: {b['policy']['name']} policy ({b['task'].get('name')}), action {self.kind} {self.action_names}, "
            f"{self.rate:g} Hz, obs horizon {self.obs_horizon}, action horizon {self.action_horizon}, blend {self.p['blend']}, "
            f"backend {self.p['backend']}")
        return TransitionCallbackReturn.SUCCESS

    def _configure(self) -> None:
        from rtpolicy.deploy.export import load_bundle

        self._cleanup()
        self.p = p = rosparams.values(self, PARAMETERS)
        if not p["bundle"]:
            raise ValueError("parameter 'bundle' is empty: give the bundle folder")
        if p["blend"] not in BLENDS:
            raise ValueError(f"blend must be one of {list(BLENDS)}, got {p['blend']!r}")
        if not p["diagnostics_rate_hz"] > 0:
            raise ValueError(f"diagnostics_rate_hz must be > 0, got {p['diagnostics_rate_hz']}")
        if p["stale_by"] not in STALE_BY:
            raise ValueError(f"stale_by must be one of {list(STALE_BY)}, got {p['stale_by']!r}")
        if not p["max_clock_skew_s"] >= 0 or p["sensor_poll_hz"] < 0:
            raise ValueError(f"max_clock_skew_s and sensor_poll_hz must be >= 0, got {p['max_clock_skew_s']}, {p['sensor_poll_hz']}")
        self.estop_latch.attach(p["estop_state_file"] or None)  # a latch in the file latches; never clears one
        self.device = p["device"]
        if p["backend"] == "ort" and (p["device"] != "cpu" or p["intra_op_threads"] < 1):
            raise ValueError(f"backend=ort runs on the CPU with intra_op_threads >= 1; got device {p['device']!r}, "
                             f"intra_op_threads {p['intra_op_threads']}")
        policy, bundle = load_bundle(p["bundle"], self.device, backend=p["backend"], threads=p["intra_op_threads"],
                                     spinning=p["ort_spinning"])
        act = bundle["action"]
        self.kind, self.action_names = act["kind"], list(act["names"])
        da = len(self.action_names)
        self.rate = p["control_rate_hz"] if p["control_rate_hz"] > 0 else float(bundle["control_rate_hz"])
        if not self.rate > 0:
            raise ValueError(f"control rate must be > 0 Hz, got {self.rate}")
        self.dt = 1.0 / self.rate
        self.obs_horizon, self.action_horizon = int(bundle["horizons"]["obs"]), int(bundle["horizons"]["action"])
        self.streaming = bundle["policy"]["name"] == "streaming"
        shapes = {k: v["shape"] for k, v in bundle["observation"].items()}
        num_tasks = int(bundle.get("num_tasks") or 0)
        self.task_names = list((bundle.get("task") or {}).get("tasks") or [])
        from rtpolicy.processors import ObservationProcessor

        processor = ObservationProcessor.from_config(bundle.get("processor"))  # the policy's own, from training
        language = processor.language  # instruction text -> the policy's language input, encoded on arrival
        self.encode_instruction = processor.instruction if language else None
        vector_shapes = {k: v for k, v in shapes.items() if not language or k != language["key"]}
        ranges = (ranges_from_normalizer(bundle.get("normalizer") or {}, vector_shapes, p["obs_range_margin"])
                  if p["obs_range_margin"] >= 0 else None)
        builder = ObservationBuilder(p["observation_sources"], vector_shapes,
                                     self.obs_horizon, num_tasks, p["task_id"] if p["task_id"] >= 0 else None,
                                     language=(language["key"], shapes[language["key"]]) if language else None, ranges=ranges)
        if language:
            first = self.encode_instruction(p["instruction"])  # loads the text model now, not at the first instruction
            if p["instruction"]:
                builder.set_instruction(first)
                self.instruction = p["instruction"]

        def limit(name: str) -> np.ndarray:
            v = np.asarray(p[name], dtype=np.float64)
            if v.size not in (1, da):
                raise ValueError(f"{name} needs 1 or {da} values (one per action dim {self.action_names}), got {v.size}")
            return np.where(v > 0, v, np.inf) * np.ones(da)  # <= 0: no limit

        low, high = np.asarray(act["low"], dtype=np.float64), np.asarray(act["high"], dtype=np.float64)
        limits = SafetyLimits(low, high, limit("max_velocity"), limit("max_acceleration"), p["stale_obs_s"], act["delta_dims"])
        self.delta_dims = list(limits.delta_dims)
        self.other_dims = [i for i in range(da) if i not in self.delta_dims]
        if self.kind == "ee_delta" and not 1 <= len(self.delta_dims) <= 6:
            raise ValueError(f"ee_delta bundles need 1..6 delta dims (twist linear xyz, angular xyz), got {self.delta_dims}")
        self.twist_axes = check_twist_axes(act.get("twist_axes"), len(self.delta_dims)) if self.kind == "ee_delta" else []
        self.joint_names = list(bundle.get("joint_names") or []) or self.action_names
        if self.kind == "joint_position" and len(self.joint_names) != da:
            raise ValueError(f"joint_position bundle: {len(self.joint_names)} joint names for {da} action dims")
        # absolute dims start at 0 (clipped into the limits); joint positions are seeded from the robot on activate
        safety = SafetyLayer(limits, self.dt, np.clip(np.zeros(da), low, high), estop=self.estop_latch)
        scheduler = ActionScheduler(da, p["blend"], p["ensemble_k"], p["rtc_overlap"])

        self.policy, self.bundle, self.builder, self.safety, self.scheduler = policy, bundle, builder, safety, scheduler
        self.predict = self._policy_predict
        self._make_topics()

    def _make_topics(self) -> None:
        p = self.p
        pub = self._pubs
        if self.kind == "ee_delta":
            pub["twist"] = self.create_publisher(TwistStamped, p["twist_topic"], COMMAND_QOS)
            if self.other_dims:
                pub["gripper"] = self.create_publisher(Float64MultiArray, p["gripper_topic"], COMMAND_QOS)
        else:
            pub["command"] = self.create_publisher(Float64MultiArray, p["command_topic"], COMMAND_QOS)
            if self.kind == "joint_position":
                pub["trajectory"] = self.create_publisher(JointTrajectory, p["trajectory_topic"], COMMAND_QOS)
        pub["diagnostics"] = self.create_publisher(DiagnosticArray, p["diagnostics_topic"], 10)
        for msg_type, topic, cb in ((String, p["reset_topic"], self._on_reset), (String, p["instruction_topic"], self._on_instruction)):
            self._subs.append(self.create_subscription(msg_type, topic, cb, COMMAND_QOS, callback_group=self._operator_group))
        self._start_sensors()

    def _start_sensors(self) -> None:
        """The sensor subscriptions on their own node, executor and thread (see the module docstring)."""
        node = Node(f"{self.get_name()}_sensors", namespace=self.get_namespace(), context=self.context,
                    start_parameter_services=False)
        for topic, kind in self.builder.kinds.items():
            msg_type = {"joint_state": JointState, "array": Float64MultiArray, "image": Image,
                        "compressed_image": CompressedImage}[kind]
            node.create_subscription(msg_type, topic, lambda m, t=topic: self._store_latest(t, m), SENSOR_QOS)
        executor = SingleThreadedExecutor(context=self.context)
        executor.add_node(node)
        poll = self.p["sensor_poll_hz"] or 4 * self.rate
        self._sensor_stop = stop = threading.Event()
        self._sensor_node, self._sensor_executor = node, executor
        self._latest = {}
        self._sensor_thread = threading.Thread(target=self._spin_sensors, args=(executor, stop, 1.0 / poll, len(self.builder.kinds)),
                                               name="rtpolicy-sensors", daemon=True)
        self._sensor_thread.start()

    def _spin_sensors(self, executor: SingleThreadedExecutor, stop: threading.Event, period: float, n_topics: int) -> None:
        """At most one wait and ``n_topics`` callbacks per ``period``: bounded work whatever the sensor rate."""
        while not stop.is_set() and self.context.ok():
            t = time.monotonic()
            try:
                executor.spin_once(timeout_sec=0.1)
                for _ in range(n_topics - 1):  # the other topics ready in the same wait
                    executor.spin_once(timeout_sec=0)
            except Exception as e:  # the context or node going away under us ends the thread
                if not stop.is_set() and self.context.ok():
                    self.get_logger().error(f"sensor thread stopped: {type(e).__name__}: {e}")
                return
            stop.wait(max(0.0, t + period - time.monotonic()))

    def _stop_sensors(self) -> None:
        self._sensor_stop.set()
        thread, executor, node = self._sensor_thread, self._sensor_executor, self._sensor_node
        self._sensor_thread = self._sensor_executor = self._sensor_node = None
        if thread is not None:
            thread.join(2.0)
        if executor is not None:
            executor.shutdown(timeout_sec=1.0)
        if node is not None:
            try:
                node.destroy_node()
            except Exception:  # the context is already gone (shutdown by signal): nothing left to release
                pass

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._lock:
            self.scheduler.reset()
            self._sched_past = dict.fromkeys(SCHED_COUNTERS, 0)
            self._new_episode_state(count=False)
            self._t0 = time.monotonic()
            self._step, self._last_k = 0, 0
            self._seeded = self.kind != "joint_position"
            self._ingest()
            self._try_seed()
            self._reset_tick_stats()
            self.worker = InferenceWorker(self._infer, self.scheduler, lambda: self._step, max_latency_samples=2000)
            self._timer = self.create_timer(self.dt, self._tick, callback_group=self._control_group, clock=self._steady)
            self._diag_timer = self.create_timer(1.0 / self.p["diagnostics_rate_hz"], self._publish_diagnostics,
                                                 callback_group=self._diag_group, clock=self._steady)
            if self.freeze_gc:
                # a full collection walks every object torch, rclpy and the bundle left behind (~200k, 40-160 ms on
                # this project's CPU machine): at 100 Hz that is several skipped ticks whenever one happens. Collect
                # once now, before the first tick, and move the survivors out of the collector's reach.
                gc.collect()
                gc.freeze()
            self._active = True
        self.get_logger().info(f"active: control at {self.rate:g} Hz")
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop("deactivated")
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._cleanup()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop("shutting down")
        self._cleanup()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop("error")
        self._cleanup()
        return TransitionCallbackReturn.SUCCESS

    def _stop(self, why: str) -> None:
        """Hold, then stop the timers and the inference thread (idempotent)."""
        with self._lock:
            if self._active and self.context.ok():
                self._publish_hold(why)
                self._publish_diagnostics()
            self._active = False
            for t in (self._timer, self._diag_timer):
                if t is not None:  # rclpy's executors skip a timer destroyed while they hold it (InvalidHandle)
                    self.destroy_timer(t)
            self._timer = self._diag_timer = None
            worker, self.worker = self.worker, None
        if worker is not None:
            worker.close(timeout=2.0)

    def _cleanup(self) -> None:
        self._stop_sensors()
        for s in self._subs:
            self.destroy_subscription(s)
        for p in self._pubs.values():
            self.destroy_publisher(p)
        self._subs, self._pubs = [], {}
        self.policy = self.bundle = self.builder = self.scheduler = self.safety = self.predict = None

    def destroy_node(self) -> None:
        self._stop("node destroyed")
        self._stop_sensors()
        logging.getLogger("rtpolicy.deploy").removeHandler(self._log_handler)
        super().destroy_node()

    # ================================================================== inference (worker thread)
    def _policy_predict(self, obs: dict) -> Any:
        return self.policy.predict_chunk(obs)[0]

    def _infer(self, obs: dict) -> Any:
        """Runs on the InferenceWorker thread, the only thread that touches the policy after configure."""
        if self._policy_reset_pending:
            self._policy_reset_pending = False
            self.policy.reset()
        return self.predict({k: v.to(self.device) for k, v in obs.items()})

    # ================================================================== control tick
    def _tick(self) -> None:
        with self._lock:
            if not self._active:
                return
            try:
                self._tick_body()
            except Exception:  # a bug must not take the control loop down: log it, count it, hold
                self.tick_errors += 1
                self.get_logger().error(f"control tick failed ({self.tick_errors} so far), holding:\n{traceback.format_exc()}",
                                        throttle_duration_sec=5.0)
                self._publish_hold("control tick failed")

    def _tick_body(self) -> None:
        """One control step (see the module docstring); runs with the lock held."""
        t_start = time.perf_counter()
        now = time.monotonic()
        if self._episode_reset_pending:
            self._new_episode_state(count=True)
        # the slot this tick is in; a tick skips a step (a deadline miss) only when a whole period late,
        # so one late tick does not shift every later tick's slot (rounding would)
        k = max(self._last_k + 1, int(math.floor((now - self._t0) / self.dt)))
        self.deadline_misses += k - self._last_k - 1
        self._last_k = k
        if self._tick_times:  # tick-to-tick period jitter: independent of how k was rounded
            self._period_jitter_ms.append(abs(now - self._tick_times[-1] - self.dt) * 1e3)
        self._tick_times.append(now)
        self._jitter_ms.append((now - (self._t0 + k * self.dt)) * 1e3)

        self._ingest()
        sample = self.builder.sample()
        self.last_sample = sample
        fault = None if sample.valid else (sample.kind, sample.reason)
        if not sample.valid:
            self.invalid_observations += 1
            self._log_invalid(sample.kind, sample.reason)
        elif self._last_invalid_reason:
            self.get_logger().info("observation valid again")
            self._last_invalid_reason = ""
        stamp = sample.stamp if sample.valid else None
        self.last_obs_hold = self.safety.observation_hold(now, stamp, fault)  # (kind, message) or None: may drive
        action = self.scheduler.pop(k)
        if not self._seeded:
            self._try_seed()
        if self._seeded:
            cmd = self.safety.filter(action, now, stamp, fault)
            held = any(i in HOLDS for i in self.safety.last_interventions)
            self.holds += held
            self._publish(cmd, None if held else self._planned(k, now, stamp))
            self.last_command = cmd
        self._step = k + 1
        # no inference on an observation the safety layer refuses: it would only burn the CPU the loop needs
        if self.last_obs_hold is None and not self.safety.estopped and self._should_submit():
            self.worker.submit(self.builder.observation(), obs_step=k + 1)
            self.submitted += 1
        self.ticks += 1
        self._tick_ms.append((time.perf_counter() - t_start) * 1e3)

    def _should_submit(self) -> bool:
        if self.streaming:  # one denoising step per tick; an unstarted older one is replaced
            return True
        if not self.worker.wait_idle(0):
            return False
        return len(self.scheduler) <= self.scheduler.last_delay + 1

    def _planned(self, k: int, now: float, stamp: float | None) -> np.ndarray | None:
        """joint_position: the queued actions after this step, through the safety limits (for the trajectory)."""
        if self.kind != "joint_position":
            return None
        future = self.scheduler.committed_prefix(k + 1, max(self.action_horizon, 1) * 2)
        return self.safety.preview(list(future), now, stamp)

    def _log_invalid(self, kind: str, reason: str) -> None:
        """Logs when the kind of fault changes, else at most every THROTTLE_S (a reason may quote changing values)."""
        log = self.get_logger()
        if kind != self._last_invalid_reason:
            log.warning(f"observation invalid ({kind}), holding: {reason}")
            self._last_invalid_reason = kind
        else:
            log.warning(f"observation still invalid ({kind}), holding: {reason}", throttle_duration_sec=THROTTLE_S)

    def _try_seed(self) -> None:
        """joint_position: the hold command is the robot's observed joint positions (before any command)."""
        if self._seeded:
            return
        q = self.builder.joint_values(self.joint_names, "position")
        if q is None:
            self.get_logger().warning(f"no command yet: waiting for positions of joints {self.joint_names} "
                                      "to know the hold position", throttle_duration_sec=5.0)
            return
        try:
            self.safety.reset(q)
        except ValueError as e:
            self.get_logger().error(f"cannot hold at the observed joint positions: {e}", throttle_duration_sec=5.0)
            return
        self._seeded = True
        self.get_logger().info(f"hold position seeded from the robot: {np.round(q, 4).tolist()}")

    def _new_episode_state(self, count: bool) -> None:
        """Called with the lock held: drop in-flight inference, queue and history; the policy resets before its next call."""
        if self.worker is not None:
            self.worker.reset()
        if self.scheduler is not None:
            self._fold_scheduler_stats()
            self.scheduler.reset()
        if self.builder is not None:
            self.builder.reset()
        self._policy_reset_pending = True
        self._episode_reset_pending = False
        if count:
            self.episode += 1
            self.get_logger().info(f"episode {self.episode}: policy, observation history and action queue reset")

    def _fold_scheduler_stats(self) -> None:
        st = self.scheduler.stats(delays=False)
        for key in SCHED_COUNTERS:
            self._sched_past[key] += st[key]

    def _reset_tick_stats(self) -> None:
        self._tick_times = collections.deque(maxlen=max(10, int(2 * self.rate)))
        self._jitter_ms = collections.deque(maxlen=2000)
        self._period_jitter_ms = collections.deque(maxlen=2000)
        self._tick_ms = collections.deque(maxlen=2000)
        self.ticks = self.deadline_misses = self.holds = self.submitted = self.invalid_observations = self.tick_errors = 0
        self.commands_published = 0
        self._last_invalid_reason = ""
        self.last_sample = self.last_obs_hold = None
        self.last_command = None
        self._diag_prev = {"holds": 0, "deadline_misses": 0, "late_chunks": 0, "errors": 0}
        self._diag_latency_count = 0  # worker.latency_count at the last diagnostics message

    # ================================================================== publishing
    def _publish(self, cmd: np.ndarray, planned: np.ndarray | None) -> None:
        self.commands_published += 1
        stamp = self.get_clock().now().to_msg()
        if self.kind == "ee_delta":
            msg = TwistStamped()
            msg.header.stamp, msg.header.frame_id = stamp, self.p["frame_id"]
            for axis, i in zip(self.twist_axes, self.delta_dims):  # e.g. a yaw delta -> angular.z
                part, comp = axis.split(".")
                setattr(getattr(msg.twist, part), comp, float(cmd[i]))
            self._pubs["twist"].publish(msg)
            if "gripper" in self._pubs:
                self._pubs["gripper"].publish(Float64MultiArray(data=[float(cmd[i]) for i in self.other_dims]))
            return
        self._pubs["command"].publish(Float64MultiArray(data=[float(x) for x in cmd]))
        if self.kind == "joint_position":
            traj = JointTrajectory()
            traj.header.stamp, traj.header.frame_id = stamp, self.p["frame_id"]
            traj.joint_names = list(self.joint_names)
            rows = [cmd] + ([] if planned is None else list(planned))
            for i, row in enumerate(rows):
                pt = JointTrajectoryPoint(positions=[float(x) for x in row])
                pt.time_from_start = Duration(seconds=(i + 1) * self.dt).to_msg()
                traj.points.append(pt)
            self._pubs["trajectory"].publish(traj)

    def _publish_hold(self, why: str) -> None:
        if self.safety is None or not self._pubs or not getattr(self, "_seeded", False):
            return
        self._publish(self.safety.hold(), None)
        self.get_logger().warning(f"holding: {why}")

    # ================================================================== inputs
    def _store_latest(self, topic: str, msg: Any) -> None:
        """Sensor thread: keep the message and its receive time; all other work waits for the tick."""
        t = time.monotonic()
        with self._latest_lock:
            self._latest[topic] = (msg, t)
            self.sensor_msgs += 1

    def _ingest(self) -> None:
        """Control thread: the latest message of each sensor topic since the last tick -> the ObservationBuilder."""
        with self._latest_lock:
            latest, self._latest = self._latest, {}
        if not latest:
            return
        by_stamp = self.p["stale_by"] == "stamp"
        if by_stamp:  # the node clock and the steady clock read together: header stamps -> steady time
            ros_now, mono_now = self.get_clock().now().nanoseconds * 1e-9, time.monotonic()
        for topic, (msg, t_recv) in latest.items():
            stamp, fault = t_recv, None
            if by_stamp and hasattr(msg, "header"):
                header = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
                ros_recv = ros_now - (mono_now - t_recv)
                if header == 0:
                    fault = ("obs_bad_stamp", f"{topic}: header stamp is 0 (unset) and stale_by=stamp")
                elif header - ros_recv > self.p["max_clock_skew_s"]:
                    fault = ("obs_bad_stamp", f"{topic}: header stamp {header - ros_recv:.3f} s in the future "
                                              f"(> max_clock_skew_s {self.p['max_clock_skew_s']})")
                else:
                    stamp = t_recv - max(0.0, ros_recv - header)
            builder = self.builder
            if isinstance(msg, JointState):
                builder.update_joint_state(topic, msg.name, {"position": msg.position, "velocity": msg.velocity,
                                                             "effort": msg.effort}, stamp, fault)
            elif isinstance(msg, Image):
                builder.update_image(topic, msg.encoding, msg.height, msg.width, msg.step, msg.data, stamp, fault)
            elif isinstance(msg, CompressedImage):
                builder.update_compressed_image(topic, msg.format, msg.data, stamp, fault)
            else:
                builder.update_array(topic, msg.data, stamp, fault)

    def _on_estop(self, msg: Bool) -> None:
        """Latches; the hold goes out with the next control tick (commands are only published on the tick)."""
        topic = self._estop_subs[0].topic_name
        with self._lock:
            self.operator_msgs["estop"] += 1
            if msg.data:
                if not self.estop_latch.latched:
                    self.estop_latch.latch(f"true on {topic}")
                    self.get_logger().error(f"E-STOP latched; clear it with '{RESET_ESTOP}' on the reset topic")
            else:
                self.get_logger().warning(f"false on {topic} does not clear the e-stop: send '{RESET_ESTOP}' on the reset topic "
                                          f"(repeats not logged for {THROTTLE_S:g} s)", throttle_duration_sec=THROTTLE_S)

    def _on_reset(self, msg: String) -> None:
        request = msg.data.strip()
        with self._lock:
            self.operator_msgs["reset"] += 1
            if request == RESET_ESTOP and self.safety is None:  # unconfigured: the latch is the node's, clear it anyway
                self.estop_latch.clear()
                return
            if self.safety is None:
                return
            if request == RESET_EPISODE:
                if self._active:
                    self._episode_reset_pending = True  # done at the start of the next tick
                else:
                    self._new_episode_state(count=True)
            elif request == RESET_ESTOP:
                if self.safety.estopped:
                    self.safety.reset_estop()
                    if self.worker is not None:
                        self.worker.reset()
                    self._fold_scheduler_stats()
                    self.scheduler.reset()  # actions planned before the stop are stale
                    self.get_logger().warning("e-stop cleared: queued actions dropped, resuming")
            else:
                self.get_logger().warning(f"unknown request {_echo(request)} on {self.p['reset_topic']}; "
                                          f"expected '{RESET_EPISODE}' or '{RESET_ESTOP}'", throttle_duration_sec=THROTTLE_S)

    def _on_instruction(self, msg: String) -> None:
        text = msg.data.strip()
        with self._lock:
            self.operator_msgs["instruction"] += 1
            if self.builder is None:
                return
            if text == self.instruction:
                return
            self.instruction = text
            if self.encode_instruction is not None:
                self.builder.set_instruction(self.encode_instruction(text))
                self.get_logger().info(f"instruction {_echo(text)}")
            if text in self.task_names:
                self.builder.set_task_id(self.task_names.index(text))
                self.get_logger().info(f"instruction {text!r}: task id {self.builder.task_id}")
            elif self.builder.num_tasks:
                self.get_logger().warning(f"instruction {_echo(text)} is none of this bundle's tasks {self.task_names}; "
                                          f"task id stays {self.builder.task_id}", throttle_duration_sec=THROTTLE_S)
            elif self.encode_instruction is None:
                self.get_logger().warning(f"instruction {_echo(text)} ignored: this policy is single-task and not "
                                          "language-conditioned", throttle_duration_sec=THROTTLE_S)

    # ================================================================== diagnostics
    def stats(self) -> dict[str, Any]:
        """Counters and percentiles since activation (scheduler counters summed over episodes)."""
        with self._lock:
            if self.scheduler is None or self._tick_times is None:
                return {}
            times = list(self._tick_times)
            sched = self.scheduler.stats(delays=False)
            worker = self.worker
            lat = worker.latency_ms() if worker is not None else []
            out: dict[str, Any] = {
                "episode": self.episode, "step": self._step, "ticks": self.ticks, "backend": self.p["backend"],
                "loop_rate_hz": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0,
                "tick_jitter_ms_p50": _pct(self._jitter_ms, 50), "tick_jitter_ms_p99": _pct(self._jitter_ms, 99),
                "tick_period_jitter_ms_p50": _pct(self._period_jitter_ms, 50),
                "tick_period_jitter_ms_p99": _pct(self._period_jitter_ms, 99),
                "tick_ms_p99": _pct(self._tick_ms, 99), "deadline_misses": self.deadline_misses,
                "inference_ms_p50": _pct(lat, 50), "inference_ms_p95": _pct(lat, 95), "inference_ms_p99": _pct(lat, 99),
                "inference_calls": worker.calls if worker else 0, "inference_errors": worker.errors if worker else 0,
                "inference_replaced": worker.replaced if worker else 0, "inference_discarded": worker.discarded if worker else 0,
                "submitted": self.submitted, "tick_errors": self.tick_errors,
                **{k: sched[k] + self._sched_past[k] for k in SCHED_COUNTERS},
                "queued": sched["queued"], "mean_delay_episode": sched["mean_delay"], "last_delay": self.scheduler.last_delay,
                "holds": self.holds, **{f"safety_{k}": v for k, v in self.safety.counts.items()},
                "estopped": self.safety.estopped, "invalid_observations": self.invalid_observations,
                # "ok" only when the last tick's observation could drive the robot; else "<hold kind>: <reason>"
                "observation": "ok" if self.last_obs_hold is None else f"{self.last_obs_hold[0]}: {self.last_obs_hold[1]}",
                "hold": ",".join(k for k in self.safety.last_interventions if k in HOLDS) or "none",
                "commands_published": self.commands_published, "sensor_msgs": self.sensor_msgs,
                **{f"{k}_msgs": v for k, v in self.operator_msgs.items()},
            }
            return out

    def _publish_diagnostics(self) -> None:
        try:
            self._publish_diagnostics_body()
        except Exception:  # diagnostics must not take the node down
            self.get_logger().error(f"diagnostics failed:\n{traceback.format_exc()}", throttle_duration_sec=10.0)

    def _publish_diagnostics_body(self) -> None:
        st = self.stats()
        if not st or "diagnostics" not in self._pubs:
            return
        prev = self._diag_prev
        now = {"holds": st["holds"], "deadline_misses": st["deadline_misses"], "late_chunks": st["late_chunks"],
               "errors": st["inference_errors"]}
        grew = [k for k in now if now[k] > prev[k]]
        self._diag_prev = now
        status = DiagnosticStatus(name=f"{self.get_name()}: policy control loop", hardware_id=self.get_fully_qualified_name())
        if st["estopped"]:
            status.level, status.message = DiagnosticStatus.ERROR, "e-stop latched"
        elif grew:
            status.level, status.message = DiagnosticStatus.WARN, "since last report: " + ", ".join(f"{k} +{now[k] - prev[k]}" for k in grew)
            if st["observation"] != "ok":
                status.message += f"; observation {st['observation'][:200]}"
        else:
            status.level, status.message = DiagnosticStatus.OK, f"running at {st['loop_rate_hz']:.1f} Hz"
        status.values = [KeyValue(key=k, value=f"{v:.3f}" if isinstance(v, float) else str(v)) for k, v in st.items()]
        worker = self.worker
        if worker is not None:  # each inference latency once, for percentiles over any window (benchmarks/control_loop.py)
            self._diag_latency_count, new = worker.latency_since(self._diag_latency_count, DIAG_LATENCIES)
            status.values.append(KeyValue(key="inference_ms_recent", value=",".join(f"{x:.2f}" for x in new)))
        arr = DiagnosticArray(status=[status])
        arr.header.stamp = self.get_clock().now().to_msg()
        self._pubs["diagnostics"].publish(arr)



def main(argv: list[str] | None = None) -> int:
    """``rtpolicy deploy bundle=PATH [key=value ...] [autostart=false] [--ros-args ...]``; returns the exit code."""
    from rtpolicy.deploy.rosnodes import spin_node

    args = list(sys.argv[1:] if argv is None else argv)
    overrides, ros_args = rosparams.parse_key_values(args)
    autostart = rosparams.coerce("autostart", overrides.pop("autostart", True), True)
    # the control timer shares the GIL with the inference and sensor threads: hand it over within 1 ms, not 5
    sys.setswitchinterval(0.001)
    return spin_node(lambda context: PolicyNode(overrides, context=context, freeze_gc=True), ros_args,
                     lifecycle_autostart=autostart)
