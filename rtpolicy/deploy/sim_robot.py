"""A simulated robot behind ROS 2 topics: a Meta-World task that the policy node can drive.

    rtpolicy sim task=reach-v3 seed=0 max_episode_steps=200 [step_on_command=false] [--ros-args ...]

Published (SensorData QoS), after every physics step and at ``control_rate_hz``:
    /joint_states    sensor_msgs/JointState, names hand_x, hand_y, hand_z, gripper_opening = state[0:4]
    /object_state    std_msgs/Float64MultiArray, state[4:39] (object poses, previous step, goal)
    image_topic      sensor_msgs/Image rgb8 (image_width x image_height, MuJoCo camera ``camera``; '' = the
                     env's default view), only when ``image_topic`` is set: rendered offscreen after each
                     physics step and reset, the latest frame republished with the state
Subscribed (reliable): the policy's TwistStamped (linear xyz -> action dims 0..2) and gripper
Float64MultiArray (data[0] -> action dim 3).

``step_on_command=true`` (lock-step): the physics steps once per received command pair (one twist and
one gripper message since the last step), so the simulated time advances exactly one env step per
policy command. ``false``: the physics steps on its own timer at ``control_rate_hz`` with the latest
command held (zero-order hold); the hand gets a zero delta when no command came within
``command_timeout_s``.

Episodes end on success or after ``max_episode_steps``; the node then publishes a JSON std_msgs/String
``{"episode", "seed", "success", "length"}`` on ``episode_topic``, sends ``episode`` on the policy's
``reset_topic`` and resets with the next seed (seed + episode index). ``max_episodes`` > 0 stops
stepping after that many episodes.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
from geometry_msgs.msg import TwistStamped
from rclpy.node import Node
from rclpy.qos import QoSDurabilityPolicy, QoSHistoryPolicy, QoSProfile, QoSReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Float64MultiArray, String

from rtpolicy.deploy import rosparams

JOINT_NAMES = ("hand_x", "hand_y", "hand_z", "gripper_opening")
COMMAND_QOS = QoSProfile(history=QoSHistoryPolicy.KEEP_LAST, depth=10, reliability=QoSReliabilityPolicy.RELIABLE,
                         durability=QoSDurabilityPolicy.VOLATILE)

PARAMETERS: dict[str, tuple[Any, str]] = {
    "env": ("metaworld", "environment family (rtpolicy.envs)"),
    "task": ("reach-v3", "task name, e.g. reach-v3"),
    "seed": (0, "layout seed of the first episode; episode i uses seed + i"),
    "max_episode_steps": (200, "steps before an episode is truncated"),
    "max_episodes": (0, "stop stepping after this many episodes; 0: never"),
    "step_on_command": (True, "true: one physics step per command pair (lock-step); false: step on a timer"),
    "control_rate_hz": (80.0, "timer rate: physics steps (step_on_command=false) and state republishing"),
    "command_timeout_s": (0.5, "step_on_command=false: older commands give a zero hand delta"),
    "joint_states_topic": ("/joint_states", "sensor_msgs/JointState out"),
    "object_state_topic": ("/object_state", "std_msgs/Float64MultiArray out"),
    "image_topic": ("", "sensor_msgs/Image out (rgb8); '' = no camera"),
    "image_width": (128, "camera image width (pixels)"),
    "image_height": (128, "camera image height (pixels)"),
    "camera": ("", "MuJoCo camera name of the image; '' = the env's default view"),
    "twist_topic": ("/rtpolicy/cmd_twist", "geometry_msgs/TwistStamped in"),
    "gripper_topic": ("/rtpolicy/cmd_gripper", "std_msgs/Float64MultiArray in"),
    "reset_topic": ("/rtpolicy/reset", "std_msgs/String out: 'episode' at every episode end"),
    "episode_topic": ("/rtpolicy/episode", "std_msgs/String out: JSON episode results"),
}


class SimRobotNode(Node):
    """See the module docstring. Callbacks share the node's default (mutually exclusive) group: the env is single-threaded."""

    def __init__(self, overrides: dict[str, Any] | None = None, node_name: str = "rtpolicy_sim", **kwargs: Any):
        from rtpolicy.envs import make_env

        super().__init__(node_name, parameter_overrides=rosparams.parameter_overrides(overrides, PARAMETERS), **kwargs)
        rosparams.declare(self, PARAMETERS)
        self.p = p = rosparams.values(self, PARAMETERS)
        for name in ("max_episode_steps", "control_rate_hz"):
            if not p[name] > 0:
                raise ValueError(f"{name} must be > 0, got {p[name]}")
        if p["seed"] < 0 or p["max_episodes"] < 0:
            raise ValueError(f"seed and max_episodes must be >= 0, got {p['seed']}, {p['max_episodes']}")
        camera = {"width": p["image_width"], "height": p["image_height"], "camera": p["camera"] or None} if p["image_topic"] else {}
        if camera and not (p["image_width"] > 0 and p["image_height"] > 0):
            raise ValueError(f"image_width and image_height must be > 0, got {p['image_width']}x{p['image_height']}")
        self.env = make_env({"env": p["env"], "name": p["task"], "max_episode_steps": p["max_episode_steps"]}, seed=p["seed"],
                            render=bool(camera), **camera)
        self.pub_image = self.create_publisher(Image, p["image_topic"], qos_profile_sensor_data) if camera else None
        self.frame: Image | None = None  # the latest rendered frame (re-rendered after each step and reset)
        self.pub_joints = self.create_publisher(JointState, p["joint_states_topic"], qos_profile_sensor_data)
        self.pub_objects = self.create_publisher(Float64MultiArray, p["object_state_topic"], qos_profile_sensor_data)
        self.pub_reset = self.create_publisher(String, p["reset_topic"], COMMAND_QOS)
        self.pub_episode = self.create_publisher(String, p["episode_topic"], COMMAND_QOS)
        self.create_subscription(TwistStamped, p["twist_topic"], self._on_twist, COMMAND_QOS)
        self.create_subscription(Float64MultiArray, p["gripper_topic"], self._on_gripper, COMMAND_QOS)
        self.episode = self.steps_total = self.bad_commands = 0
        self.results: list[dict[str, Any]] = []
        self.done = False
        self._hand = np.zeros(3)
        self._grip = 0.0
        self._hand_time = -np.inf
        self._new_twist = self._new_grip = False
        self._reset_env()
        self.create_timer(1.0 / p["control_rate_hz"], self._on_timer)
        mode = "one step per command pair" if p["step_on_command"] else f"free-running at {p['control_rate_hz']:g} Hz"
        self.get_logger().info(f"{p['task']} (seed {p['seed']}): {mode}")

    # ---------------------------------------------------------------- env
    def _reset_env(self) -> None:
        self.seed = self.p["seed"] + self.episode
        self.obs, _ = self.env.reset(seed=self.seed)
        self.length = 0
        self._publish_state(render=True)

    def _step(self, action: np.ndarray) -> None:
        if self.done:
            return
        self.obs, _, terminated, truncated, info = self.env.step(action)
        self.steps_total += 1
        self.length += 1
        self._publish_state(render=True)
        if terminated or truncated:
            result = {"episode": self.episode, "seed": self.seed, "success": bool(info["success"]), "length": self.length}
            self.results.append(result)
            self.pub_episode.publish(String(data=json.dumps(result)))
            self.pub_reset.publish(String(data="episode"))
            self.get_logger().info(f"episode {result}")
            self.episode += 1
            if self.p["max_episodes"] and self.episode >= self.p["max_episodes"]:
                self.done = True
                self.get_logger().info(f"{self.episode} episodes done; no more stepping")
            else:
                self._reset_env()

    def _publish_state(self, render: bool = False) -> None:
        state = np.asarray(self.obs["state"], dtype=np.float64)
        js = JointState(name=list(JOINT_NAMES), position=[float(x) for x in state[0:4]])
        js.header.stamp = self.get_clock().now().to_msg()
        self.pub_joints.publish(js)
        self.pub_objects.publish(Float64MultiArray(data=[float(x) for x in state[4:]]))
        if self.pub_image is None:
            return
        if render or self.frame is None:
            rgb = self.env.render()
            h, w = rgb.shape[:2]
            self.frame = Image(height=h, width=w, encoding="rgb8", step=3 * w, data=rgb.tobytes())
            self.frame.header.frame_id = self.p["camera"] or "sim_camera"
        self.frame.header.stamp = js.header.stamp
        self.pub_image.publish(self.frame)

    # ---------------------------------------------------------------- commands
    def _on_twist(self, msg: TwistStamped) -> None:
        hand = np.array([msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z])
        if not np.isfinite(hand).all():
            self.bad_commands += 1
            self.get_logger().error(f"non-finite twist {hand.tolist()} ignored", throttle_duration_sec=2.0)
            return
        self._hand, self._hand_time, self._new_twist = hand, time.monotonic(), True
        self._maybe_step_on_command()

    def _on_gripper(self, msg: Float64MultiArray) -> None:
        if len(msg.data) < 1 or not np.isfinite(msg.data[0]):
            self.bad_commands += 1
            self.get_logger().error(f"gripper command {list(msg.data)} ignored: need one finite value", throttle_duration_sec=2.0)
            return
        self._grip, self._new_grip = float(msg.data[0]), True
        self._maybe_step_on_command()

    def _maybe_step_on_command(self) -> None:
        if self.p["step_on_command"] and self._new_twist and self._new_grip:
            self._new_twist = self._new_grip = False
            self._step(np.array([*self._hand, self._grip]))

    def _on_timer(self) -> None:
        if self.p["step_on_command"]:
            self._publish_state()  # heartbeat: the state is current while no command comes
            return
        fresh = time.monotonic() - self._hand_time <= self.p["command_timeout_s"]
        self._step(np.array([*(self._hand if fresh else np.zeros(3)), self._grip]))
        if self.done:
            self._publish_state()

    def destroy_node(self) -> None:
        self.env.close()
        super().destroy_node()


def main(argv: list[str] | None = None) -> int:
    """``rtpolicy sim task=reach-v3 [key=value ...] [--ros-args ...]``; returns the exit code."""
    from rtpolicy.deploy.rosnodes import spin_node

    overrides, ros_args = rosparams.parse_key_values(list(sys.argv[1:] if argv is None else argv))
    return spin_node(lambda context: SimRobotNode(overrides, context=context), ros_args)
