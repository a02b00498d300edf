"""Scripted experts: controllers in end-effector space reading the privileged simulator state.

Each task has a script (a Python generator yielding (5,) actions). :class:`ScriptedExpert` runs the
script of the env's current (sub)task and restarts it whenever a new episode or subtask begins, so one
expert instance serves a whole chain; a script that ends without the task done is started again from
the current state (re-planned). Motion actions are computed from the env's end-effector *target* (so
the commanded path does not overshoot), and slow down within :data:`SLOW_DIST` of a goal (at most
``SLOW_MIN`` of full speed at the goal), so a waypoint is reached at low speed.

The block tasks (push, lift, rotate) are reactive: every step they decide from the current state
(grasped? above the block? aligned? how far has the block moved or turned since the subtask began?)
and aim at the block where it is now, so a block moved mid-approach is followed, a slipped grasp is
retried and a push that drifts sideways is corrected. The fixture tasks are waypoint scripts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from rtpolicy.envs.calvin_like import scene as S
from rtpolicy.envs.calvin_like.chains import grasp_offset, grasp_yaw
from rtpolicy.envs.calvin_like.goals import PUSH_BY, ROTATE_BY, block_goal, drawer_spot, free_blocks, free_spot, slider_spot
from rtpolicy.envs.calvin_like.tasks import (
    Snapshot,
    block_period,
    success,
    wrap,
    grasped,
    released,
    quat_yaw,
    stacks,
    task_block,
)

if TYPE_CHECKING:
    from rtpolicy.envs.calvin_like.env import CalvinLikeEnv

SAFE_Z = 0.2
OPEN, CLOSE = -1.0, 1.0
SLOW_DIST = 0.05  # m: within this distance of its goal a move slows down ...
SLOW_MIN = 0.3  # ... to at most this fraction of full speed at the goal
ROTATE_DONE = np.deg2rad(62.0)  # ... and releases it once it has turned this far (success needs 50 deg)
FAR = 0.05  # m: a block this far away in xy is approached over the safe height
Script = Iterator[np.ndarray]
MAX_RESTARTS = 3  # re-plans of a fixture script per subtask


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
    delta = np.asarray(goal, dtype=np.float64) - ctx.target[:3]
    speed = min(speed, max(SLOW_MIN, float(np.linalg.norm(delta)) / SLOW_DIST))  # slow down near the goal
    v = delta / MAX_STEP
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


def _fit_yaw(yaw: float, period: float, then: float = 0.0) -> float:
    """``yaw`` shifted by whole ``period``s so that ``yaw`` and ``yaw + then`` are both reachable, closest to the original."""
    lim = S.YAW_RANGE - 0.05
    cands = [yaw + k * period for k in range(-4, 5)]
    ok = [y for y in cands if abs(y) <= lim and abs(y + then) <= lim]
    return float(min(ok or cands, key=lambda y: abs(y - yaw)))


def _cross(ctx: _Ctx, p, yaw: float, grip: float) -> Script:
    """One step towards the point above ``p`` at the safe height: straight up first when below it."""
    s = ctx.s
    if s.ee[2] < SAFE_Z - 0.03:
        yield _act(ctx, [s.ee[0], s.ee[1], SAFE_Z], None, grip, 1.0)
    else:
        yield _act(ctx, [p[0], p[1], SAFE_Z], yaw, grip, 1.0)


def grasp_block(ctx: _Ctx, c: str, then: float = 0.0, max_steps: int = 100) -> Script:
    """Reactive grasp of block ``c``, re-planned every step from where the block is now; returns once it
    is grasped. The grasp yaw is the one closest to the hand's that leaves room to turn ``then`` after."""
    closing = 0
    for _ in range(max_steps):
        s = ctx.s
        if grasped(s, c) and closing >= 4:
            return
        p = s.pos[c]
        z = p[2] + grasp_offset(c)
        gy = _fit_yaw(grasp_yaw(c, quat_yaw(s.quat[c]), s.yaw), block_period(c), then)
        dxy = float(np.linalg.norm(p[:2] - s.ee[:2]))
        if closing:  # fingers closing at the block: hold still until they hold it (or retry)
            closing = closing + 1 if closing < 12 else 0
            yield _act(ctx, ctx.target[:3], None, CLOSE if closing else OPEN, 1.0)
            continue
        if ctx.env._grip_closed:  # closed on nothing: open first
            yield _act(ctx, ctx.target[:3], None, OPEN, 1.0)
            continue
        hover = z + 0.05
        if dxy > FAR:  # far away: cross over at the safe height (rising first)
            yield from _cross(ctx, p, gy, OPEN)
        elif dxy > 0.01 or abs(gy - s.yaw) > 0.1:  # not over the block: go above it (rising first when low)
            if s.ee[2] < hover - 0.02 and dxy > 0.02:
                yield _act(ctx, [s.ee[0], s.ee[1], hover], gy, OPEN, 1.0)
            else:
                yield _act(ctx, [p[0], p[1], hover], gy, OPEN, 1.0)
        elif abs(s.ee[2] - z) > 0.006 or dxy > 0.006:  # above it: descend, tracking it
            yield _act(ctx, [p[0], p[1], z], gy, OPEN, 0.7)
        else:
            closing = 1
            yield _act(ctx, ctx.target[:3], None, CLOSE, 1.0)


