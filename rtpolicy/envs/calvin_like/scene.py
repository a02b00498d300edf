"""MJCF of the CALVIN-like tabletop (generated as a string, no external assets) and its scene layouts.

World frame: the table top is the plane z = 0, +x is "right" and +y points away from the static
camera ("back"). Fixtures (positions depend on the layout, see :class:`Layout`):

* drawer: a tray on a slide joint (``drawer``, range [0, 0.2] m, opening toward -y) inside a fixed
  housing; a handle bar stands 5 cm in front of the tray's front face.
* slider: an open-top storage box at the back of the table with a sliding lid (joint ``slider``,
  range [0, 0.22] m along +x); q = 0 means the lid covers the left half ("slider left").
* button: a spring-loaded cap (joint ``button``, z in [-0.02, 0]) that toggles the light bulb.
* switch: a knob on a slide joint (``switch``, range [0, 0.06] m along +y) that turns the LED on
  above :data:`SWITCH_THRESHOLD`.
* three free blocks ``red`` / ``blue`` / ``pink`` (box half sizes in :data:`BLOCK_HALF`).

The gripper is a floating two-finger hand: nested slide joints ``gx``, ``gy``, ``gz`` and a hinge
``gyaw`` driven by position actuators (gravity compensated), plus two finger slide joints whose
position actuators close the fingers with a bounded force. The tool centre point (TCP) is the
origin of body ``hand``; the fingertips are 2.5 cm below it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TIMESTEP = 0.002  # s per physics step
FRAME_SKIP = 20  # physics steps per env step -> 40 ms (25 Hz)

# blocks: box half sizes (x, y, z) in metres; fingers always close along the block's local y
BLOCK_HALF = {
    "red": (0.025, 0.025, 0.025),
    "blue": (0.022, 0.022, 0.03),
    "pink": (0.035, 0.02, 0.018),
}
BLOCK_RGBA = {"red": "0.85 0.12 0.1 1", "blue": "0.15 0.3 0.85 1", "pink": "0.95 0.45 0.7 1"}
BLOCK_MASS = {"red": 0.08, "blue": 0.08, "pink": 0.06}
BLOCKS = ("red", "blue", "pink")

# fixture geometry (metres); shared by the experts and predicates
DRAWER_RANGE = 0.2
DRAWER_HALF = (0.12, 0.10)  # tray interior half extents (x, y) relative to the tray body
DRAWER_FLOOR = 0.015  # tray floor top z
DRAWER_WALL_TOP = 0.085
DRAWER_FACE_Y = -0.11  # tray front face (outer) y relative to the tray body
HANDLE_Y = -0.16  # handle bar centre y relative to the tray body
HANDLE_Z = 0.05
HOUSING_HALF = (0.14, 0.11)
HOUSING_TOP = (0.105, 0.115)  # housing top plate z range

SLIDER_RANGE = 0.22
BOX_HALF = (0.22, 0.055)  # storage box interior half extents
BOX_RIM = 0.07
LID_HALF_X = 0.11
KNOB_HALF = (0.012, 0.012, 0.02)
KNOB_Z = 0.1  # lid knob centre z

BUTTON_RANGE = 0.02
BUTTON_TOP = 0.03  # cap top z when released
BUTTON_THRESHOLD = 0.012  # depression that toggles the light bulb
BUTTON_REARM = 0.005  # the button re-arms once it is back above this depression

SWITCH_RANGE = 0.06
SWITCH_THRESHOLD = 0.03  # LED on when the switch is above this
SWITCH_KNOB_HALF = (0.012, 0.012, 0.025)
SWITCH_KNOB_Z = 0.035

# gripper
FINGER_OPEN = 0.035  # per-finger opening (inner face distance from the TCP plane)
FINGER_HALF = (0.02, 0.006, 0.06)  # finger box half sizes in the hand frame
FINGER_Z = 0.035  # finger box centre z in the hand frame (tips 2.5 cm below the TCP)
FINGERTIP = 0.025  # fingertips are this far below the TCP
PALM_Z = 0.105  # palm box centre z in the hand frame
WORKSPACE_LOW = np.array([-0.5, -0.32, 0.015])
WORKSPACE_HIGH = np.array([0.5, 0.34, 0.4])
YAW_RANGE = 3.0

TABLE_HALF = (0.55, 0.34)
TABLE_CENTER_Y = 0.02


@dataclass(frozen=True)
class Layout:
    """Where the fixtures are in one scene (CALVIN's A/B/C/D idea: same objects, moved around).

    ``mirror`` = -1 flips the drawer / slider box / button+switch column to the other side;
    ``swap`` exchanges the button and switch positions.
    """

    name: str
    mirror: float
    swap: bool
    table_rgba: str
    slider_shift: float = 0.0

    @property
    def drawer_xy(self) -> np.ndarray:  # tray body origin at q = 0
        return np.array([0.32 * self.mirror, 0.14])

    @property
    def box_xy(self) -> np.ndarray:  # storage box centre
        return np.array([-0.12 * self.mirror + self.slider_shift, 0.245])

    @property
    def button_xy(self) -> np.ndarray:
        return np.array([-0.43 * self.mirror, 0.08 if self.swap else -0.14])

    @property
    def switch_xy(self) -> np.ndarray:  # knob position at q = 0
        return np.array([-0.43 * self.mirror, -0.16 if self.swap else 0.06])

    @property
    def block_region(self) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) xy box in which blocks are spawned and may be pushed."""
        lo, hi = (-0.30, 0.10) if self.mirror > 0 else (-0.10, 0.30)
        return np.array([lo, -0.2]), np.array([hi, 0.1])

    @property
    def bulb_xy(self) -> np.ndarray:
        return np.array([-0.47 * self.mirror, 0.3])

    @property
    def led_xy(self) -> np.ndarray:  # on top of the drawer housing, at its back
        return self.drawer_xy + np.array([0.0, 0.06])


LAYOUTS = {
    "A": Layout("A", 1.0, False, "0.62 0.5 0.38 1"),
    "B": Layout("B", -1.0, False, "0.55 0.55 0.58 1"),
    "C": Layout("C", 1.0, True, "0.42 0.3 0.22 1", slider_shift=0.02),
    "D": Layout("D", -1.0, True, "0.75 0.72 0.66 1", slider_shift=-0.02),
}

LIGHT_OFF_RGBA = np.array([0.35, 0.35, 0.35, 1.0])
BULB_ON_RGBA = np.array([1.0, 0.9, 0.2, 1.0])
LED_ON_RGBA = np.array([0.1, 1.0, 0.2, 1.0])


def get_layout(scene: str) -> Layout:
    if not isinstance(scene, str) or scene not in LAYOUTS:
        raise ValueError(f"unknown scene {scene!r}; available: {', '.join(LAYOUTS)}")
    return LAYOUTS[scene]


def _v(*xs: float) -> str:
    return " ".join(f"{x:.5g}" for x in xs)


def _box(name: str, pos, half, rgba: str, extra: str = "") -> str:
    return f'<geom name="{name}" type="box" pos="{_v(*pos)}" size="{_v(*half)}" rgba="{rgba}" {extra}/>'


def build_xml(scene: str = "A") -> str:
    """The MJCF string of scene ``scene`` (one of :data:`LAYOUTS`)."""
    L = get_layout(scene)
    dx, dy = L.drawer_xy
    bx, by = L.box_xy
    ux, uy = L.button_xy
    sx, sy = L.switch_xy
    wood, dark, metal = "0.5 0.36 0.25 1", "0.3 0.22 0.16 1", "0.7 0.7 0.72 1"
    vis = 'contype="0" conaffinity="0" group="1"'
    hx, hy = HOUSING_HALF
    tx, ty = DRAWER_HALF
    w = 0.005  # wall half thickness

    housing = "\n".join([
        _box("housing_top", (dx, dy, sum(HOUSING_TOP) / 2), (hx, hy, (HOUSING_TOP[1] - HOUSING_TOP[0]) / 2), wood),
        _box("housing_left", (dx - hx + w, dy, HOUSING_TOP[0] / 2), (w, hy, HOUSING_TOP[0] / 2), wood),
        _box("housing_right", (dx + hx - w, dy, HOUSING_TOP[0] / 2), (w, hy, HOUSING_TOP[0] / 2), wood),
        _box("housing_back", (dx, dy + hy - w, HOUSING_TOP[0] / 2), (hx, w, HOUSING_TOP[0] / 2), wood),
    ])
    wall_h = (DRAWER_WALL_TOP - DRAWER_FLOOR) / 2
    wall_z = (DRAWER_WALL_TOP + DRAWER_FLOOR) / 2
    face_top = 0.09
    drawer = f"""
    <body name="drawer" pos="{_v(dx, dy, 0)}">
      <joint name="drawer" type="slide" axis="0 -1 0" range="0 {DRAWER_RANGE}" damping="8" frictionloss="0.3" armature="0.1"/>
      <inertial pos="0 0 0.04" mass="0.6" diaginertia="0.005 0.005 0.005"/>
      {_box("drawer_floor", (0, 0, DRAWER_FLOOR - w), (tx + 2 * w, ty + w, w), dark)}
      {_box("drawer_left", (-tx - w, 0, wall_z), (w, ty, wall_h), dark)}
      {_box("drawer_right", (tx + w, 0, wall_z), (w, ty, wall_h), dark)}
      {_box("drawer_back", (0, ty - 0.005, wall_z), (tx, w, wall_h), dark)}
      {_box("drawer_face", (0, DRAWER_FACE_Y + w, (face_top + 0.005) / 2), (hx - 0.008, w, (face_top - 0.005) / 2), wood)}
      {_box("handle_bar", (0, HANDLE_Y, HANDLE_Z), (0.06, 0.006, 0.006), metal)}
      {_box("handle_post_l", (-0.055, (HANDLE_Y + DRAWER_FACE_Y) / 2, HANDLE_Z), (0.005, (DRAWER_FACE_Y - HANDLE_Y) / 2, 0.006), metal)}
      {_box("handle_post_r", (0.055, (HANDLE_Y + DRAWER_FACE_Y) / 2, HANDLE_Z), (0.005, (DRAWER_FACE_Y - HANDLE_Y) / 2, 0.006), metal)}
    </body>"""
    ix, iy = BOX_HALF
    box = "\n".join([
        _box("box_left", (bx - ix - w, by, BOX_RIM / 2), (w, iy + 2 * w, BOX_RIM / 2), wood),
        _box("box_right", (bx + ix + w, by, BOX_RIM / 2), (w, iy + 2 * w, BOX_RIM / 2), wood),
        _box("box_front", (bx, by - iy - w, BOX_RIM / 2), (ix, w, BOX_RIM / 2), wood),
        _box("box_back", (bx, by + iy + w, BOX_RIM / 2), (ix, w, BOX_RIM / 2), wood),
    ])
    slider = f"""
    <body name="slider" pos="{_v(bx - ix + LID_HALF_X, by, 0)}">
      <joint name="slider" type="slide" axis="1 0 0" range="0 {SLIDER_RANGE}" damping="8" frictionloss="0.3" armature="0.1"/>
      <inertial pos="0 0 0.075" mass="0.4" diaginertia="0.003 0.003 0.003"/>
      {_box("lid", (0, 0, BOX_RIM + w), (LID_HALF_X, iy + 2 * w, w), "0.8 0.75 0.6 1")}
      {_box("lid_knob", (0, 0, KNOB_Z), KNOB_HALF, metal)}
    </body>"""
    button = f"""
    {_box("button_base", (ux, uy, 0.005), (0.04, 0.04, 0.005), dark)}
    <body name="button" pos="{_v(ux, uy, 0)}">
      <joint name="button" type="slide" axis="0 0 1" range="{-BUTTON_RANGE} 0" stiffness="300" springref="0" damping="3" armature="0.02"/>
      <geom name="button_cap" type="cylinder" pos="0 0 {BUTTON_TOP - 0.01}" size="0.03 0.01" rgba="0.8 0.15 0.15 1" mass="0.05"/>
    </body>"""
    k = SWITCH_KNOB_HALF
    switch = f"""
    {_box("switch_base", (sx, sy + SWITCH_RANGE / 2, 0.004), (0.03, SWITCH_RANGE / 2 + 0.03, 0.004), dark)}
    <body name="switch" pos="{_v(sx, sy, 0)}">
      <joint name="switch" type="slide" axis="0 1 0" range="0 {SWITCH_RANGE}" damping="4" frictionloss="1" armature="0.02"/>
      {_box("switch_knob", (0, 0, SWITCH_KNOB_Z), k, "0.9 0.9 0.9 1", 'mass="0.05"')}
    </body>"""
    lights = f"""
    <geom name="bulb_post" type="cylinder" pos="{_v(*L.bulb_xy, 0.06)}" size="0.008 0.06" rgba="{metal}" {vis}/>
    <geom name="lightbulb" type="sphere" pos="{_v(*L.bulb_xy, 0.14)}" size="0.03" rgba="0.35 0.35 0.35 1" {vis}/>
    <geom name="led" type="box" pos="{_v(*L.led_xy, HOUSING_TOP[1] + 0.012)}" size="0.035 0.012 0.012" rgba="0.35 0.35 0.35 1" {vis}/>"""
    blocks = "\n".join(
        f"""    <body name="{c}" pos="{_v(-0.2 + 0.2 * i, -0.05, 0.1)}">
      <freejoint name="{c}"/>
      <geom name="{c}" type="box" size="{_v(*BLOCK_HALF[c])}" rgba="{BLOCK_RGBA[c]}" mass="{BLOCK_MASS[c]}" friction="1 0.01 0.001"/>
    </body>"""
        for i, c in enumerate(BLOCKS)
    )
    fx, fy, fz = FINGER_HALF
    finger_rgba = "0.25 0.25 0.28 1"
    gripper = f"""
    <body name="g_x" gravcomp="1">
      <joint name="gx" type="slide" axis="1 0 0" range="{WORKSPACE_LOW[0]} {WORKSPACE_HIGH[0]}" damping="90"/>
      <inertial pos="0 0 0" mass="0.05" diaginertia="1e-4 1e-4 1e-4"/>
      <body name="g_y" gravcomp="1">
        <joint name="gy" type="slide" axis="0 1 0" range="{WORKSPACE_LOW[1]} {WORKSPACE_HIGH[1]}" damping="90"/>
        <inertial pos="0 0 0" mass="0.05" diaginertia="1e-4 1e-4 1e-4"/>
        <body name="g_z" gravcomp="1">
          <joint name="gz" type="slide" axis="0 0 1" range="{WORKSPACE_LOW[2]} {WORKSPACE_HIGH[2]}" damping="90"/>
          <inertial pos="0 0 0" mass="0.05" diaginertia="1e-4 1e-4 1e-4"/>
          <body name="hand" gravcomp="1">
            <joint name="gyaw" type="hinge" axis="0 0 1" range="{-YAW_RANGE} {YAW_RANGE}" damping="2" armature="0.01"/>
            <site name="tcp" pos="0 0 0" size="0.004" rgba="1 0 0 0.5" group="3"/>
            <geom name="palm" type="box" pos="0 0 {PALM_Z}" size="0.025 0.055 0.01" rgba="0.2 0.2 0.22 1" mass="0.3"/>
            <geom name="wrist" type="cylinder" pos="0 0 {PALM_Z + 0.05}" size="0.02 0.04" rgba="0.85 0.85 0.87 1" mass="0.05" {vis}/>
            <camera name="gripper" pos="-0.07 0 0.13" xyaxes="0 -1 0 0.89 0 0.45" fovy="75"/>
            <body name="finger_l" pos="0 0 {FINGER_Z}" gravcomp="1">
              <joint name="finger_l" type="slide" axis="0 1 0" range="0 {FINGER_OPEN}" damping="5" armature="0.01"/>
              <geom name="finger_l" type="box" pos="0 {fy} 0" size="{_v(fx, fy, fz)}" rgba="{finger_rgba}" mass="0.04" friction="1.5 0.02 0.002"/>
            </body>
            <body name="finger_r" pos="0 0 {FINGER_Z}" gravcomp="1">
              <joint name="finger_r" type="slide" axis="0 -1 0" range="0 {FINGER_OPEN}" damping="5" armature="0.01"/>
              <geom name="finger_r" type="box" pos="0 {-fy} 0" size="{_v(fx, fy, fz)}" rgba="{finger_rgba}" mass="0.04" friction="1.5 0.02 0.002"/>
            </body>
          </body>
        </body>
      </body>
    </body>"""
    tcx, tcy = TABLE_HALF
    return f"""<mujoco model="calvin_like_{L.name}">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="{TIMESTEP}" integrator="implicitfast" cone="pyramidal"/>
  <visual>
    <global offwidth="640" offheight="640"/>
    <quality shadowsize="0"/>
    <headlight ambient="0.45 0.45 0.45" diffuse="0.5 0.5 0.5" specular="0.1 0.1 0.1"/>
  </visual>
  <default>
    <geom friction="1 0.005 0.0001" solref="0.005 1" solimp="0.95 0.99 0.001"/>
  </default>
  <worldbody>
    <light name="top" directional="true" pos="0 0 2" dir="0.2 0.3 -1" castshadow="false" diffuse="0.5 0.5 0.5"/>
    <camera name="static" pos="0 -0.95 0.8" xyaxes="1 0 0 0 0.8 0.95" fovy="50"/>
    <geom name="floor" type="plane" size="3 3 0.1" pos="0 0 -0.75" rgba="0.25 0.27 0.3 1" {vis}/>
    <geom name="table" type="box" pos="0 {TABLE_CENTER_Y} -0.025" size="{tcx} {tcy} 0.025" rgba="{L.table_rgba}"/>
    <geom name="table_leg" type="box" pos="0 {TABLE_CENTER_Y} -0.4" size="{tcx - 0.05} {tcy - 0.05} 0.35" rgba="0.3 0.25 0.2 1" {vis}/>
{housing}
{box}
{lights}
{drawer}
{slider}
{button}
{switch}
{blocks}
{gripper}
  </worldbody>
  <contact>
    <exclude body1="world" body2="drawer"/>
    <exclude body1="world" body2="slider"/>
    <exclude body1="world" body2="button"/>
    <exclude body1="world" body2="switch"/>
    <exclude body1="hand" body2="finger_l"/>
    <exclude body1="hand" body2="finger_r"/>
    <exclude body1="finger_l" body2="finger_r"/>
  </contact>
  <actuator>
    <position name="ax" joint="gx" kp="3000" forcerange="-60 60" ctrlrange="{WORKSPACE_LOW[0]} {WORKSPACE_HIGH[0]}"/>
    <position name="ay" joint="gy" kp="3000" forcerange="-60 60" ctrlrange="{WORKSPACE_LOW[1]} {WORKSPACE_HIGH[1]}"/>
    <position name="az" joint="gz" kp="3000" forcerange="-60 60" ctrlrange="{WORKSPACE_LOW[2]} {WORKSPACE_HIGH[2]}"/>
    <position name="ayaw" joint="gyaw" kp="30" forcerange="-5 5" ctrlrange="{-YAW_RANGE} {YAW_RANGE}"/>
    <position name="afl" joint="finger_l" kp="400" forcerange="-12 12" ctrlrange="0 {FINGER_OPEN}"/>
    <position name="afr" joint="finger_r" kp="400" forcerange="-12 12" ctrlrange="0 {FINGER_OPEN}"/>
  </actuator>
</mujoco>
"""
