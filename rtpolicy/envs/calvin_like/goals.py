"""Where a block (sub)task wants its block: the observable goal shared by the ``"goal_rel"`` observation and the experts.

:func:`block_goal` -> (block, goal centre xyz, remaining yaw) for the current (sub)task, from the snapshot now and
the snapshot at the (sub)task's start (CALVIN scores against the start state, so the goal is a function of both):

* push: the start position moved by :data:`PUSH_BY` along x (left -, right +);
* lift: the start position raised by :data:`LIFT_BY`;
* rotate: the block where it is now, and the yaw still to turn to reach :data:`ROTATE_BY` from the start yaw
  (signed, rad; counterclockwise +);
* place_in_drawer / place_in_slider: the centre of the free floor the expert puts the held block on;
* stack_block: on top of the first free table block (in BLOCKS order) at the start, where that block is now;
* unstack_block: the free table spot (:func:`free_spot`) computed at the start.

The block is the one ``"target_rel"`` shows: the named block of push / lift / rotate, the block held at the
start for place / stack, the top block of unstack. Fixture tasks have no block goal (None).
"""

from __future__ import annotations

import numpy as np

from rtpolicy.envs.calvin_like import scene as S
from rtpolicy.envs.calvin_like.tasks import (
    Snapshot,
    grasped,
    on_table,
    quat_yaw,
    stacked_on,
    stacks,
    task_block,
    wrap,
)

PUSH_BY = 0.11  # m: the push expert pushes a block this far in x from its subtask-start position (success: 8 cm)
LIFT_BY = 0.1  # m: the lift expert raises a block this far above its subtask-start height (success: 5 cm)
ROTATE_BY = np.deg2rad(75.0)  # the rotate expert turns a block this far from its subtask-start yaw (success: 50 deg)
DRAWER_DROP = 0.012  # m: a placed block's bottom this far above the drawer floor / box bottom when released
BOX_DROP = 0.012
STACK_GAP = 0.008  # m: a stacked block's bottom this far above the lower block's top when released
UNSTACK_DROP = 0.006


def goal_block(task: str, start: Snapshot) -> str | None:
    """The block (sub)task ``task`` is about, decided at its start (see ``"target_rel"``), or None."""
    c = task_block(task)
    if c is not None:
        return c
    if task == "unstack_block":
        pairs = stacks(start)
        return pairs[0][0] if pairs else None
    held = [b for b in S.BLOCKS if grasped(start, b)]
    return held[0] if held else None


def free_blocks(s: Snapshot, exclude: str | None, layout) -> list[str]:
    """Blocks resting on the table with nothing on top, in BLOCKS order."""
    return [c for c in S.BLOCKS if c != exclude and on_table(s, c, layout) and not any(stacked_on(s, o, c) for o in S.BLOCKS if o != c)]


def free_spot(s: Snapshot, c: str, layout) -> np.ndarray:
    """(2,) a table spot in the block region as far as possible from the other blocks (deterministic)."""
    lo, hi = layout.block_region
    xs, ys = np.meshgrid(np.linspace(lo[0], hi[0], 9), np.linspace(lo[1], hi[1], 7))
    cand = np.stack([xs.ravel(), ys.ravel()], axis=1)
    others = np.array([s.pos[o][:2] for o in S.BLOCKS if o != c])
    dist = np.linalg.norm(cand[:, None] - others[None], axis=-1).min(axis=1)
    dist -= 0.1 * np.linalg.norm(cand - s.pos[c][:2], axis=1)  # prefer nearby among the free spots
    dist[np.linalg.norm(cand[:, None] - others[None], axis=-1).min(axis=1) < 0.13] -= 10.0
    return cand[int(np.argmax(dist))]


def drawer_spot(s: Snapshot, layout) -> np.ndarray:
    """(2,) where the expert puts a block in the (open) drawer: its x centre, between the tray's back and the housing front."""
    x0, y0 = s.drawer_xy
    front_edge = layout.drawer_xy[1] - S.HOUSING_HALF[1]
    return np.array([x0, (y0 - S.DRAWER_HALF[1] + front_edge) / 2])


def slider_spot(s: Snapshot, layout) -> np.ndarray:
    """(2,) the centre of the wider uncovered part of the storage box (beside the sliding lid)."""
    bx, by = layout.box_xy
    lid = float(layout.box_xy[0] - S.BOX_HALF[0] + S.LID_HALF_X + s.slider)
    left_gap = (lid - S.LID_HALF_X) - (bx - S.BOX_HALF[0])
    right_gap = (bx + S.BOX_HALF[0]) - (lid + S.LID_HALF_X)
    if right_gap >= left_gap:
        return np.array([(lid + S.LID_HALF_X + bx + S.BOX_HALF[0]) / 2, by])
    return np.array([(bx - S.BOX_HALF[0] + lid - S.LID_HALF_X) / 2, by])


def block_goal(task: str, start: Snapshot, now: Snapshot, layout) -> tuple[str, np.ndarray, float] | None:
    """(block, goal centre (3,) world xyz, yaw still to turn (rad)) of ``task`` from ``start`` to ``now``; None
    for fixture tasks and place / stack / unstack when there is no block to move (or nowhere to put it)."""
    c = goal_block(task, start)
    if c is None:
        return None
    hz = S.BLOCK_HALF[c][2]
    if task.startswith("push_"):
        sign = -1.0 if task.endswith("left") else 1.0
        return c, start.pos[c] + np.array([sign * PUSH_BY, 0.0, 0.0]), 0.0
    if task.startswith("lift_"):
        return c, start.pos[c] + np.array([0.0, 0.0, LIFT_BY]), 0.0
    if task.startswith("rotate_"):
        sign = 1.0 if task.endswith("left") else -1.0
        turned = wrap(quat_yaw(now.quat[c]) - quat_yaw(start.quat[c]))
        return c, now.pos[c].copy(), float(sign * ROTATE_BY - turned)
    if task == "place_in_drawer":
        xy, z = drawer_spot(now, layout), S.DRAWER_FLOOR + DRAWER_DROP + hz
    elif task == "place_in_slider":
        xy, z = slider_spot(now, layout), BOX_DROP + hz
    elif task == "stack_block":
        targets = free_blocks(start, c, layout)
        if not targets:
            return None
        t = targets[0]
        xy, z = now.pos[t][:2], now.pos[t][2] + S.BLOCK_HALF[t][2] + STACK_GAP + hz
    elif task == "unstack_block":
        xy, z = free_spot(start, c, layout), UNSTACK_DROP + hz
    else:
        return None
    return c, np.array([xy[0], xy[1], z], dtype=np.float64), 0.0