def push_block(ctx: _Ctx, c: str, sign: float) -> Script:
    """Reactive push by ``PUSH_BY`` along x (sign -1: left, +1: right), the hand turned by 90 deg so the
    closed fingers form a 4 cm wide, 2.4 cm thick pusher along y; it follows the block's y while pushing."""
    hz = S.BLOCK_HALF[c][2]
    z = S.FINGERTIP + 0.006
    z_hover = 2 * hz + S.FINGERTIP + 0.03
    dropping = 0
    while True:
        s, start = ctx.s, ctx.env._start_snap
        p = s.pos[c]
        yaw_h = _side_yaw(s)
        if dropping or (ctx.env._grip_closed and s.opening > 0.012 and s.ee[2] > z + 0.02):
            # something is held (e.g. left in the hand by the previous subtask): open and let it go first
            dropping = dropping + 1 if dropping < 6 else 0
            yield _act(ctx, ctx.target[:3], None, OPEN, 1.0)
            continue
        if sign * (p[0] - start.pos[c][0]) >= PUSH_BY or grasped(s, c):  # done (or stuck in the fingers): rise
            yield _act(ctx, [s.ee[0], s.ee[1], z_hover + 0.08], None, CLOSE if not grasped(s, c) else OPEN, 1.0)
            continue
        yaw = quat_yaw(s.quat[c])
        hx, hy, _ = S.BLOCK_HALF[c]
        ext = abs(np.cos(yaw)) * hx + abs(np.sin(yaw)) * hy
        behind = ext + 2 * S.FINGER_HALF[1] + 0.015
        gap = sign * (p[0] - s.ee[0])  # how far the TCP is behind the block centre along the push
        dy = p[1] - s.ee[1]
        yaw_ok = abs(yaw_h - s.yaw) < 0.12
        bx = p[0] - sign * behind
        if np.hypot(p[0] - s.ee[0], dy) > FAR + 0.05:  # far away: cross over at the safe height
            yield from _cross(ctx, [bx, p[1]], yaw_h, CLOSE)
        elif s.opening > 0.012 and s.ee[2] < z_hover:  # the fingers must be closed before going down
            yield _act(ctx, [s.ee[0], s.ee[1], z_hover], yaw_h, CLOSE, 1.0)
        elif yaw_ok and abs(dy) < 0.012 and gap > ext + 0.004 and s.ee[2] < z + 0.012:  # in the lane: push
            yield _act(ctx, [ctx.target[0] + sign * 0.05, p[1], z], yaw_h, CLOSE, 0.5)
        elif yaw_ok and abs(dy) < 0.01 and abs(s.ee[0] - bx) < 0.012:  # behind it: descend
            yield _act(ctx, [bx, p[1], z], yaw_h, CLOSE, 0.7)
        elif s.ee[2] < z_hover - 0.02 and not (gap > ext + 0.004 and abs(dy) < 0.03):  # low in the way: rise
            yield _act(ctx, [s.ee[0], s.ee[1], z_hover], yaw_h, CLOSE, 1.0)
        else:
            yield _act(ctx, [bx, p[1], z_hover if s.ee[2] > z + 0.012 else z], yaw_h, CLOSE, 1.0)


def lift_block(ctx: _Ctx, c: str) -> Script:
    """Reactive: grasp (again, if it slipped), then lift to 10 cm above the subtask-start height."""
    while True:
        s = ctx.s
        if not grasped(s, c):
            yield from grasp_block(ctx, c)
            continue
        z = ctx.env._start_snap.pos[c][2] + grasp_offset(c) + 0.1
        yield _act(ctx, [s.ee[0], s.ee[1], z], None, CLOSE, 0.6)


