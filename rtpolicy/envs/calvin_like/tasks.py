"""Tasks of the CALVIN-like benchmark: names, instructions, success predicates and symbolic feasibility.

* :data:`TASKS` - ordered task names; the index is the task id observed as ``obs["task_id"]``.
* :data:`INSTRUCTIONS` - task -> list of natural-language instructions (>= 3 each);
  :data:`ALL_INSTRUCTIONS` flattens them (``obs["instruction_id"]`` indexes it).
* :class:`Snapshot` - the privileged simulator state the predicates read (built by the env).
* :func:`success` - ``success(task, start, now, layout)``: the predicate of ``task`` evaluated on the
  state ``now`` relative to ``start``, the state when the (sub)task began (as CALVIN does).
* :class:`SymState`, :func:`feasible`, :func:`apply_effect` - the symbolic scene state the chain
  sampler simulates (drawer open?, slider right?, lights, where each block is).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from rtpolicy.envs.calvin_like.scene import (
    BLOCK_HALF,
    BLOCKS,
    BOX_HALF,
    BOX_RIM,
    DRAWER_HALF,
    DRAWER_WALL_TOP,
    SLIDER_RANGE,
    Layout,
)

# ---------------------------------------------------------------------------------------------- names
_CORE = [
    "open_drawer",
    "close_drawer",
    "move_slider_left",
    "move_slider_right",
    "turn_on_lightbulb",
    "turn_off_lightbulb",
    "turn_on_led",
    "turn_off_led",
]
TASKS: list[str] = (
    _CORE
    + [f"push_{c}_block_{d}" for c in BLOCKS for d in ("left", "right")]
    + [f"lift_{c}_block_table" for c in BLOCKS]
    + ["place_in_drawer", "place_in_slider", "stack_block", "unstack_block"]
    + [f"rotate_{c}_block_{d}" for c in BLOCKS for d in ("left", "right")]
)
TASK_INDEX = {t: i for i, t in enumerate(TASKS)}


def _block_instructions() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for c in BLOCKS:
        for d in ("left", "right"):
            out[f"push_{c}_block_{d}"] = [
                f"push the {c} block to the {d}",
                f"slide the {c} block towards the {d}",
                f"nudge the {c} block {d}wards",
                f"push the {c} block {d}",
            ]
            turn = "counterclockwise" if d == "left" else "clockwise"
            out[f"rotate_{c}_block_{d}"] = [
                f"rotate the {c} block to the {d}",
                f"turn the {c} block {turn}",
                f"grasp the {c} block and twist it to the {d}",
                f"take the {c} block and rotate it {d}",
            ]
        out[f"lift_{c}_block_table"] = [
            f"lift the {c} block from the table",
            f"pick up the {c} block",
            f"grasp the {c} block and lift it up",
            f"take the {c} block off the table",
        ]
    return out


INSTRUCTIONS: dict[str, list[str]] = {
    "open_drawer": ["open the drawer", "pull the drawer open", "pull the handle to open the drawer", "grasp the drawer handle and open it"],
    "close_drawer": ["close the drawer", "push the drawer shut", "push the handle to close the drawer", "slide the drawer closed"],
    "move_slider_left": ["move the sliding door to the left", "push the slider to the left", "slide the lid of the box to the left", "move the slider left"],
    "move_slider_right": ["move the sliding door to the right", "push the slider to the right", "slide the lid of the box to the right", "move the slider right"],
    "turn_on_lightbulb": ["turn on the light bulb", "press the button to switch on the yellow light", "toggle the button to turn the bulb on", "make the light bulb glow"],
    "turn_off_lightbulb": ["turn off the light bulb", "press the button to switch off the yellow light", "toggle the button to turn the bulb off", "switch the bulb off"],
    "turn_on_led": ["turn on the led", "push the switch back to turn on the green light", "switch the led on", "move the switch to light up the led"],
    "turn_off_led": ["turn off the led", "pull the switch forward to turn off the green light", "switch the led off", "move the switch to turn the led off"],
    "place_in_drawer": ["place the block in the drawer", "put the grasped block into the drawer", "drop the object inside the drawer", "store the block in the open drawer"],
    "place_in_slider": ["place the block in the sliding cabinet", "put the grasped block into the box under the slider", "drop the object into the storage box", "store the block in the cabinet"],
    "stack_block": ["stack the block on top of another block", "put the grasped block on another block", "place the block onto the other block", "build a tower of two blocks"],
    "unstack_block": ["take the top block off the stack", "unstack the blocks", "remove the upper block from the tower", "put the stacked block back on the table"],
    **_block_instructions(),
}
assert set(INSTRUCTIONS) == set(TASKS)

ALL_INSTRUCTIONS: list[str] = [s for t in TASKS for s in INSTRUCTIONS[t]]
INSTRUCTION_OFFSET: dict[str, int] = {}
_o = 0
for _t in TASKS:
    INSTRUCTION_OFFSET[_t] = _o
    _o += len(INSTRUCTIONS[_t])

CHAIN_RE = re.compile(r"^chain(\d+)$")


def check_task_name(name: Any) -> str:
    """``name`` if it is a task of :data:`TASKS` or ``chainN``, else a ValueError naming close tasks."""
    if isinstance(name, str) and (name in TASK_INDEX or (CHAIN_RE.match(name) and int(name[5:]) >= 1)):
        return name
    close = difflib.get_close_matches(str(name), TASKS + ["chain5"], n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ValueError(f"unknown calvin_like task {name!r}; {hint}available: {', '.join(TASKS)} or chainN (e.g. chain5)")


def task_block(task: str) -> str | None:
    """The block colour a task is about (push/lift/rotate), else None."""
    for c in BLOCKS:
        if f"_{c}_" in task:
            return c
    return None


# ---------------------------------------------------------------------------------------------- thresholds
DRAWER_OPEN_SUCCESS = 0.15  # open_drawer succeeds once the drawer is out this far ...
DRAWER_CLOSED_SUCCESS = 0.03  # ... close_drawer once it is in this far
DRAWER_OPEN_SYM = 0.1  # symbolic "open"
SLIDER_MOVE = 0.15  # move_slider_* needs this displacement
SWITCH_ON_SUCCESS, SWITCH_OFF_SUCCESS = 0.045, 0.015
PUSH_DIST = 0.08  # push_* needs this x displacement
LIFT_HEIGHT = 0.05
ROTATE_ANGLE = np.deg2rad(50.0)
REST_TOL = 0.007  # |z - rest height| for "resting"


# ---------------------------------------------------------------------------------------------- state
@dataclass
class Snapshot:
    """Privileged simulator state read by the predicates and experts (all in world frame, metres)."""

    ee: np.ndarray  # (3,) TCP position
    yaw: float  # hand yaw (rad)
    opening: float  # finger opening (m), 0 = closed
    drawer: float
    slider: float
    button: float  # depression (m, >= 0)
    switch: float
    bulb: bool
    led: bool
    drawer_xy: np.ndarray  # tray body origin (world) including its current opening
    pos: dict[str, np.ndarray]  # block -> (3,)
    quat: dict[str, np.ndarray]  # block -> (4,) wxyz
    touch: dict[str, tuple[bool, bool]]  # block -> (touches left finger, touches right finger)


def block_period(c: str) -> float:
    """The yaw symmetry of block ``c``: pi/2 for a square footprint, pi otherwise."""
    return float(np.pi / 2 if abs(BLOCK_HALF[c][0] - BLOCK_HALF[c][1]) < 1e-6 else np.pi)


def quat_yaw(q: np.ndarray) -> float:
    """Yaw (rad) of a wxyz quaternion."""
    w, x, y, z = (float(v) for v in q)
    return float(np.arctan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z)))


def quat_up(q: np.ndarray) -> float:
    """z component of the body z axis (1 = upright)."""
    w, x, y, z = (float(v) for v in q)
    return 1.0 - 2.0 * (x * x + y * y)


def wrap(a: float) -> float:
    return float((a + np.pi) % (2 * np.pi) - np.pi)




def in_drawer(s: Snapshot, layout: Layout, c: str) -> bool:
    rel = s.pos[c][:2] - s.drawer_xy
    return bool(abs(rel[0]) < DRAWER_HALF[0] and abs(rel[1]) < DRAWER_HALF[1] and s.pos[c][2] < DRAWER_WALL_TOP)


def in_slider(s: Snapshot, layout: Layout, c: str) -> bool:
    rel = s.pos[c][:2] - layout.box_xy
    return bool(abs(rel[0]) < BOX_HALF[0] and abs(rel[1]) < BOX_HALF[1] and s.pos[c][2] < BOX_RIM)


def on_table(s: Snapshot, c: str, layout: Layout) -> bool:
    """Block ``c`` rests upright on the table (not in the drawer, the storage box or on a block)."""
    if abs(s.pos[c][2] - BLOCK_HALF[c][2]) >= REST_TOL or abs(quat_up(s.quat[c])) <= 0.95:
        return False
    return not in_slider(s, layout, c) and not in_drawer(s, layout, c)


def stacked_on(s: Snapshot, top: str, bottom: str) -> bool:
    dxy = np.linalg.norm(s.pos[top][:2] - s.pos[bottom][:2])
    dz = s.pos[top][2] - s.pos[bottom][2] - BLOCK_HALF[top][2] - BLOCK_HALF[bottom][2]
    return bool(dxy < 0.035 and abs(dz) < 0.012)


def released(s: Snapshot, c: str) -> bool:
    return not (s.touch[c][0] or s.touch[c][1])


def grasped(s: Snapshot, c: str) -> bool:
    return bool(s.touch[c][0] and s.touch[c][1])


def stacks(s: Snapshot) -> list[tuple[str, str]]:
    return [(a, b) for a in BLOCKS for b in BLOCKS if a != b and stacked_on(s, a, b)]


def success(task: str, start: Snapshot, now: Snapshot, layout: Layout) -> bool:
    """Whether ``task`` has been achieved in state ``now``, relative to the subtask's start state ``start``."""
    if task == "open_drawer":
        return now.drawer >= DRAWER_OPEN_SUCCESS and now.drawer - start.drawer > 0.08
    if task == "close_drawer":
        return now.drawer <= DRAWER_CLOSED_SUCCESS and start.drawer - now.drawer > 0.08
    if task == "move_slider_left":
        return start.slider - now.slider >= SLIDER_MOVE
    if task == "move_slider_right":
        return now.slider - start.slider >= SLIDER_MOVE
    if task == "turn_on_lightbulb":
        return not start.bulb and now.bulb
    if task == "turn_off_lightbulb":
        return start.bulb and not now.bulb
    if task == "turn_on_led":
        return not start.led and now.switch >= SWITCH_ON_SUCCESS
    if task == "turn_off_led":
        return start.led and now.switch <= SWITCH_OFF_SUCCESS
    c = task_block(task)
    if task.startswith("push_"):
        dx = now.pos[c][0] - start.pos[c][0]
        sign = -1.0 if task.endswith("left") else 1.0
        return bool(on_table(start, c, layout) and on_table(now, c, layout) and sign * dx >= PUSH_DIST and not grasped(now, c))
    if task.startswith("lift_"):
        return bool(on_table(start, c, layout) and now.pos[c][2] - start.pos[c][2] >= LIFT_HEIGHT and grasped(now, c))
    if task.startswith("rotate_"):
        dyaw = wrap(quat_yaw(now.quat[c]) - quat_yaw(start.quat[c]))
        sign = 1.0 if task.endswith("left") else -1.0
        return bool(on_table(now, c, layout) and sign * dyaw >= ROTATE_ANGLE and released(now, c))
    if task == "place_in_drawer":
        return any(not in_drawer(start, layout, b) and in_drawer(now, layout, b) and released(now, b) for b in BLOCKS)
    if task == "place_in_slider":
        return any(not in_slider(start, layout, b) and in_slider(now, layout, b) and released(now, b) for b in BLOCKS)
    if task == "stack_block":
        before = set(stacks(start))
        return any(p not in before and released(now, p[0]) for p in stacks(now))
    if task == "unstack_block":
        now_stacks = set(stacks(now))
        return any(p not in now_stacks and on_table(now, p[0], layout) and released(now, p[0]) for p in stacks(start))
    raise ValueError(f"no predicate for task {task!r}")


