"""Scripted experts: waypoint controllers in end-effector space reading the privileged simulator state.

Each task has a script (a Python generator yielding (5,) actions): approach at a safe height, descend,
grasp / hook / press / push, move, release. :class:`ScriptedExpert` runs the script of the env's
current (sub)task and restarts it whenever a new episode or subtask begins, so one expert instance
serves a whole chain. Motion actions are computed from the env's end-effector *target* (so the
commanded path does not overshoot), and a waypoint is reached when the measured TCP is within tolerance.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from rtpolicy.envs.calvin_like import scene as S
from rtpolicy.envs.calvin_like.chains import grasp_offset, grasp_yaw
from rtpolicy.envs.calvin_like.tasks import (
    Snapshot,
    grasped,
    on_table,
    quat_yaw,
    stacked_on,
    stacks,
    task_block,
)

if TYPE_CHECKING:
    from rtpolicy.envs.calvin_like.env import CalvinLikeEnv

SAFE_Z = 0.2
OPEN, CLOSE = -1.0, 1.0
Script = Iterator[np.ndarray]


class _Ctx:
    """What a script reads: the env's latest snapshot and controller target."""

    def __init__(self, env: "CalvinLikeEnv"):
        self.env = env

    @property
    def s(self) -> Snapshot:
        return self.env._snap

    @property
    def target(self) -> np.ndarray:
        return self.env._target


def _act(ctx: _Ctx, goal: np.ndarray, yaw: float | None, grip: float, speed: float) -> np.ndarray:
    from rtpolicy.envs.calvin_like.env import MAX_STEP, MAX_YAW

    a = np.zeros(5)
    v = (np.asarray(goal, dtype=np.float64) - ctx.target[:3]) / MAX_STEP
    peak = np.abs(v).max()
    if peak > speed:
        v *= speed / peak
    a[:3] = v
    if yaw is not None:
        # the hand yaw is a limited joint (not continuous): no wrap-around
        yaw = float(np.clip(yaw, -S.YAW_RANGE, S.YAW_RANGE))
        a[3] = np.clip((yaw - ctx.target[3]) / MAX_YAW, -1.0, 1.0)
    a[4] = grip
    return a


def move(ctx: _Ctx, goal, yaw: float | None, grip: float, tol: float = 0.006, speed: float = 1.0, max_steps: int = 60) -> Script:
    """Drive the TCP to ``goal`` (and the hand to ``yaw``) until within ``tol`` (or ``max_steps``)."""
    goal = np.asarray(goal, dtype=np.float64)
    for _ in range(max_steps):
        s = ctx.s
        if np.linalg.norm(goal - s.ee) < tol and (yaw is None or abs(np.clip(yaw, -S.YAW_RANGE, S.YAW_RANGE) - s.yaw) < 0.06):
            return
        yield _act(ctx, goal, yaw, grip, speed)


def wait(ctx: _Ctx, grip: float, steps: int) -> Script:
    for _ in range(steps):
        yield _act(ctx, ctx.target[:3], None, grip, 1.0)


def relax(ctx: _Ctx, grip: float, back: float = 0.01) -> Script:
    """Stop pressing: pull the target back to the measured TCP (and ``back`` metres away from
    whatever the hand was pushing), so that rising next does not drag a touched object along."""
    push = ctx.target[:3] - ctx.s.ee
    n = np.linalg.norm(push)
    if n < 0.003:
        return
    goal = ctx.s.ee - back * push / n
    yield _act(ctx, goal, None, grip, 1.0)
    yield _act(ctx, goal, None, grip, 1.0)


def travel(ctx: _Ctx, goal, yaw: float, grip: float, tol: float = 0.006) -> Script:
    """Rise to the safe height, cross over at it, then descend to ``goal``."""
    goal = np.asarray(goal, dtype=np.float64)
    s = ctx.s
    if np.linalg.norm(goal[:2] - s.ee[:2]) > 0.02:
        if s.ee[2] < SAFE_Z - 0.03:  # rise first, without changing the grip (do not re-grasp a released block)
            now = CLOSE if ctx.env._grip_closed else OPEN
            yield from relax(ctx, now)
            yield from move(ctx, [s.ee[0], s.ee[1], SAFE_Z], None, now, tol=0.02)
        yield from move(ctx, [goal[0], goal[1], max(SAFE_Z, goal[2])], yaw, grip, tol=0.015)
    yield from move(ctx, goal, yaw, grip, tol=tol)


def held_block(s: Snapshot) -> str | None:
    for c in S.BLOCKS:
        if grasped(s, c):
            return c
    d = {c: np.linalg.norm(s.pos[c] - s.ee) for c in S.BLOCKS}
    c = min(d, key=d.get)
    return c if d[c] < 0.05 else None