def rotate_block(ctx: _Ctx, c: str, sign: float) -> Script:
    """Reactive: grasp, lift 1.5 cm, turn until the block is ``ROTATE_BY`` from its subtask-start yaw, open
    where it is (the block drops 1.5 cm back onto the table) and rise once it is free (sign +1: left /
    counterclockwise). Letting go at once, rather than lowering first, ties the release to one observable
    threshold (``goal_rel``'s remaining yaw) instead of a 5 mm height window a policy does not learn to hit."""
    lifted = False
    while True:
        s, start = ctx.s, ctx.env._start_snap
        turned = sign * wrap(quat_yaw(s.quat[c]) - quat_yaw(start.quat[c]))
        rest_z = S.BLOCK_HALF[c][2] + grasp_offset(c)
        if turned >= ROTATE_DONE:
            if grasped(s, c) or not released(s, c):  # let go where it is (1.5 cm up): open and hold still until free
                yield _act(ctx, ctx.target[:3], None, OPEN, 1.0)
            else:
                yield _act(ctx, [s.ee[0], s.ee[1], rest_z + 0.1], None, OPEN, 1.0)
            continue
        if not grasped(s, c):
            lifted = False
            yield from grasp_block(ctx, c, then=sign * (ROTATE_BY - turned))
            continue
        z = rest_z + 0.015
        if not lifted:
            lifted = s.ee[2] > z - 0.004
            yield _act(ctx, [s.ee[0], s.ee[1], z], None, CLOSE, 0.5)
            continue
        goal_yaw = float(np.clip(s.yaw + sign * (ROTATE_BY - turned), -S.YAW_RANGE + 0.05, S.YAW_RANGE - 0.05))
        yield _act(ctx, [s.ee[0], s.ee[1], z], goal_yaw, CLOSE, 0.5)


def place_in_drawer(ctx: _Ctx) -> Script:
    s = ctx.s
    yield from _place(ctx, drawer_spot(s, ctx.env.layout), S.DRAWER_FLOOR + 0.012, _side_yaw(s))


def place_in_slider(ctx: _Ctx) -> Script:
    s = ctx.s
    yield from _place(ctx, slider_spot(s, ctx.env.layout), 0.012, _side_yaw(s))


def stack_block(ctx: _Ctx) -> Script:
    """Put the held block on the first free table block (in BLOCKS order) of the subtask's start (goals.block_goal)."""
    s = ctx.s
    c = held_block(s)
    g = block_goal("stack_block", ctx.env._start_snap, s, ctx.env.layout)
    if c is None or g is None:
        targets = free_blocks(s, c, ctx.env.layout)
        if c is None or not targets:
            return
        p = s.pos[targets[0]]
        yield from _place(ctx, p[:2], p[2] + S.BLOCK_HALF[targets[0]][2] + 0.008, None)
        return
    _, xyz, _ = g
    yield from _place(ctx, xyz[:2], xyz[2] - S.BLOCK_HALF[g[0]][2], None)


def unstack_block(ctx: _Ctx) -> Script:
    pairs = stacks(ctx.s)
    if not pairs:
        return
    top, _ = pairs[0]
    yield from _grasp(ctx, top)
    yield from move(ctx, ctx.s.ee + [0, 0, 0.06], None, CLOSE, tol=0.008, speed=0.6)
    g = block_goal("unstack_block", ctx.env._start_snap, ctx.s, ctx.env.layout)
    spot = g[1][:2] if g is not None else free_spot(ctx.s, top, ctx.env.layout)
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
        self._restarts = 0

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
            self._restarts = 0
        a = None
        try:
            a = next(self._script)
        except StopIteration:
            # the script ended without the task done (e.g. the scene was disturbed): plan again from here
            if self._restarts < MAX_RESTARTS and not success(env.current_task, env._start_snap, env._snap, env.layout):
                self._restarts += 1
                self._script = script_for(env.current_task, self._ctx)
                a = next(self._script, None)
        if a is None:
            a = _act(self._ctx, env._target[:3], None, self._grip, 1.0)
        self._grip = a[4]
        if self.noise > 0:
            a = a.copy()
            a[:4] += self.rng.normal(0.0, self.noise, size=4)
        return np.clip(a, -1.0, 1.0).astype(np.float32)
