"""CALVIN-style long-horizon, language-conditioned MuJoCo tabletop benchmark with scripted experts.

Env family ``calvin_like`` (:class:`CalvinLikeEnv`, see :mod:`.env` for spaces and episode semantics):
single tasks from :data:`TASKS` or ``chainN`` chains of feasible subtasks; scenes "A"-"D"
(:mod:`.scene`); instructions in :data:`INSTRUCTIONS` / :data:`ALL_INSTRUCTIONS`; scripted experts
via ``env.expert()`` (:mod:`.experts`); expert check: ``python -m rtpolicy.envs.calvin_like.check_experts``.

Gymnasium ids: ``rtpolicy/CalvinLike-v0`` (``gymnasium.make(..., task="open_drawer")``) and
``rtpolicy/CalvinLikeChain-v0`` (``gymnasium.make(..., length=5)``).
"""

from __future__ import annotations

from typing import Any

import gymnasium

from rtpolicy.envs.calvin_like.env import ACTION_DIM, GOAL_REL_DIM, GOAL_REL_NAMES, OBJECTS_REL_DIM, OBJECTS_REL_NAMES, REL_DIM, REL_NAMES, STATE_DIM, STATE_NAMES, CalvinLikeEnv
from rtpolicy.envs.calvin_like.scene import LAYOUTS
from rtpolicy.envs.calvin_like.tasks import ALL_INSTRUCTIONS, INSTRUCTIONS, TASKS


def make_single(task: str = "open_drawer", max_episode_steps: int = 200, **kwargs: Any) -> CalvinLikeEnv:
    """gymnasium entry point of ``rtpolicy/CalvinLike-v0``."""
    return CalvinLikeEnv({"name": task, "max_episode_steps": max_episode_steps}, **kwargs)


def make_chain(length: int = 5, subtask_steps: int | None = None, **kwargs: Any) -> CalvinLikeEnv:
    """gymnasium entry point of ``rtpolicy/CalvinLikeChain-v0``."""
    return CalvinLikeEnv({"name": f"chain{int(length)}"}, subtask_steps=subtask_steps, **kwargs)


for _id, _entry in (("rtpolicy/CalvinLike-v0", make_single), ("rtpolicy/CalvinLikeChain-v0", make_chain)):
    if _id not in gymnasium.registry:
        gymnasium.register(_id, entry_point=f"{__name__}:{_entry.__name__}")

__all__ = ["CalvinLikeEnv", "TASKS", "INSTRUCTIONS", "ALL_INSTRUCTIONS", "STATE_NAMES", "STATE_DIM", "REL_NAMES", "REL_DIM", "OBJECTS_REL_NAMES", "OBJECTS_REL_DIM", "GOAL_REL_NAMES", "GOAL_REL_DIM", "ACTION_DIM", "LAYOUTS", "make_single", "make_chain"]