def _place(ctx: _Ctx, xy, bottom_z: float, yaw: float | None) -> Script:
    """Carry the held block so that its centre is over ``xy`` and its bottom at ``bottom_z``; release; rise."""
    s = ctx.s
    c = held_block(s)
    if c is None:
        return
    off = s.ee - s.pos[c]  # TCP relative to the block centre (kept while carrying)
    goal = np.array([xy[0] + off[0], xy[1] + off[1], bottom_z + S.BLOCK_HALF[c][2] + off[2]])
    if yaw is None:
        yaw = float(s.yaw)
    yield from travel(ctx, goal + [0, 0, 0.05], yaw, CLOSE, tol=0.01)
    s = ctx.s
    off = s.ee - s.pos[c]
    goal = np.array([xy[0] + off[0], xy[1] + off[1], bottom_z + S.BLOCK_HALF[c][2] + off[2]])
    yield from move(ctx, goal, yaw, CLOSE, tol=0.005, speed=0.6)
    yield from wait(ctx, OPEN, 5)
    yield from move(ctx, ctx.s.ee + [0, 0, 0.12], None, OPEN, tol=0.01)


def _side_yaw(s: Snapshot) -> float:
    """+-pi/2, whichever is closer to the current hand yaw (fingers then open along world x)."""
    return np.pi / 2 if s.yaw >= 0 else -np.pi / 2


def _grasp(ctx: _Ctx, c: str) -> Script:
    s = ctx.s
    p = s.pos[c].copy()
    gy = grasp_yaw(c, quat_yaw(s.quat[c]), 0.0)
    z = p[2] + grasp_offset(c)
    yield from travel(ctx, [p[0], p[1], z + 0.06], gy, OPEN, tol=0.01)
    p = ctx.s.pos[c]
    yield from move(ctx, [p[0], p[1], z], gy, OPEN, tol=0.005, speed=0.7)
    yield from wait(ctx, CLOSE, 5)


# ---------------------------------------------------------------------------------------------- scripts
def open_drawer(ctx: _Ctx) -> Script:
    x0, y0 = ctx.s.drawer_xy
    gap = (S.HANDLE_Y + 0.006 + S.DRAWER_FACE_Y) / 2  # between the bar and the face
    z = 0.06
    yield from travel(ctx, [x0, y0 + gap, z], 0.0, CLOSE, tol=0.005)
    y_open = ctx.env.layout.drawer_xy[1] - S.DRAWER_RANGE + gap - 0.01
    yield from move(ctx, [x0, y_open, z], 0.0, CLOSE, tol=0.005, speed=0.6)
    yield from move(ctx, [x0, y_open, SAFE_Z], 0.0, CLOSE)


def close_drawer(ctx: _Ctx) -> Script:
    x0, y0 = ctx.s.drawer_xy
    front = S.HANDLE_Y - 0.006 - 0.012  # hand centre touching the bar's front
    z = 0.06
    yield from travel(ctx, [x0, y0 + front - 0.015, z], 0.0, CLOSE, tol=0.005)
    y_closed = ctx.env.layout.drawer_xy[1] + front + 0.015
    yield from move(ctx, [x0, y_closed, z], 0.0, CLOSE, tol=0.005, speed=0.6)
    yield from move(ctx, [x0, y_closed - 0.03, SAFE_Z], 0.0, CLOSE)


def _knob_x(ctx: _Ctx, q: float) -> float:
    return float(ctx.env.layout.box_xy[0] - S.BOX_HALF[0] + S.LID_HALF_X + q)


def move_slider(ctx: _Ctx, sign: float) -> Script:
    """sign -1: left, +1: right. Push the lid knob sideways with the closed hand."""
    ky = float(ctx.env.layout.box_xy[1])
    kx = _knob_x(ctx, ctx.s.slider)
    side = S.KNOB_HALF[0] + S.FINGER_HALF[0] + 0.012
    z = S.KNOB_Z + S.FINGERTIP - 0.01
    yield from travel(ctx, [kx - sign * side, ky, z], 0.0, CLOSE, tol=0.006)
    end = _knob_x(ctx, 0.0 if sign < 0 else S.SLIDER_RANGE) + sign * 0.02
    yield from move(ctx, [end - sign * side, ky, z], 0.0, CLOSE, tol=0.005, speed=0.7)
    yield from move(ctx, [end - sign * side, ky, SAFE_Z], 0.0, CLOSE)