# ---------------------------------------------------------------------------------------------- symbolic state
@dataclass
class SymState:
    """Symbolic scene state for chain sampling.

    ``loc[c]`` is "table", "drawer", "slider", "held" or "on:<colour>"; ``xy[c]`` the (predicted)
    table position of a block on the table, None when not known (e.g. after unstack_block).
    """

    drawer_open: bool
    slider_right: bool
    bulb: bool
    led: bool
    loc: dict[str, str] = field(default_factory=dict)
    xy: dict[str, tuple[float, float] | None] = field(default_factory=dict)

    @property
    def held(self) -> str | None:
        return next((c for c in BLOCKS if self.loc[c] == "held"), None)

    def free_on_table(self, c: str) -> bool:
        """On the table with nothing on top."""
        return self.loc[c] == "table" and not any(self.loc[o] == f"on:{c}" for o in BLOCKS)

    def copy(self) -> "SymState":
        return replace(self, loc=dict(self.loc), xy=dict(self.xy))


PUSH_PREDICT = 0.09  # predicted displacement of a pushed block
PUSH_ROOM = 0.11  # the push target must stay this far inside the block region (+ margin)


def _push_ok(sym: SymState, c: str, sign: float, layout: Layout) -> bool:
    if sym.held is not None or not sym.free_on_table(c) or sym.xy[c] is None:
        return False
    lo, hi = layout.block_region
    x, y = sym.xy[c]
    if not (lo[0] - 0.02 <= x + sign * PUSH_ROOM <= hi[0] + 0.02):
        return False
    for o in BLOCKS:
        if o == c or sym.loc[o] not in ("table",) and not sym.loc[o].startswith("on:"):
            continue
        base = o if sym.loc[o] == "table" else sym.loc[o][3:]
        if sym.xy.get(base) is None:
            return False  # a block somewhere unknown on the table: do not risk a collision
        ox, oy = sym.xy[base]
        rel = sign * (ox - x)
        if abs(oy - y) < 0.09 and -0.15 < rel < 0.22:
            return False
    return True


