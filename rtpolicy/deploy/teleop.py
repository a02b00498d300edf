"""A scripted teleoperator: a Meta-World task's scripted expert acting on the robot's topics.

    rtpolicy teleop task=reach-v3 [noise=0.0] [--ros-args ...]

Stands in for a person with a joystick when recording demonstrations (``rtpolicy record``) from the simulated
robot (``rtpolicy sim``): it reads the state from the same ``observation_sources`` the deploy node reads
(default: Meta-World's 39-dim state from /joint_states + /object_state) with the same ``ObservationBuilder``,
and each time every source topic has a new message, publishes the expert's action (4,) in [-1, 1] as the
deploy node would: geometry_msgs/TwistStamped (linear xyz = hand delta) on ``twist_topic`` and
std_msgs/Float64MultiArray (the gripper) on ``gripper_topic``. ``noise`` > 0 adds Gaussian noise to what is
published (a less steady operator).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
from geometry_msgs.msg import TwistStamped
from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray

from rtpolicy.deploy import rosparams
from rtpolicy.deploy.observation import ObservationBuilder
from rtpolicy.deploy.record import COMMAND_QOS, SOURCE_QOS

METAWORLD_SOURCES = {"state": [{"joint_state": {"topic": "/joint_states", "names": ["hand_x", "hand_y", "hand_z", "gripper_opening"]}},
                               {"array": {"topic": "/object_state", "size": 35}}]}

PARAMETERS: dict[str, tuple[Any, str]] = {
    "task": ("reach-v3", "Meta-World task whose scripted expert acts"),
    "observation_sources": (json.dumps(METAWORLD_SOURCES), "JSON, the deploy node's form; one key: the expert's 39-dim state"),
    "twist_topic": ("/rtpolicy/cmd_twist", "geometry_msgs/TwistStamped out: action dims 0..2"),
    "gripper_topic": ("/rtpolicy/cmd_gripper", "std_msgs/Float64MultiArray out: action dim 3"),
    "noise": (0.0, "std of Gaussian noise added to the published action"),
    "seed": (0, "noise seed"),
    "frame_id": ("base_link", "header.frame_id of the twist"),
}


class TeleopNode(Node):
    """See the module docstring."""

    def __init__(self, overrides: dict[str, Any] | None = None, node_name: str = "rtpolicy_teleop", **kwargs: Any):
        from rtpolicy.envs.metaworld import STATE_DIM, expert_policy

        super().__init__(node_name, parameter_overrides=rosparams.parameter_overrides(overrides, PARAMETERS), **kwargs)
        rosparams.declare(self, PARAMETERS)
        self.p = p = rosparams.values(self, PARAMETERS)
        self.expert = expert_policy(p["task"])
        sources = json.loads(p["observation_sources"])
        if len(sources) != 1:
            raise ValueError(f"observation_sources: the expert reads one key (its state), got {sorted(sources)}")
        self.key = next(iter(sources))
        self.builder = ObservationBuilder(sources, {self.key: [STATE_DIM]}, obs_horizon=1)
        self.rng = np.random.default_rng(p["seed"])
        self.fresh: set[str] = set()
        self.commands = 0
        self.pub_twist = self.create_publisher(TwistStamped, p["twist_topic"], COMMAND_QOS)
        self.pub_grip = self.create_publisher(Float64MultiArray, p["gripper_topic"], COMMAND_QOS)
        for topic, kind in self.builder.kinds.items():
            if kind == "joint_state":
                self.create_subscription(JointState, topic, lambda m, t=topic: self._on_joints(t, m), SOURCE_QOS)
            elif kind == "array":
                self.create_subscription(Float64MultiArray, topic, lambda m, t=topic: self._on_array(t, m), SOURCE_QOS)
            else:
                raise ValueError(f"teleop reads joint_state and array sources only; {topic} is {kind}")
        # wakes the executor, so that SIGINT/SIGTERM are handled while no message comes
        self.create_timer(0.2, lambda: None)
        self.get_logger().info(f"{p['task']} expert on {sorted(self.builder.kinds)} -> {p['twist_topic']}, {p['gripper_topic']}")

    def _on_joints(self, topic: str, msg: JointState) -> None:
        self.builder.update_joint_state(topic, list(msg.name), {"position": msg.position, "velocity": msg.velocity,
                                                                 "effort": msg.effort})
        self._fresh(topic)

    def _on_array(self, topic: str, msg: Float64MultiArray) -> None:
        self.builder.update_array(topic, msg.data)
        self._fresh(topic)

    def _fresh(self, topic: str) -> None:
        """Act once every source topic has a message newer than the last command (one state, one command)."""
        self.fresh.add(topic)
        if len(self.fresh) < len(self.builder.kinds):
            return
        s = self.builder.current()
        if not s.valid:
            self.get_logger().warning(f"no action: {s.reason}", throttle_duration_sec=2.0)
            return
        self.fresh.clear()
        a = self.expert(s.vectors[self.key].astype(np.float64))
        if self.p["noise"] > 0:
            a = np.clip(a + self.rng.normal(0.0, self.p["noise"], a.shape), -1.0, 1.0)
        twist = TwistStamped()
        twist.header.stamp = self.get_clock().now().to_msg()
        twist.header.frame_id = self.p["frame_id"]
        twist.twist.linear.x, twist.twist.linear.y, twist.twist.linear.z = (float(x) for x in a[:3])
        self.pub_twist.publish(twist)
        self.pub_grip.publish(Float64MultiArray(data=[float(x) for x in a[3:]]))
        self.commands += 1
        self.last_command = time.monotonic()


def main(argv: list[str] | None = None) -> int:
    """``rtpolicy teleop task=reach-v3 [key=value ...] [--ros-args ...]``; returns the exit code."""
    from rtpolicy.deploy.rosnodes import spin_node

    overrides, ros_args = rosparams.parse_key_values(list(sys.argv[1:] if argv is None else argv))
    return spin_node(lambda context: TeleopNode(overrides, context=context), ros_args)