def press_button(ctx: _Ctx) -> Script:
    ux, uy = ctx.env.layout.button_xy
    yield from travel(ctx, [ux, uy, 0.09], 0.0, CLOSE, tol=0.008)
    z = S.BUTTON_TOP - 0.018 + S.FINGERTIP
    yield from move(ctx, [ux, uy, z], 0.0, CLOSE, tol=0.004, speed=0.7, max_steps=15)
    yield from wait(ctx, CLOSE, 2)
    yield from move(ctx, [ux, uy, 0.12], 0.0, CLOSE)


def push_switch(ctx: _Ctx, on: bool) -> Script:
    sx, sy = ctx.env.layout.switch_xy
    side = S.SWITCH_KNOB_HALF[1] + 0.012 + 0.012
    sign = 1.0 if on else -1.0
    z = 0.045
    ky = sy + ctx.s.switch
    yield from travel(ctx, [sx, ky - sign * side, z], 0.0, CLOSE, tol=0.005)
    end = sy + (S.SWITCH_RANGE + 0.01 if on else -0.01)
    yield from move(ctx, [sx, end - sign * side, z], 0.0, CLOSE, tol=0.004, speed=0.5)
    yield from move(ctx, [sx, end - sign * side, 0.15], 0.0, CLOSE)


def push_block(ctx: _Ctx, c: str, sign: float) -> Script:
    s = ctx.s
    p = s.pos[c].copy()
    yaw = quat_yaw(s.quat[c])
    hx, hy, _ = S.BLOCK_HALF[c]
    ext = abs(np.cos(yaw)) * hx + abs(np.sin(yaw)) * hy
    # hand turned by 90 deg: the closed fingers then form a 4 cm wide, 2.4 cm thick pusher along y
    behind = ext + 2 * S.FINGER_HALF[1] + 0.015
    z = S.FINGERTIP + 0.006
    yaw_h = _side_yaw(s)
    yield from travel(ctx, [p[0] - sign * behind, p[1], z], yaw_h, CLOSE, tol=0.006)
    yield from move(ctx, [p[0] + sign * 0.14 - sign * behind, p[1], z], yaw_h, CLOSE, tol=0.005, speed=0.5)
    yield from move(ctx, ctx.s.ee + [0, 0, 0.12], None, CLOSE)


def lift_block(ctx: _Ctx, c: str) -> Script:
    yield from _grasp(ctx, c)
    yield from move(ctx, ctx.s.ee + [0, 0, 0.1], None, CLOSE, tol=0.005, speed=0.6)
    yield from wait(ctx, CLOSE, 10)


def rotate_block(ctx: _Ctx, c: str, sign: float) -> Script:
    yield from _grasp(ctx, c)
    ee = ctx.s.ee.copy()
    yield from move(ctx, ee + [0, 0, 0.015], None, CLOSE, tol=0.004, speed=0.5)
    yaw = float(np.clip(ctx.s.yaw + sign * np.deg2rad(75), -S.YAW_RANGE + 0.05, S.YAW_RANGE - 0.05))
    yield from move(ctx, ee + [0, 0, 0.015], yaw, CLOSE, tol=0.006, speed=0.5)
    yield from move(ctx, ee + [0, 0, 0.003], yaw, CLOSE, tol=0.004, speed=0.5)
    yield from wait(ctx, OPEN, 5)
    yield from move(ctx, ee + [0, 0, 0.1], None, OPEN)


def place_in_drawer(ctx: _Ctx) -> Script:
    s = ctx.s
    x0, y0 = s.drawer_xy
    front_edge = ctx.env.layout.drawer_xy[1] - S.HOUSING_HALF[1]
    y = (y0 - S.DRAWER_HALF[1] + front_edge) / 2
    yield from _place(ctx, (x0, y), S.DRAWER_FLOOR + 0.012, _side_yaw(s))


def place_in_slider(ctx: _Ctx) -> Script:
    s = ctx.s
    bx, by = ctx.env.layout.box_xy
    lid = _knob_x(ctx, s.slider)
    left_gap = (lid - S.LID_HALF_X) - (bx - S.BOX_HALF[0])
    right_gap = (bx + S.BOX_HALF[0]) - (lid + S.LID_HALF_X)
    if right_gap >= left_gap:
        x = (lid + S.LID_HALF_X + bx + S.BOX_HALF[0]) / 2
    else:
        x = (bx - S.BOX_HALF[0] + lid - S.LID_HALF_X) / 2
    yield from _place(ctx, (x, by), 0.012, _side_yaw(s))


