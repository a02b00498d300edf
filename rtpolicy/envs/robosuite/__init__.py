"""robosuite manipulation tasks (robomimic's setup) with scripted experts.

Env family ``robosuite`` (:class:`RobosuiteEnv`, see :mod:`.env` for spaces and episode semantics): Lift,
Stack, PickPlaceCan and NutAssemblySquare (:data:`TASKS`) on the Panda with OSC_POSE at 20 Hz; observations
with robomimic's key names; scripted experts via ``env.expert()`` (:mod:`.experts`); expert check:
``python -m rtpolicy.envs.robosuite.check_experts --episodes 100``. robosuite itself is imported when the
first env is built (``pip install 'rtpolicy[robosuite]'``).
"""

from __future__ import annotations

from rtpolicy.envs.robosuite.env import ACTION_DIM, CAMERAS, OBJECT_DIMS, RobosuiteEnv
from rtpolicy.envs.robosuite.tasks import ALIASES, TASKS, check_task_name

__all__ = ["RobosuiteEnv", "TASKS", "ALIASES", "CAMERAS", "OBJECT_DIMS", "ACTION_DIM", "check_task_name"]
