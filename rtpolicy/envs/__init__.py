"""Simulation environments for demonstration collection and policy evaluation.

Each environment family (``task.env`` in the config) registers a ``gymnasium.Env`` subclass in
:data:`ENVS`; :func:`make_env` builds one task of a family. Every family's env takes
``(task_cfg, seed=None, render=False, max_episode_steps=None)`` and returns observation dicts
``{"state": (D,) float32, ...}`` (plus ``"task_id"`` for multi-task configs), terminates on success
(``info["success"]``, a bool) and is absorbing once an episode has ended, so vectorized batches of
episodes of different lengths are safe.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium
import numpy as np

from rtpolicy.envs.gl import configure_gl
from rtpolicy.registry import Registry

configure_gl()  # before any family imports mujoco

ENVS: Registry[gymnasium.Env] = Registry("env family")

# the fields of a TaskConfig that the environments read
TASK_FIELDS = ("env", "name", "max_episode_steps", "num_tasks", "task_id", "obs_keys", "image_size")


def check_action(action: Any, dim: int) -> np.ndarray:
    """An env action -> (dim,) float64 clipped to [-1, 1]; ValueError for a wrong shape or a non-finite value."""
    a = np.asarray(action, dtype=np.float64)
    if a.shape != (dim,):
        raise ValueError(f"action must have shape ({dim},), got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"action has a non-finite value: {a}")
    return np.clip(a, -1.0, 1.0)


def task_fields(task_cfg: Any) -> dict[str, Any]:
    """The env-relevant fields of a task config (dataclass, DictConfig or mapping) as plain Python values.

    The result is picklable and holds no interpolations, so it can travel to simulator worker processes.
    """
    out = {}
    for key in TASK_FIELDS:
        if isinstance(task_cfg, Mapping):
            value = task_cfg.get(key, None)
        else:
            value = getattr(task_cfg, key, None)
        if value is None and key in ("env", "name"):
            raise ValueError(f"task config has no {key!r}; got {task_cfg!r:.200}")
        out[key] = value
    out["max_episode_steps"] = int(out["max_episode_steps"] if out["max_episode_steps"] is not None else 200)
    out["num_tasks"] = int(out["num_tasks"] or 0)
    out["task_id"] = int(out["task_id"] or 0)
    if out["num_tasks"] and not 0 <= out["task_id"] < out["num_tasks"]:
        raise ValueError(f"task_id must be in [0, num_tasks={out['num_tasks']}), got {out['task_id']}")
    out["env"], out["name"] = str(out["env"]), str(out["name"])
    out["obs_keys"] = [str(k) for k in (out["obs_keys"] or ["state"])]  # rgb_<camera> keys: the env renders them
    out["image_size"] = int(out["image_size"] or 84)
    kwargs = task_cfg.get("env_kwargs", None) if isinstance(task_cfg, Mapping) else getattr(task_cfg, "env_kwargs", None)
    out["env_kwargs"] = dict(kwargs or {})  # extra constructor arguments of the family's env (e.g. a scene)
    return out


def _suite_tasks(task_cfg: Any) -> list[str]:
    """A task config's ``tasks`` (a suite's member names; [] for one task)."""
    return [str(t) for t in ((task_cfg.get("tasks") if isinstance(task_cfg, Mapping) else getattr(task_cfg, "tasks", None)) or [])]


def suite_members(task_cfg: Any) -> list[dict[str, Any]]:
    """The member tasks of a suite config (``tasks`` non-empty) as env fields with their task ids; [] otherwise."""
    tasks = _suite_tasks(task_cfg)
    if not tasks:
        return []
    fields = task_fields(task_cfg)
    if fields["num_tasks"] != len(tasks):
        raise ValueError(f"task {fields['name']!r} lists {len(tasks)} tasks but num_tasks={fields['num_tasks']}; they must match")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"task {fields['name']!r} lists a task twice: {tasks}")
    return [fields | {"name": str(name), "task_id": i} for i, name in enumerate(tasks)]


def make_env(task_cfg: Any, seed: int | None = None, render: bool = False, **kwargs: Any) -> gymnasium.Env:
    """Build the environment of ``task_cfg.env`` (a registered family) for task ``task_cfg.name``.

    ``render=True`` enables offscreen RGB rendering (``env.render()`` -> (H, W, 3) uint8);
    extra keyword arguments (e.g. ``max_episode_steps``, ``width``, ``height``) go to the family's env.
    """
    fields = task_fields(task_cfg)
    check_env_kwargs(fields["env"], fields["env_kwargs"])
    return ENVS.build(fields["env"], fields, seed=seed, render=render, **(fields["env_kwargs"] | kwargs))


def check_store_actions(task_cfg: Any, action_shape: Any, where: str) -> None:
    """UserError (one line) when the env of single task ``task_cfg`` takes actions of another shape than the
    store ``where`` holds, e.g. a robosuite store of deltas (7,) for ``action_mode: absolute`` (10,): found before
    training, not by the evaluation after it. Builds the env once (no reset)."""
    env = make_env(task_cfg, seed=0)
    try:
        shape = tuple(int(n) for n in env.action_space.shape)
    finally:
        env.close()
    if shape != tuple(int(n) for n in action_shape):
        from rtpolicy.errors import UserError

        fields = task_fields(task_cfg)
        kwargs = f" with env_kwargs {fields['env_kwargs']}" if fields["env_kwargs"] else ""
        raise UserError(f"{where} holds actions of shape {tuple(action_shape)}, but {fields['env']} {fields['name']}{kwargs} "
                        f"takes {shape}; use a store collected for it (e.g. another task.dataset with task.collect=true)")


def check_env_kwargs(family: str, env_kwargs: Mapping[str, Any]) -> None:
    """UserError naming the key when ``task.env_kwargs`` has a key the family's env constructor does not take."""
    import inspect

    params = inspect.signature(ENVS.get(family).cls.__init__).parameters
    known = sorted(n for n, p in params.items() if n not in ("self", "task_cfg") and p.kind is not p.VAR_KEYWORD)
    unknown = sorted(set(env_kwargs) - set(known))
    if unknown:
        from rtpolicy.errors import UserError

        raise UserError(f"task.env_kwargs: unknown key {unknown[0]!r} for env family {family!r} (it takes: {', '.join(known)})")


