"""Shared by benchmarks/control_loop.py and benchmarks/ros_closed_loop.py (not a benchmark itself).

``rtpolicy sim`` and ``rtpolicy deploy`` as two processes on a private ROS domain (real RMW), with
rtpolicy/conf/deploy/metaworld.yaml as their params file, plus an in-process listener node that records what
they publish: command arrival times, the policy node's diagnostics and the sim's episode results.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from rtpolicy.deploy.rosparams import parse_key_values

ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILE = ROOT / "rtpolicy" / "conf" / "deploy" / "metaworld.yaml"
CONTROL_LOOP_STATUS = "policy control loop"  # the policy node's DiagnosticStatus name ends with this


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["num_inference_steps=1", "sampler=ddim"]`` -> overrides (values read as JSON when they parse)."""
    try:
        return parse_key_values(items)[0]
    except ValueError as e:
        raise SystemExit(f"--set: {e}") from None


def head_label(policy_cfg: dict[str, Any]) -> tuple[str, str, int | None]:
    """(head, sampler, steps) of a bundle's / checkpoint's policy config, as benchmarks/latency.py labels them."""
    head = policy_cfg.get("name", "?")
    sampler = policy_cfg.get("sampler") or {"truncated": "anchored", "streaming": "stream"}.get(head, "")
    steps = policy_cfg.get("steps_per_tick") if head == "streaming" else policy_cfg.get("num_inference_steps")
    return head, str(sampler), None if steps is None else int(steps)


def pick_domain_id(requested: int | None) -> int:
    """A ROS domain for this run only (the tests use 100..200; we stay in 1..99)."""
    return requested if requested is not None else random.SystemRandom().randint(1, 99)


def child_env(domain_id: int, threads: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", ROS_DOMAIN_ID=str(domain_id), MUJOCO_GL=os.environ.get("MUJOCO_GL", "osmesa"))
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    if threads > 0:  # torch's intra-op pool (and MKL/OpenBLAS) in the child
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    return env


class Proc:
    """One ``rtpolicy <command> key=value ... --ros-args --params-file rtpolicy/conf/deploy/metaworld.yaml`` process; output to a log file."""

    def __init__(self, name: str, command: str, params: dict[str, Any], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log_path = Path(log_dir) / f"{name}.log"
        kv = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in params.items()]
        self.argv = [sys.executable, "-m", "rtpolicy.deploy.cli", command, *kv, "--ros-args", "--params-file", str(PARAMS_FILE)]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.argv, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, text=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGINT (the node shuts down through its lifecycle), then SIGKILL of this process after ``timeout``."""
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def tail(self, n: int = 40) -> str:
        self._log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(f"  [{self.name}] {line}" for line in lines[-n:])


class Listener:
    """An rclpy node in this process (own context, own executor thread) recording the deploy topics.

    ``commands[topic]``: steady-clock arrival times (s); ``stamps[topic]``: header stamps (s, the sender's
    ROS clock) of the stamped ones (twist); ``diagnostics``: (arrival, header stamp s,
    {key: value}) of the policy node's control-loop status; ``episodes``: the sim's JSON results (+ arrival);
    ``states``: how many JointStates came on ``state_topic`` (when given).
    """

    def __init__(self, domain_id: int, command_topics: dict[str, str] | None = None, diagnostics_topic: str = "/diagnostics",
                 episode_topic: str = "/rtpolicy/episode", state_topic: str | None = None):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import TwistStamped
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import JointState
        from std_msgs.msg import Float64MultiArray, String

        from rtpolicy.deploy.node import COMMAND_QOS

        self._rclpy = rclpy
        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("rtpolicy_benchmark_listener", context=self.context)
        self.lock = threading.Lock()
        topics = command_topics or {"twist": "/rtpolicy/cmd_twist", "gripper": "/rtpolicy/cmd_gripper", "command": "/rtpolicy/command"}
        types = {"twist": TwistStamped}
        self.commands: dict[str, list[float]] = {k: [] for k in topics}
        self.stamps: dict[str, list[float]] = {k: [] for k in topics}
        for key, topic in topics.items():
            self.node.create_subscription(types.get(key, Float64MultiArray), topic,
                                          self._stamp_into(self.commands[key], self.stamps[key]), COMMAND_QOS)
        self.diagnostics: list[tuple[float, float, dict[str, str]]] = []
        self.episodes: list[dict[str, Any]] = []
        self.node.create_subscription(DiagnosticArray, diagnostics_topic, self._on_diagnostics, 10)
        self.node.create_subscription(String, episode_topic, self._on_episode, COMMAND_QOS)
        self.states = 0  # JointState messages heard on state_topic (the robot is up)
        if state_topic:
            self.node.create_subscription(JointState, state_topic, self._on_state, qos_profile_sensor_data)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._spinning = True
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while self._spinning:
            self.executor.spin_once(timeout_sec=0.05)

    def _stamp_into(self, times: list[float], stamps: list[float]) -> Callable[[Any], None]:
        def cb(msg) -> None:
            t = time.monotonic()
            header = getattr(msg, "header", None)
            with self.lock:
                times.append(t)
                if header is not None:
                    stamps.append(header.stamp.sec + header.stamp.nanosec * 1e-9)
        return cb

    def _on_diagnostics(self, msg) -> None:
        t = time.monotonic()
        for status in msg.status:
            if status.name.endswith(CONTROL_LOOP_STATUS):
                kv = {v.key: v.value for v in status.values}
                with self.lock:
                    self.diagnostics.append((t, msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9, kv))

    def _on_state(self, msg) -> None:
        self.states += 1

    def _on_episode(self, msg) -> None:
        try:
            result = json.loads(msg.data)
        except json.JSONDecodeError:
            return
        result["arrival"] = time.monotonic()
        with self.lock:
            self.episodes.append(result)

    def last_diag(self) -> tuple[float, float, dict[str, str]] | None:
        with self.lock:
            return self.diagnostics[-1] if self.diagnostics else None

    def close(self) -> None:
        self._spinning = False
        self._thread.join(5)
        self.executor.shutdown()
        self.node.destroy_node()
        self._rclpy.shutdown(context=self.context)


def wait_until(pred: Callable[[], bool], timeout: float, procs: list[Proc], what: str, period: float = 0.1) -> None:
    """Wait for ``pred``; SystemExit with the processes' log tails when it times out or one of them exits."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        dead = [p for p in procs if not p.alive()]
        if dead:
            raise SystemExit(f"{', '.join(f'{p.name} exited (rc={p.proc.returncode})' for p in dead)} while waiting for {what}:\n"
                             + "\n".join(p.tail() for p in procs))
        time.sleep(period)
    if pred():
        return
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}:\n" + "\n".join(p.tail() for p in procs))


def log_dir(path: str | None) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """The folder for the processes' logs: ``path`` (kept) or a temporary one (removed at exit)."""
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        return Path(path), None
    tmp = tempfile.TemporaryDirectory(prefix="rtpolicy-bench-")
    return Path(tmp.name), tmp
