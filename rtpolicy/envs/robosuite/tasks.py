"""The robosuite tasks of the ``robosuite`` env family, configured as robomimic configures them.

robomimic's low-dim and image datasets (v0.1 / v1.5) use the Panda with the OSC_POSE controller in
delta mode (position delta up to 5 cm, rotation delta up to 0.5 rad per unit action, kp 150, critically
damped), ``control_freq=20``, ``reward_shaping=False``, object observations on, the default object
placement of each environment (randomized positions and z-rotations) and the cameras ``agentview`` and
``robot0_eye_in_hand`` at 84x84.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from rtpolicy.errors import UserError


@dataclass(frozen=True)
class TaskSpec:
    """One task: the robosuite environment name and our episode limit."""

    name: str  # robosuite env name, e.g. "PickPlaceCan"
    max_episode_steps: int  # at 20 Hz; robomimic's rollout horizon is 400 for Lift/Can/Square
    description: str


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("Lift", 400, "lift the cube (its centre > 4 cm above the table)"),
        TaskSpec("Stack", 400, "put the red cube (A) on the green cube (B) and let go"),
        TaskSpec("PickPlaceCan", 400, "put the can into its compartment of the right bin"),
        TaskSpec("NutAssemblySquare", 400, "put the square nut on the square peg (down to the table)"),
    )
}
# short names people use (robomimic's dataset folders): lift, stack, can, square
ALIASES = {"lift": "Lift", "stack": "Stack", "can": "PickPlaceCan", "square": "NutAssemblySquare"}

CAMERAS = ("agentview", "robot0_eye_in_hand", "frontview", "birdview", "sideview")
ROBOT_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")  # robomimic's low-dim robot keys
ROBOT_DIMS = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2}


def check_task_name(name: Any) -> str:
    """The robosuite env name of ``name`` (a key of :data:`TASKS` or an alias), else a UserError naming the close ones."""
    if isinstance(name, str):
        if name in TASKS:
            return name
        if name.lower() in ALIASES:
            return ALIASES[name.lower()]
    names = list(TASKS) + list(ALIASES)
    close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UserError(f"unknown robosuite task {name!r}; {hint}available: {', '.join(TASKS)} (or {', '.join(ALIASES)})")


def controller_config(input_type: str = "delta") -> dict[str, Any]:
    """robosuite 1.5's composite config for the Panda with robomimic's OSC_POSE arm controller (base frame), taking
    deltas (robomimic's datasets) or, with ``input_type="absolute"``, target poses (Chi et al.'s position control)."""
    from robosuite.controllers import load_composite_controller_config

    cfg = load_composite_controller_config(controller="BASIC", robot="Panda")
    arm = cfg["body_parts"]["right"]
    expected = {"type": "OSC_POSE", "kp": 150, "damping_ratio": 1, "input_type": "delta", "uncouple_pos_ori": True,
                "output_max": [0.05, 0.05, 0.05, 0.5, 0.5, 0.5]}
    wrong = {k: arm.get(k) for k, v in expected.items() if arm.get(k) != v}
    if wrong:  # a robosuite release changed the defaults robomimic's numbers assume
        raise RuntimeError(f"robosuite's Panda BASIC controller differs from robomimic's OSC_POSE in {wrong}; expected {expected}")
    arm["input_type"] = input_type
    return cfg