def feasible(task: str, sym: SymState, layout: Layout) -> bool:
    """Whether ``task`` can be started (and is not already achieved) from symbolic state ``sym``."""
    held = sym.held
    if task.startswith("place_in_") or task == "stack_block":
        if held is None:
            return False
        if task == "place_in_drawer":
            return sym.drawer_open and not any(v == "drawer" for v in sym.loc.values())
        if task == "place_in_slider":
            return not any(v == "slider" for v in sym.loc.values())
        return any(o != held and sym.free_on_table(o) for o in BLOCKS)
    if held is not None:
        return False  # with a block in hand only placing/stacking makes sense
    if task == "open_drawer":
        return not sym.drawer_open
    if task == "close_drawer":
        return sym.drawer_open
    if task == "move_slider_left":
        return sym.slider_right
    if task == "move_slider_right":
        return not sym.slider_right
    if task == "turn_on_lightbulb":
        return not sym.bulb
    if task == "turn_off_lightbulb":
        return sym.bulb
    if task == "turn_on_led":
        return not sym.led
    if task == "turn_off_led":
        return sym.led
    if task == "unstack_block":
        return any(v.startswith("on:") for v in sym.loc.values())
    c = task_block(task)
    if task.startswith("push_"):
        return _push_ok(sym, c, -1.0 if task.endswith("left") else 1.0, layout)
    if task.startswith("lift_") or task.startswith("rotate_"):
        return sym.free_on_table(c)
    raise ValueError(f"no feasibility rule for task {task!r}")


