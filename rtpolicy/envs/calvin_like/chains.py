"""Initial scene states (randomized, seeded by the caller's RNG) and the feasible-chain sampler.

:class:`InitSpec` describes a scene state that :meth:`CalvinLikeEnv._apply_init` writes into the
simulator; :func:`random_init` draws the chain-mode start, :func:`init_for_task` one in which a single
task is feasible (e.g. a block already in hand for place_in_drawer, a stack for unstack_block), and
:func:`sample_chain` draws N distinct tasks, each feasible in the symbolic state the previous ones
lead to (:func:`rtpolicy.envs.calvin_like.tasks.feasible` / ``apply_effect``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rtpolicy.envs.calvin_like.scene import BLOCK_HALF, BLOCKS, DRAWER_RANGE, FINGERTIP, SLIDER_RANGE, SWITCH_RANGE, Layout
from rtpolicy.envs.calvin_like.tasks import (
    DRAWER_OPEN_SYM,
    TASKS,
    SymState,
    apply_effect,
    block_period,
    feasible,
    wrap,
)

MIN_BLOCK_DIST = 0.12  # spawn distance between block centres


@dataclass
class InitSpec:
    """A scene state to reset to. Block poses are (x, y, yaw) on the table; ``held`` is grasped by the
    gripper (at the gripper pose), ``stack = (top, bottom)`` puts ``top`` on ``bottom``."""

    drawer: float
    slider: float
    switch: float
    bulb: bool
    gripper: np.ndarray  # (4,) x, y, z, yaw
    blocks: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    held: str | None = None
    stack: tuple[str, str] | None = None


def grasp_offset(c: str) -> float:
    """TCP height above the centre of block ``c`` when grasped (keeps the fingertips off the table)."""
    return max(0.0, FINGERTIP + 0.005 - BLOCK_HALF[c][2])


def grasp_yaw(c: str, block_yaw: float, ref: float = 0.0) -> float:
    """The gripper yaw closest to ``ref`` that closes the fingers across block ``c``'s local y axis."""
    period = block_period(c)
    k = np.round((ref - block_yaw) / period)
    return float(block_yaw + k * period)


def sample_blocks(layout: Layout, rng: np.random.Generator, colors=BLOCKS, min_dist: float = MIN_BLOCK_DIST):
    """Non-overlapping (x, y, yaw) table poses in the layout's block region."""
    lo, hi = layout.block_region
    for _ in range(10000):
        xy = rng.uniform(lo, hi, size=(len(colors), 2))
        d = np.linalg.norm(xy[:, None] - xy[None], axis=-1) + np.eye(len(colors))
        if d.min() >= min_dist:
            yaw = rng.uniform(-np.pi / 2, np.pi / 2, size=len(colors))
            return {c: (float(xy[i, 0]), float(xy[i, 1]), float(yaw[i])) for i, c in enumerate(colors)}
    raise RuntimeError("could not place the blocks")


def _drawer(rng, open_: bool) -> float:
    return float(rng.uniform(0.17, DRAWER_RANGE) if open_ else rng.uniform(0.0, 0.02))


def _slider(rng, right: bool) -> float:
    return float(rng.uniform(SLIDER_RANGE - 0.03, SLIDER_RANGE) if right else rng.uniform(0.0, 0.03))


def _switch(rng, on: bool) -> float:
    return float(rng.uniform(0.05, SWITCH_RANGE) if on else rng.uniform(0.0, 0.01))


def random_init(layout: Layout, rng: np.random.Generator) -> InitSpec:
    """A random start: fixtures in random discrete states (with jitter), all blocks on the table."""
    lo, hi = layout.block_region
    cx = (lo[0] + hi[0]) / 2
    gripper = np.array([rng.uniform(cx - 0.1, cx + 0.1), rng.uniform(-0.15, 0.0), rng.uniform(0.15, 0.25), rng.uniform(-0.3, 0.3)])
    return InitSpec(
        drawer=_drawer(rng, rng.random() < 0.5),
        slider=_slider(rng, rng.random() < 0.5),
        switch=_switch(rng, rng.random() < 0.5),
        bulb=bool(rng.random() < 0.5),
        gripper=gripper,
        blocks=sample_blocks(layout, rng),
    )


def init_symbolic(spec: InitSpec) -> SymState:
    """The symbolic state of an :class:`InitSpec`."""
    loc = {c: "table" for c in BLOCKS}
    xy: dict = {c: spec.blocks[c][:2] for c in BLOCKS}
    if spec.held:
        loc[spec.held], xy[spec.held] = "held", None
    if spec.stack:
        top, bottom = spec.stack
        loc[top], xy[top] = f"on:{bottom}", None
    return SymState(
        drawer_open=spec.drawer > DRAWER_OPEN_SYM,
        slider_right=spec.slider > SLIDER_RANGE / 2,
        bulb=spec.bulb,
        led=spec.switch > 0.03,
        loc=loc,
        xy=xy,
    )


def init_for_task(task: str, layout: Layout, rng: np.random.Generator) -> InitSpec:
    """A random start in which ``task`` is feasible (and not yet achieved)."""
    for _ in range(1000):
        spec = random_init(layout, rng)
        if task in ("open_drawer", "close_drawer"):
            spec.drawer = _drawer(rng, task == "close_drawer")
        elif task.startswith("move_slider_"):
            spec.slider = _slider(rng, task.endswith("left"))
        elif task in ("turn_on_lightbulb", "turn_off_lightbulb"):
            spec.bulb = task == "turn_off_lightbulb"
        elif task in ("turn_on_led", "turn_off_led"):
            spec.switch = _switch(rng, task == "turn_off_led")
        elif task in ("place_in_drawer", "place_in_slider", "stack_block"):
            if task == "place_in_drawer":
                spec.drawer = _drawer(rng, True)
            c = BLOCKS[rng.integers(len(BLOCKS))]
            spec.held = c
            x, y, yaw = spec.blocks[c]
            spec.gripper = np.array([x, y, rng.uniform(0.1, 0.16), wrap(grasp_yaw(c, yaw))])
        elif task == "unstack_block":
            i, j = rng.choice(len(BLOCKS), size=2, replace=False)
            spec.stack = (BLOCKS[i], BLOCKS[j])
        if feasible(task, init_symbolic(spec), layout):
            return spec
    raise RuntimeError(f"could not sample a start in which {task!r} is feasible")


def sample_chain(sym: SymState, n: int, layout: Layout, rng: np.random.Generator, tasks=TASKS) -> list[str]:
    """``n`` distinct tasks, each feasible from the symbolic state the previous ones lead to.

    Randomized depth-first search: at every step a uniformly random feasible task is tried first;
    dead ends (e.g. a lifted block that cannot be put anywhere) backtrack.
    """
    if n > len(tasks):
        raise ValueError(f"a chain of {n} distinct tasks needs at least {n} tasks, there are {len(tasks)}")

    def dfs(state: SymState, chain: list[str]) -> list[str] | None:
        if len(chain) == n:
            return chain
        options = [t for t in tasks if t not in chain and feasible(t, state, layout)]
        for k in rng.permutation(len(options)):
            t = options[k]
            out = dfs(apply_effect(t, state), chain + [t])
            if out is not None:
                return out
        return None

    out = dfs(sym, [])
    if out is None:
        raise RuntimeError(f"no feasible chain of {n} tasks from {sym}")
    return out


__all__ = ["InitSpec", "grasp_offset", "grasp_yaw", "random_init", "init_for_task", "init_symbolic", "sample_chain"]