def free_blocks(s: Snapshot, exclude: str | None, layout) -> list[str]:
    """Blocks resting on the table with nothing on top, in BLOCKS order."""
    return [c for c in S.BLOCKS if c != exclude and on_table(s, c, layout) and not any(stacked_on(s, o, c) for o in S.BLOCKS if o != c)]


def stack_block(ctx: _Ctx) -> Script:
    s = ctx.s
    c = held_block(s)
    targets = free_blocks(s, c, ctx.env.layout)
    if c is None or not targets:
        return
    t = targets[0]
    p = s.pos[t]
    yield from _place(ctx, p[:2], p[2] + S.BLOCK_HALF[t][2] + 0.008, None)


def free_spot(ctx: _Ctx, c: str) -> np.ndarray:
    """A table spot in the block region as far as possible from the other blocks (deterministic)."""
    s = ctx.s
    lo, hi = ctx.env.layout.block_region
    xs, ys = np.meshgrid(np.linspace(lo[0], hi[0], 9), np.linspace(lo[1], hi[1], 7))
    cand = np.stack([xs.ravel(), ys.ravel()], axis=1)
    others = np.array([s.pos[o][:2] for o in S.BLOCKS if o != c])
    dist = np.linalg.norm(cand[:, None] - others[None], axis=-1).min(axis=1)
    dist -= 0.1 * np.linalg.norm(cand - s.pos[c][:2], axis=1)  # prefer nearby among the free spots
    dist[np.linalg.norm(cand[:, None] - others[None], axis=-1).min(axis=1) < 0.13] -= 10.0
    return cand[int(np.argmax(dist))]


def unstack_block(ctx: _Ctx) -> Script:
    pairs = stacks(ctx.s)
    if not pairs:
        return
    top, _ = pairs[0]
    yield from _grasp(ctx, top)
    yield from move(ctx, ctx.s.ee + [0, 0, 0.06], None, CLOSE, tol=0.008, speed=0.6)
    spot = free_spot(ctx, top)
    yield from _place(ctx, spot, 0.006, None)


def script_for(task: str, ctx: _Ctx) -> Script:
    """The generator that solves ``task`` from the current state."""
    c = task_block(task)
    if task == "open_drawer":
        return open_drawer(ctx)
    if task == "close_drawer":
        return close_drawer(ctx)
    if task.startswith("move_slider_"):
        return move_slider(ctx, -1.0 if task.endswith("left") else 1.0)
    if task.endswith("lightbulb"):
        return press_button(ctx)
    if task in ("turn_on_led", "turn_off_led"):
        return push_switch(ctx, task == "turn_on_led")
    if task.startswith("push_"):
        return push_block(ctx, c, -1.0 if task.endswith("left") else 1.0)
    if task.startswith("lift_"):
        return lift_block(ctx, c)
    if task.startswith("rotate_"):
        return rotate_block(ctx, c, 1.0 if task.endswith("left") else -1.0)
    if task == "place_in_drawer":
        return place_in_drawer(ctx)
    if task == "place_in_slider":
        return place_in_slider(ctx)
    if task == "stack_block":
        return stack_block(ctx)
    if task == "unstack_block":
        return unstack_block(ctx)
    raise ValueError(f"no expert for task {task!r}")


class ScriptedExpert:
    """obs -> action (5,) float32 in [-1, 1] for the env's current (sub)task.

    Stateful per episode: the script restarts when the env starts a new episode or subtask (or after
    :meth:`reset`). After its script ends it holds still with the gripper as it was.
    """

    def __init__(self, env: "CalvinLikeEnv", noise: float = 0.0, seed: int | None = None):
        if not noise >= 0:
            raise ValueError(f"noise must be >= 0, got {noise!r}")
        self.env = env
        self.noise = float(noise)
        self.rng = np.random.default_rng(seed)
        self._ctx = _Ctx(env)
        self._key: tuple[int, int] | None = None
        self._script: Script | None = None
        self._grip = OPEN

    def reset(self) -> None:
        self._key = None

    def __call__(self, obs: Any = None) -> np.ndarray:
        env = self.env
        if env._snap is None:
            raise RuntimeError("call env.reset() before querying the expert")
        key = (env._episode, env._sub)
        if key != self._key:
            self._key = key
            self._grip = CLOSE if env._grip_closed else OPEN
            self._script = script_for(env.current_task, self._ctx)
        try:
            a = next(self._script)
        except StopIteration:
            a = _act(self._ctx, env._target[:3], None, self._grip, 1.0)
        self._grip = a[4]
        if self.noise > 0:
            a = a.copy()
            a[:4] += self.rng.normal(0.0, self.noise, size=4)
        return np.clip(a, -1.0, 1.0).astype(np.float32)