def stack_target(sym: SymState) -> str | None:
    """The block stack_block puts the held block on: the first free table block in BLOCKS order."""
    held = sym.held
    return next((o for o in BLOCKS if o != held and sym.free_on_table(o)), None)


def apply_effect(task: str, sym: SymState) -> SymState:
    """The symbolic state after ``task`` succeeded from ``sym``."""
    s = sym.copy()
    held = s.held
    if task == "open_drawer":
        s.drawer_open = True
    elif task == "close_drawer":
        s.drawer_open = False
    elif task == "move_slider_left":
        s.slider_right = False
    elif task == "move_slider_right":
        s.slider_right = True
    elif task in ("turn_on_lightbulb", "turn_off_lightbulb"):
        s.bulb = task == "turn_on_lightbulb"
    elif task in ("turn_on_led", "turn_off_led"):
        s.led = task == "turn_on_led"
    elif task == "place_in_drawer":
        s.loc[held], s.xy[held] = "drawer", None
    elif task == "place_in_slider":
        s.loc[held], s.xy[held] = "slider", None
    elif task == "stack_block":
        # the expert stacks onto the first free table block in BLOCKS order (see stack_target)
        target = stack_target(s)
        s.loc[held], s.xy[held] = f"on:{target}", None
    elif task == "unstack_block":
        top = next(c for c in BLOCKS if s.loc[c].startswith("on:"))
        s.loc[top], s.xy[top] = "table", None
    else:
        c = task_block(task)
        if task.startswith("push_"):
            x, y = s.xy[c]
            s.xy[c] = (x + (-PUSH_PREDICT if task.endswith("left") else PUSH_PREDICT), y)
        elif task.startswith("lift_"):
            s.loc[c], s.xy[c] = "held", None
    return s


def symbolic_state(s: Snapshot, layout: Layout) -> SymState:
    """The symbolic state of a simulator snapshot."""
    loc: dict[str, str] = {}
    xy: dict[str, tuple[float, float] | None] = {}
    for c in BLOCKS:
        xy[c] = None
        if grasped(s, c) and s.pos[c][2] > BLOCK_HALF[c][2] + 0.01:
            loc[c] = "held"
        elif in_drawer(s, layout, c):
            loc[c] = "drawer"
        elif in_slider(s, layout, c):
            loc[c] = "slider"
        elif on_table(s, c, layout):
            loc[c] = "table"
            xy[c] = (float(s.pos[c][0]), float(s.pos[c][1]))
        else:
            under = next((b for b in BLOCKS if b != c and stacked_on(s, c, b)), None)
            loc[c] = f"on:{under}" if under else "unknown"
    return SymState(
        drawer_open=s.drawer > DRAWER_OPEN_SYM,
        slider_right=s.slider > SLIDER_RANGE / 2,
        bulb=bool(s.bulb),
        led=bool(s.led),
        loc=loc,
        xy=xy,
    )