def env_instructions(family: str) -> list[str]:
    """The instruction texts ``obs["instruction_id"]`` indexes in a family's envs ([] for a family without
    language); a language-conditioned policy's processor featurizes them (:mod:`rtpolicy.processors`)."""
    return list(getattr(ENVS.get(family).cls, "INSTRUCTIONS", ()))


def env_rotations(task: Any) -> dict[str, list[int]]:
    """{vector obs key: [start, ...]}: where a task's observations hold quaternions (x, y, z, w), which the policy
    reads as rotation-matrix columns (:mod:`rtpolicy.processors`); {} for a family that declares none. A family
    declares them with a classmethod ``rotations(fields) -> dict`` on its env class, given :func:`task_fields`
    plus ``tasks`` (a suite's member names)."""
    fields = task_fields(task) | {"tasks": _suite_tasks(task)}
    rotations = getattr(ENVS.get(fields["env"]).cls, "rotations", None)
    return {k: [int(i) for i in v] for k, v in rotations(fields).items()} if rotations is not None else {}


def env_factory(fields: dict[str, Any], seed: int | None, render: bool, kwargs: dict[str, Any]) -> gymnasium.Env:
    """Top-level (picklable by reference) builder for worker processes; use with ``functools.partial``."""
    return make_env(fields, seed=seed, render=render, **kwargs)


# families register themselves on import; their simulator libraries are imported lazily
from rtpolicy.envs import metaworld as _metaworld  # noqa: E402,F401
from rtpolicy.envs import calvin_like as _calvin_like  # noqa: E402,F401
from rtpolicy.envs import robosuite as _robosuite  # noqa: E402,F401
