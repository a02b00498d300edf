"""CALVIN-like long-horizon, language-conditioned tabletop env (MuJoCo) with scripted experts.

Modes (``task_cfg.name``):

* single task - one of :data:`TASKS`: ``reset(seed)`` draws a start in which the task is feasible; the
  episode terminates when its predicate holds (``info["success"] = True``) and is truncated after
  ``max_episode_steps``.
* ``chainN`` (e.g. ``chain5``) - ``reset(seed)`` draws a scene and a feasible chain of N distinct
  tasks. Each subtask has ``subtask_steps`` env steps; when its predicate holds (relative to the state
  at the start of that subtask) the next one starts; when its budget runs out the episode ends
  (``truncated``, ``info["success"] = False``). ``max_episode_steps = N * subtask_steps``.

After an episode has ended ``step()`` is absorbing: it returns the last observation and flags
without stepping the physics.

Action: (5,) float32 in [-1, 1] = (dx, dy, dz, dyaw, gripper): the first four are deltas of the
end-effector target scaled by :data:`MAX_STEP` (2 cm) and :data:`MAX_YAW` (0.15 rad); gripper > 0
closes, <= 0 opens. One env step is :data:`FRAME_SKIP` x 2 ms = 40 ms (25 Hz).

Observation dict:

* ``"state"``: (33,) float32, names in :data:`STATE_NAMES`:
  ``[0:3]`` TCP xyz, ``[3:5]`` sin/cos hand yaw, ``[5]`` finger opening (m),
  ``[6]`` drawer opening (m), ``[7]`` slider position (m), ``[8]`` button depression (m),
  ``[9]`` light bulb on (0/1), ``[10]`` switch position (m), ``[11]`` LED on (0/1),
  ``[12:19]`` red block xyz + quat (wxyz), ``[19:26]`` blue, ``[26:33]`` pink.
* ``"state_rel"``: (62,) float32, names in :data:`REL_NAMES`, when ``task_cfg.obs_keys`` lists it: the
  same scene in the frames a block task needs (no quaternions). ``[0:11]`` proprio: TCP xyz, sin/cos hand
  yaw, finger opening, gripper command (1 closed / 0 open), controller target - TCP (xyz, yaw);
  ``[11:17]`` fixtures (button depression clipped to its travel); then per block (15 each, in
  :data:`BLOCKS` order): block - TCP in world xyz and in the hand frame xy, sin/cos of the block yaw
  relative to the hand folded by the block's symmetry (x 2pi/period, so a grasp-equivalent yaw reads
  the same), block z, uprightness, grasped (0/1), displacement since the (sub)task began (xyz) and
  sin/cos of its yaw change since then (the observable target of push and rotate; CALVIN scores
  against the subtask's start state). Zero block - TCP vectors mean the TCP is at the block centre.
* ``"objects_rel"``: (58,) float32, names in :data:`OBJECTS_REL_NAMES`: ``"state_rel"`` without the
  controller target - TCP offsets (``[7:11]``), which reveal the previous action (a policy can copy it
  instead of reading the scene), when ``task_cfg.obs_keys`` lists it.
* ``"proprio"``: (7,) float32, names in :data:`PROPRIO_NAMES`: the robot's own state only (the first 7 of
  ``"state_rel"``: TCP xyz, sin/cos hand yaw, finger opening, gripper command), for camera policies that
  see the scene only through ``rgb_*``, when ``task_cfg.obs_keys`` lists it.
* ``"target_rel"``: (15,) float32, the 15 block features of ``"state_rel"`` (same names without the colour)
  for the block the current (sub)task is about: the named block of push / lift / rotate, the top block of
  unstack, the block held at the (sub)task's start for place / stack; zeros for fixture tasks. A function
  of the observation and the task id, so a policy need not learn to pick the block out of all three.
* ``"goal_rel"``: (5,) float32, names in :data:`GOAL_REL_NAMES`, when ``task_cfg.obs_keys`` lists it: where the
  current (sub)task wants its block (the ``"target_rel"`` block), from :func:`goals.block_goal`: goal centre -
  block centre now (world xyz; push: the start position + 11 cm along x, lift: + 10 cm up, place: the drawer /
  box floor spot, stack: on the target block, unstack: a free table spot), the yaw still to turn (rad, rotate:
  75 deg from the start yaw, + counterclockwise) and 1; zeros for fixture tasks. The place / stack destination
  and the rotate target are not otherwise observable relative to the block the policy moves.
* ``"task_id"``: np.int64 index into :data:`TASKS` of the current (sub)task (when
  ``task_cfg.num_tasks > 0`` or in chain mode).
* ``"instruction_id"``: np.int64 index into :data:`ALL_INSTRUCTIONS` of the current (sub)task's
  instruction (drawn per (sub)task from the reset seed); ``env.instruction`` is its text.
  Language-conditioned policies read features of that instruction (``lang_emb``, ``lang_tokens``) that
  their processor makes from this id (:mod:`rtpolicy.processors`, with :attr:`CalvinLikeEnv.INSTRUCTIONS`);
  the env emits the raw id only.
* ``"rgb_static"`` / ``"rgb_gripper"``: (S, S, 3) uint8 frames, S = ``image_size``, for the cameras
  named by ``cameras`` or, without it, by the ``rgb_<camera>`` keys of ``task_cfg.obs_keys``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from rtpolicy.envs import ENVS, check_action
from rtpolicy.envs.calvin_like import scene as S
from rtpolicy.envs.calvin_like.chains import (
    InitSpec,
    grasp_offset,
    init_for_task,
    random_init,
    sample_chain,
    init_symbolic,
)
from rtpolicy.envs.calvin_like.goals import block_goal, goal_block
from rtpolicy.envs.calvin_like.tasks import (
    ALL_INSTRUCTIONS,
    CHAIN_RE,
    INSTRUCTION_OFFSET,
    INSTRUCTIONS,
    TASK_INDEX,
    TASKS,
    Snapshot,
    block_period,
    check_task_name,
    grasped,
    quat_up,
    quat_yaw,
    success,
    symbolic_state,
    task_block,
)

MAX_STEP = 0.02  # m per env step at |action| = 1
MAX_YAW = 0.15  # rad per env step at |action| = 1
ACTION_DIM = 5
FRAME_SKIP = S.FRAME_SKIP
CONTROL_DT = S.TIMESTEP * S.FRAME_SKIP
DEFAULT_SUBTASK_STEPS = 150
MIN_SUBTASK_STEPS = 80  # below this the chain experts run out of steps (warning)
CAMERAS = ("static", "gripper")
WINDUP = 0.03  # the position target stays within this distance of the actual TCP

STATE_NAMES: list[str] = (
    ["ee_x", "ee_y", "ee_z", "ee_yaw_sin", "ee_yaw_cos", "gripper_opening"]
    + ["drawer", "slider", "button", "lightbulb", "switch", "led"]
    + [f"{c}_{k}" for c in S.BLOCKS for k in ("x", "y", "z", "qw", "qx", "qy", "qz")]
)
STATE_DIM = len(STATE_NAMES)
REL_BLOCK_NAMES = ("dx", "dy", "dz", "hand_dx", "hand_dy", "yaw_sin", "yaw_cos", "z", "up", "grasped",
                   "moved_x", "moved_y", "moved_z", "turned_sin", "turned_cos")
REL_NAMES: list[str] = (
    ["ee_x", "ee_y", "ee_z", "ee_yaw_sin", "ee_yaw_cos", "gripper_opening", "gripper_closed",
     "target_dx", "target_dy", "target_dz", "target_dyaw"]
    + ["drawer", "slider", "button", "lightbulb", "switch", "led"]
    + [f"{c}_{k}" for c in S.BLOCKS for k in REL_BLOCK_NAMES]
)
REL_DIM = len(REL_NAMES)
_CMD = slice(7, 11)  # the target - TCP offsets in REL_NAMES
OBJECTS_REL_NAMES: list[str] = REL_NAMES[:_CMD.start] + REL_NAMES[_CMD.stop:]
OBJECTS_REL_DIM = len(OBJECTS_REL_NAMES)
PROPRIO_NAMES: list[str] = REL_NAMES[:7]
GOAL_REL_NAMES: list[str] = ["goal_dx", "goal_dy", "goal_dz", "goal_dyaw", "goal_active"]
GOAL_REL_DIM = len(GOAL_REL_NAMES)


def _get(task_cfg: Any, key: str, default=None):
    if isinstance(task_cfg, Mapping):
        return task_cfg.get(key, default)
    return getattr(task_cfg, key, default)


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


@ENVS.register("calvin_like")
class CalvinLikeEnv(gymnasium.Env):
    """The CALVIN-like tabletop; see the module docstring for spaces and episode semantics.

    Args:
        task_cfg: mapping or dataclass with ``name`` (a task of :data:`TASKS` or ``chainN``),
            ``max_episode_steps``, ``num_tasks``, ``task_id``.
        seed: seed of the first ``reset()`` without a seed (None: OS entropy).
        render: enable ``render()`` (static camera, (height, width, 3) uint8).
        max_episode_steps: overrides ``task_cfg.max_episode_steps`` (single task); in chain mode it
            sets ``subtask_steps = max_episode_steps // N`` unless ``subtask_steps`` is given.
        width, height: ``render()`` size.
        scene: layout, one of "A", "B", "C", "D".
        cameras: cameras rendered into the observation ("static", "gripper"); None: the ``rgb_<camera>``
            keys of ``task_cfg.obs_keys``.
        image_size: side of the observed frames; None: ``task_cfg.image_size`` (default 84).
        subtask_steps: chain mode step budget per subtask (default 150).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": int(round(1.0 / CONTROL_DT))}
    INSTRUCTIONS = ALL_INSTRUCTIONS  # the texts obs["instruction_id"] indexes (a policy's processor featurizes them)
    DEPLOY_SPEC = {
        "action_kind": "ee_delta",
        "action_names": ["dx", "dy", "dz", "dyaw", "gripper"],
        "action_low": [-1.0] * ACTION_DIM,
        "action_high": [1.0] * ACTION_DIM,
        "delta_dims": [0, 1, 2, 3],
        "twist_axes": ["linear.x", "linear.y", "linear.z", "angular.z"],  # the yaw delta is a rotation about z
        "control_rate_hz": 1.0 / CONTROL_DT,
        "obs_names": {"state": ", ".join(STATE_NAMES), "state_rel": ", ".join(REL_NAMES),
                      "objects_rel": ", ".join(OBJECTS_REL_NAMES), "proprio": ", ".join(PROPRIO_NAMES), "goal_rel": ", ".join(GOAL_REL_NAMES)},
    }

    def __init__(
        self,
        task_cfg: Any,
        seed: int | None = None,
        render: bool = False,
        max_episode_steps: int | None = None,
        width: int = 128,
        height: int = 128,
        scene: str = "A",
        cameras: tuple[str, ...] | list[str] | None = None,
        subtask_steps: int | None = None,
        image_size: int | None = None,
        **_: Any,
    ):
        super().__init__()
        self.task_name = check_task_name(_get(task_cfg, "name"))
        self.layout = S.get_layout(scene)
        self.scene = scene
        m = CHAIN_RE.match(self.task_name)
        self.chain_length = int(m.group(1)) if m else 0
        steps = max_episode_steps if max_episode_steps is not None else _get(task_cfg, "max_episode_steps", None)
        if steps is not None:
            steps = _check_int("max_episode_steps", steps, 1)
        if self.chain_length:
            if self.chain_length > len(TASKS):
                raise ValueError(f"{self.task_name}: a chain has at most {len(TASKS)} distinct tasks")
            derived = subtask_steps is None and steps is not None
            if subtask_steps is None:
                subtask_steps = steps // self.chain_length if steps is not None else DEFAULT_SUBTASK_STEPS
            self.subtask_steps = _check_int("subtask_steps", subtask_steps, 1)
            if self.subtask_steps < MIN_SUBTASK_STEPS:
                warnings.warn(
                    f"{self.task_name}: subtask_steps={self.subtask_steps}"
                    + (f" (= max_episode_steps {steps} // {self.chain_length})" if derived else "")
                    + " is below what the scripted experts need (up to ~70 steps per subtask); the default is "
                    f"{DEFAULT_SUBTASK_STEPS} (max_episode_steps {self.chain_length * DEFAULT_SUBTASK_STEPS})",
                    stacklevel=2,
                )
            self.max_episode_steps = self.chain_length * self.subtask_steps
        else:
            self.subtask_steps = None
            self.max_episode_steps = steps if steps is not None else 200
        self.num_tasks = _check_int("num_tasks", _get(task_cfg, "num_tasks", 0) or 0, 0)
        task_id = _check_int("task_id", _get(task_cfg, "task_id", 0) or 0, 0)
        if self.num_tasks and task_id >= self.num_tasks:
            raise ValueError(f"task_id must be in [0, num_tasks={self.num_tasks}), got {task_id}")
        # observed task ids are indices into TASKS (a chain switches among all of them), so a multi-task
        # config must be the whole TASKS list, in order (rtpolicy/conf/task/calvin_like.yaml)
        if self.num_tasks and self.num_tasks != len(TASKS):
            raise ValueError(f"calvin_like task ids index TASKS: num_tasks must be {len(TASKS)}, got {self.num_tasks}")
        if self.num_tasks and not self.chain_length and task_id != TASKS.index(self.task_name):
            raise ValueError(f"calvin_like task ids index TASKS: {self.task_name!r} must have task_id "
                             f"{TASKS.index(self.task_name)}, got {task_id} (list the tasks in TASKS order)")
        self.task_id = task_id
        if seed is not None:
            _check_int("seed", seed, 0)
        else:
            seed = int(np.random.SeedSequence().generate_state(1)[0])
        self._next_seed_rng = np.random.default_rng(seed)
        self._width, self._height = _check_int("width", width, 1), _check_int("height", height, 1)
        obs_keys = [str(k) for k in (_get(task_cfg, "obs_keys", None) or [])]
        if cameras is None:
            cameras = [k[len("rgb_"):] for k in obs_keys if k.startswith("rgb_")]
        cams = tuple(cameras)
        self.image_size = _check_int("image_size", image_size or _get(task_cfg, "image_size", None) or 84, 1)
        bad = [c for c in cams if c not in CAMERAS]
        if bad:
            raise ValueError(f"unknown camera(s) {bad}; available: {', '.join(CAMERAS)}")
        self.cameras = cams

        import mujoco  # imported on first use (like the other families' simulators)

        self._mj = mujoco
        self.model = mujoco.MjModel.from_xml_string(S.build_xml(scene))
        self.data = mujoco.MjData(self.model)
        self._ids()

        obs_spaces: dict[str, spaces.Space] = {"state": spaces.Box(-np.inf, np.inf, (STATE_DIM,), np.float32)}
        # "state_rel" in task_cfg.obs_keys: the hand-relative features (REL_NAMES)
        self._rel = "state_rel" in obs_keys
        if self._rel:
            obs_spaces["state_rel"] = spaces.Box(-np.inf, np.inf, (REL_DIM,), np.float32)
        self._objects_rel = "objects_rel" in obs_keys
        self._target_rel = "target_rel" in obs_keys
        self._proprio = "proprio" in obs_keys
        if self._proprio:
            obs_spaces["proprio"] = spaces.Box(-np.inf, np.inf, (len(PROPRIO_NAMES),), np.float32)
        if self._target_rel:
            obs_spaces["target_rel"] = spaces.Box(-np.inf, np.inf, (len(REL_BLOCK_NAMES),), np.float32)
        self._goal_rel = "goal_rel" in obs_keys
        if self._goal_rel:
            obs_spaces["goal_rel"] = spaces.Box(-np.inf, np.inf, (GOAL_REL_DIM,), np.float32)
        if self._objects_rel:
            obs_spaces["objects_rel"] = spaces.Box(-np.inf, np.inf, (OBJECTS_REL_DIM,), np.float32)
        if self.num_tasks > 0 or self.chain_length:
            obs_spaces["task_id"] = spaces.Discrete(len(TASKS))
        obs_spaces["instruction_id"] = spaces.Discrete(len(ALL_INSTRUCTIONS))
        for c in cams:
            obs_spaces[f"rgb_{c}"] = spaces.Box(0, 255, (self.image_size, self.image_size, 3), np.uint8)
        self.observation_space = spaces.Dict(obs_spaces)
        self.action_space = spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)

        self.render_mode = "rgb_array" if render else None
        self._renderers: dict[tuple[int, int], Any] = {}  # (height, width) -> mujoco.Renderer, built on first use
        self.record_frames = False
        self._frames: list[np.ndarray] = []

        self._obs: dict[str, Any] | None = None
        self._info: dict[str, Any] = {}
        self._steps = 0
        self._terminated = self._truncated = False
        self._chain: list[str] = []
        self._instr: list[int] = []
        self._sub = 0
        self._sub_start = 0
        self._episode = 0  # incremented at every reset (experts watch it)
        self._target = np.zeros(4)
        self._grip_closed = False
        self._bulb = False
        self._button_armed = True
        self._start_snap: Snapshot | None = None
        self._snap: Snapshot | None = None

    # ------------------------------------------------------------------ model bookkeeping
    def _ids(self) -> None:
        m = self.model
        q = lambda n: int(m.joint(n).qposadr[0])  # noqa: E731
        v = lambda n: int(m.joint(n).dofadr[0])  # noqa: E731
        self._q = {n: q(n) for n in ("drawer", "slider", "button", "switch", "gx", "gy", "gz", "gyaw", "finger_l", "finger_r")}
        self._qb = {c: q(c) for c in S.BLOCKS}
        self._vb = {c: v(c) for c in S.BLOCKS}
        self._hand_q = np.array([self._q[n] for n in ("gx", "gy", "gz", "gyaw")])
        self._geom = {c: int(m.geom(c).id) for c in S.BLOCKS}
        self._finger_geoms = (int(m.geom("finger_l").id), int(m.geom("finger_r").id))
        self._bulb_geom = int(m.geom("lightbulb").id)
        self._led_geom = int(m.geom("led").id)
        self._drawer_body = int(m.body("drawer").id)

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """-> (obs, info). Same ``seed``, same initial state, chain and instructions."""
        super().reset(seed=seed)
        if seed is not None:
            _check_int("seed", seed, 0)
            episode_seed = int(seed)
        else:
            episode_seed = int(self._next_seed_rng.integers(2**31))
        rng = np.random.default_rng([episode_seed, 7919])
        if self.chain_length:
            spec = random_init(self.layout, rng)
            self._chain = sample_chain(init_symbolic(spec), self.chain_length, self.layout, rng)
        else:
            spec = init_for_task(self.task_name, self.layout, rng)
            self._chain = [self.task_name]
        self._instr = [INSTRUCTION_OFFSET[t] + int(rng.integers(len(INSTRUCTIONS[t]))) for t in self._chain]
        self._apply_init(spec)
        self._steps = 0
        self._sub = 0
        self._sub_start = 0
        self._episode += 1
        self._terminated = self._truncated = False
        self._snap = self.snapshot()
        self._start_snap = self._snap
        self._obs = self._make_obs()
        self._info = self._make_info(False)
        self._frames = []
        self._record()
        return self._copy_obs(), dict(self._info)

    def step(self, action):
        """action (5,) in [-1, 1] (clipped) -> (obs, reward, terminated, truncated, info); reward 1 per solved (sub)task."""
        if self._obs is None:
            raise RuntimeError("call reset() before step()")
        if self._terminated or self._truncated:  # absorbing: no physics, same flags
            return self._copy_obs(), 0.0, self._terminated, self._truncated, dict(self._info)
        self._apply_action(check_action(action, ACTION_DIM))
        self._mj.mj_step(self.model, self.data, nstep=FRAME_SKIP)
        self._update_lights()
        self._steps += 1
        self._snap = self.snapshot()
        reward = 0.0
        task = self._chain[self._sub]
        if success(task, self._start_snap, self._snap, self.layout):
            reward = 1.0
            self._sub += 1
            if self._sub >= len(self._chain):
                self._terminated = True
            else:
                self._sub_start = self._steps
                self._start_snap = self._snap
        if not self._terminated:
            if self.chain_length:
                self._truncated = self._steps - self._sub_start >= self.subtask_steps
            else:
                self._truncated = self._steps >= self.max_episode_steps
        self._obs = self._make_obs()
        self._info = self._make_info(self._terminated)
        self._record()
        return self._copy_obs(), reward, self._terminated, self._truncated, dict(self._info)

    def render(self) -> np.ndarray:
        """The static camera frame (height, width, 3) uint8 (needs ``render=True``)."""
        if self.render_mode is None:
            raise RuntimeError("this env was built with render=False; build it with render=True to render")
        return self._render_camera("static", (self._height, self._width))

    def close(self) -> None:
        for renderer in self._renderers.values():
            renderer.close()
        self._renderers = {}

    # ------------------------------------------------------------------ extras
    @property
    def instruction(self) -> str:
        """The current (sub)task's instruction text."""
        if not self._instr:
            raise RuntimeError("call reset() first")
        return ALL_INSTRUCTIONS[self._instr[min(self._sub, len(self._instr) - 1)]]

    @property
    def chain(self) -> list[str]:
        return list(self._chain)

    @property
    def current_task(self) -> str:
        return self._chain[min(self._sub, len(self._chain) - 1)]

    @property
    def completed(self) -> int:
        return self._sub

    @property
    def elapsed_steps(self) -> int:
        return self._steps

    def expert(self, noise: float = 0.0, seed: int | None = None) -> Callable[[Any], np.ndarray]:
        """A scripted expert for this env: obs -> action (5,) float32 in [-1, 1].

        It reads the privileged simulator state, follows the current (sub)task and restarts its
        script whenever a new episode or subtask begins. ``noise`` adds Gaussian noise (std, in
        action units) to the four motion dims.
        """
        from rtpolicy.envs.calvin_like.experts import ScriptedExpert

        return ScriptedExpert(self, noise=noise, seed=seed)

    def resume_after_success(self) -> None:
        """Single-task mode: undo the termination of a solved episode so the scene keeps stepping with the same
        task and start state (a collector records a few post-success steps, e.g. the release of a rotated or
        placed block and the rise after it, as training inputs). The next ``step()`` reports success again."""
        if self.chain_length:
            raise RuntimeError("resume_after_success is for single-task episodes, not chains")
        if not self._terminated:
            raise RuntimeError("resume_after_success needs a solved (terminated) episode")
        self._terminated = False
        self._sub = len(self._chain) - 1

    def pop_frames(self) -> list[np.ndarray]:
        frames, self._frames = self._frames, []
        return frames

    def render_camera(self, camera: str) -> np.ndarray:
        """(height, width, 3) uint8 frame of camera "static" or "gripper"."""
        if camera not in CAMERAS:
            raise ValueError(f"unknown camera {camera!r}; available: {', '.join(CAMERAS)}")
        return self._render_camera(camera, (self._height, self._width))

    def symbolic_state(self):
        """The symbolic state of the current scene (see :class:`tasks.SymState`)."""
        return symbolic_state(self.snapshot(), self.layout)

    # ------------------------------------------------------------------ internals
    def _apply_action(self, a: np.ndarray) -> None:
        d = self.data
        pos = d.qpos[self._hand_q]
        t = self._target
        t[:3] = np.clip(t[:3] + a[:3] * MAX_STEP, S.WORKSPACE_LOW, S.WORKSPACE_HIGH)
        t[:3] = np.clip(t[:3], pos[:3] - WINDUP, pos[:3] + WINDUP)
        t[3] = float(np.clip(t[3] + a[3] * MAX_YAW, -S.YAW_RANGE, S.YAW_RANGE))
        t[3] = float(np.clip(t[3], pos[3] - 0.3, pos[3] + 0.3))
        self._grip_closed = bool(a[4] > 0)
        d.ctrl[:4] = t
        d.ctrl[4:6] = 0.0 if self._grip_closed else S.FINGER_OPEN

    def _update_lights(self) -> None:
        depress = -float(self.data.qpos[self._q["button"]])
        if self._button_armed and depress > S.BUTTON_THRESHOLD:
            self._bulb = not self._bulb
            self._button_armed = False
        elif not self._button_armed and depress < S.BUTTON_REARM:
            self._button_armed = True
        self._set_light_colors()

    def _set_light_colors(self) -> None:
        self.model.geom_rgba[self._bulb_geom] = S.BULB_ON_RGBA if self._bulb else S.LIGHT_OFF_RGBA
        led = self.data.qpos[self._q["switch"]] > S.SWITCH_THRESHOLD
        self.model.geom_rgba[self._led_geom] = S.LED_ON_RGBA if led else S.LIGHT_OFF_RGBA

    def _apply_init(self, spec: InitSpec) -> None:
        m, d = self.model, self.data
        mujoco = self._mj
        mujoco.mj_resetData(m, d)
        d.qpos[self._q["drawer"]] = spec.drawer
        d.qpos[self._q["slider"]] = spec.slider
        d.qpos[self._q["switch"]] = spec.switch
        d.qpos[self._hand_q] = spec.gripper
        self._target = np.array(spec.gripper, dtype=np.float64)
        for c in S.BLOCKS:
            x, y, yaw = spec.blocks[c]
            z = S.BLOCK_HALF[c][2] + 0.0005
            if spec.stack and spec.stack[0] == c:
                bottom = spec.stack[1]
                x, y = spec.blocks[bottom][0], spec.blocks[bottom][1]
                z = 2 * S.BLOCK_HALF[bottom][2] + S.BLOCK_HALF[c][2] + 0.001
            if spec.held == c:
                x, y = spec.gripper[0], spec.gripper[1]
                z = spec.gripper[2] - grasp_offset(c)
                yaw = spec.gripper[3]
            qa = self._qb[c]
            d.qpos[qa : qa + 3] = (x, y, z)
            d.qpos[qa + 3 : qa + 7] = (np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2))
        closed = spec.held is not None
        finger = S.BLOCK_HALF[spec.held][1] if closed else S.FINGER_OPEN
        d.qpos[self._q["finger_l"]] = finger
        d.qpos[self._q["finger_r"]] = finger
        self._grip_closed = closed
        d.ctrl[:4] = self._target
        d.ctrl[4:6] = 0.0 if closed else S.FINGER_OPEN
        self._bulb = bool(spec.bulb)
        self._button_armed = True
        mujoco.mj_forward(m, d)
        mujoco.mj_step(m, d, nstep=2 * FRAME_SKIP)  # settle contacts (blocks land, the grasp closes)
        self._set_light_colors()

    def snapshot(self) -> Snapshot:
        """The privileged state read by predicates and experts."""
        d = self.data
        q = self._q
        touch = {c: [False, False] for c in S.BLOCKS}
        if d.ncon:
            g1, g2 = d.contact.geom1[: d.ncon], d.contact.geom2[: d.ncon]
            fl, fr = self._finger_geoms
            for c, gid in self._geom.items():
                other = np.concatenate([g2[g1 == gid], g1[g2 == gid]])
                touch[c] = [bool((other == fl).any()), bool((other == fr).any())]
        pos = {c: d.qpos[self._qb[c] : self._qb[c] + 3].copy() for c in S.BLOCKS}
        quat = {c: d.qpos[self._qb[c] + 3 : self._qb[c] + 7].copy() for c in S.BLOCKS}
        switch = float(d.qpos[q["switch"]])
        return Snapshot(
            ee=d.qpos[self._hand_q[:3]].copy(),
            yaw=float(d.qpos[q["gyaw"]]),
            opening=float(d.qpos[q["finger_l"]] + d.qpos[q["finger_r"]]),
            drawer=float(d.qpos[q["drawer"]]),
            slider=float(d.qpos[q["slider"]]),
            button=-float(d.qpos[q["button"]]),
            switch=switch,
            bulb=self._bulb,
            led=switch > S.SWITCH_THRESHOLD,
            drawer_xy=d.xpos[self._drawer_body][:2].copy(),
            pos=pos,
            quat=quat,
            touch={c: (t[0], t[1]) for c, t in touch.items()},
        )

    def _state_vector(self, s: Snapshot) -> np.ndarray:
        out = np.empty(STATE_DIM, dtype=np.float32)
        out[0:3] = s.ee
        out[3:6] = (np.sin(s.yaw), np.cos(s.yaw), s.opening)
        out[6:12] = (s.drawer, s.slider, s.button, float(s.bulb), s.switch, float(s.led))
        for i, c in enumerate(S.BLOCKS):
            out[12 + 7 * i : 15 + 7 * i] = s.pos[c]
            out[15 + 7 * i : 19 + 7 * i] = s.quat[c]
        return out

    def rel_vector(self, s: Snapshot | None = None, start: Snapshot | None = None) -> np.ndarray:
        """(REL_DIM,) float32 hand-relative features of snapshot ``s`` (default: now) against the (sub)task's
        start snapshot ``start`` (default: the current one); see ``"state_rel"`` in the module docstring."""
        s = self._snap if s is None else s
        start = self._start_snap if start is None else start
        if s is None or start is None:
            raise RuntimeError("call reset() first")
        out = np.empty(REL_DIM, dtype=np.float32)
        cy, sy = np.cos(s.yaw), np.sin(s.yaw)
        tgt = self._target
        out[0:11] = (*s.ee, sy, cy, s.opening, float(self._grip_closed), *(tgt[:3] - s.ee), tgt[3] - s.yaw)
        out[11:17] = (s.drawer, s.slider, float(np.clip(s.button, 0.0, S.BUTTON_RANGE)), float(s.bulb), s.switch, float(s.led))
        for i, c in enumerate(S.BLOCKS):
            d = s.pos[c] - s.ee
            period = block_period(c)
            folded = (quat_yaw(s.quat[c]) - s.yaw) * (2 * np.pi / period)
            turned = quat_yaw(s.quat[c]) - quat_yaw(start.quat[c])
            moved = s.pos[c] - start.pos[c]
            o = 17 + 15 * i
            out[o : o + 15] = (*d, cy * d[0] + sy * d[1], -sy * d[0] + cy * d[1], np.sin(folded), np.cos(folded),
                               s.pos[c][2], quat_up(s.quat[c]), float(grasped(s, c)), *moved, np.sin(turned), np.cos(turned))
        return out

    def task_block_now(self) -> str | None:
        """The block the current (sub)task is about (see ``"target_rel"``), or None."""
        task, start = self.current_task, self._start_snap
        if start is None:
            return task_block(task)
        return goal_block(task, start)

    def goal_vector(self) -> np.ndarray:
        """(GOAL_REL_DIM,) float32 ``"goal_rel"`` of the current (sub)task (see the module docstring)."""
        if self._snap is None or self._start_snap is None:
            raise RuntimeError("call reset() first")
        g = block_goal(self.current_task, self._start_snap, self._snap, self.layout)
        out = np.zeros(GOAL_REL_DIM, dtype=np.float32)
        if g is not None:
            c, xyz, dyaw = g
            out[:] = (*(xyz - self._snap.pos[c]), dyaw, 1.0)
        return out

    def _make_obs(self) -> dict[str, Any]:
        assert self._snap is not None
        k = min(self._sub, len(self._chain) - 1)
        obs: dict[str, Any] = {"state": self._state_vector(self._snap)}
        if self._rel or self._objects_rel or self._target_rel or self._proprio:
            rel = self.rel_vector()
            if self._proprio:
                obs["proprio"] = rel[: len(PROPRIO_NAMES)].copy()
            if self._target_rel:
                c = self.task_block_now()
                i = S.BLOCKS.index(c) if c is not None else None
                obs["target_rel"] = (rel[17 + 15 * i : 32 + 15 * i].copy() if i is not None
                                     else np.zeros(len(REL_BLOCK_NAMES), np.float32))
            if self._rel:
                obs["state_rel"] = rel
            if self._objects_rel:
                obs["objects_rel"] = np.concatenate([rel[: _CMD.start], rel[_CMD.stop :]])
        if self._goal_rel:
            obs["goal_rel"] = self.goal_vector()
        if self.num_tasks > 0 or self.chain_length:
            obs["task_id"] = np.int64(TASK_INDEX[self._chain[k]])
        obs["instruction_id"] = np.int64(self._instr[k])
        for c in self.cameras:
            obs[f"rgb_{c}"] = self._render_camera(c, (self.image_size, self.image_size))
        return obs

    def _make_info(self, success_: bool) -> dict[str, Any]:
        return {
            "success": bool(success_),
            "steps": self._steps,
            "completed": self._sub,
            "chain": list(self._chain),
            "subtask": self._chain[min(self._sub, len(self._chain) - 1)],
        }

    def _render_camera(self, camera: str, size: tuple[int, int]) -> np.ndarray:
        """Camera ``camera`` at ``size`` = (height, width) -> (height, width, 3) uint8."""
        mujoco = self._mj
        renderer = self._renderers.get(size)
        if renderer is None:
            renderer = self._renderers[size] = mujoco.Renderer(self.model, height=size[0], width=size[1])
            renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
            renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        renderer.update_scene(self.data, camera=camera)
        return np.ascontiguousarray(renderer.render(), dtype=np.uint8)

    def _record(self) -> None:
        if self.record_frames:
            self._frames.append(self.render())

    def _copy_obs(self) -> dict[str, Any]:
        assert self._obs is not None
        return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in self._obs.items()}
