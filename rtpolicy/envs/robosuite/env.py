"""robosuite tasks (Lift, Stack, PickPlaceCan, NutAssemblySquare) as gymnasium envs with seeded starts.

Observation dict (robomimic's key names and shapes; Do = object dims, see :data:`OBJECT_DIMS`):

* ``"robot0_eef_pos"`` (3,) float32: the grip site (between the fingertips), world frame (m).
* ``"robot0_eef_quat"`` (4,) float32: the hand's orientation, quaternion (x, y, z, w).
* ``"robot0_gripper_qpos"`` (2,) float32: the two finger joints (m; opening = [0] - [1]).
* ``"object"`` (Do,) float32: robosuite 1.5's ``object-state`` (the concatenation of the env's object
  sensors, in the order of :attr:`RobosuiteEnv.object_layout`; e.g. Lift: cube_pos, cube_quat,
  gripper_to_cube_pos). In a multi-task suite (``num_tasks > 0``) it is zero-padded to the largest
  task's size (Stack's 23), so that every member has the same state shape.
* ``"state"`` (9 + Do,) float32: the four above concatenated in that order (the state policies' key).
* ``"task_id"`` np.int64 when ``task_cfg.num_tasks > 0``.
* ``"rgb_<camera>"`` (S, S, 3) uint8, upright, for every ``rgb_<camera>`` key in ``task_cfg.obs_keys``
  (S = ``task_cfg.image_size``, 84 by default; cameras in :data:`CAMERAS`, robomimic's are ``agentview``
  and ``robot0_eye_in_hand``), rendered offscreen with MuJoCo's renderer (``MUJOCO_GL``: egl or osmesa).

Action (``action_mode``, an env constructor argument: ``task.env_kwargs={action_mode: absolute}``):

* ``"delta"`` (default; robomimic's datasets): (7,) in [-1, 1]: OSC_POSE deltas (dx, dy, dz in units of 5 cm;
  rotation axis-angle in units of 0.5 rad, base axes) and the gripper (> 0 closes).
* ``"absolute"`` (Chi et al.'s position control): (10,): the target grip-site position in the robot's base frame
  (m), the target orientation as the first two columns of its rotation matrix (base frame; continuous, unlike
  axis-angle near the downward hand's 180 deg) and the gripper in [-1, 1]. The same OSC_POSE controller tracks
  the target (its ``input_type="absolute"``); the experts' deltas become targets with :func:`delta_to_absolute`.

One step is 50 ms (20 Hz, 25 physics steps).

Episodes: ``reset(seed=s)`` always gives the start of seed ``s`` (robosuite's own placement sampler and
robot joint noise, drawn from numpy's global RNG, which is seeded with ``s`` for the reset and then
restored); ``reset()`` without a seed draws the next seed of the env's stream. Success is the
robosuite env's ``_check_success()``; an episode terminates on success and is truncated after
``max_episode_steps``; later ``step()`` calls return the last observation without stepping the physics.
The MuJoCo model is built once per env from a fixed seed (Lift's cube size is drawn when the model is
built), so every env instance of a task has the same model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from rtpolicy.envs import ENVS, check_action
from rtpolicy.envs.robosuite.tasks import CAMERAS, ROBOT_DIMS, ROBOT_KEYS, TASKS, check_task_name, controller_config
from rtpolicy.errors import UserError

ACTION_DIM = 7
ACTION_MODES = {"delta": 7, "absolute": 10}  # action_mode -> action dims
DELTA_SCALE = (0.05, 0.5)  # OSC_POSE output_max: m and rad per unit of a delta action
CONTROL_HZ = 20
MODEL_SEED = 0  # numpy's global seed while robosuite builds the model (object sizes)
IMAGE_PREFIX = "rgb_"
OBJECT_DIMS = {"Lift": 10, "Stack": 23, "PickPlaceCan": 14, "NutAssemblySquare": 14}
# where "object" holds quaternions (x, y, z, w): the *_quat sensors of RobosuiteEnv.object_layout (tests check it)
OBJECT_QUATS = {"Lift": [3], "Stack": [3, 10], "PickPlaceCan": [3, 10], "NutAssemblySquare": [3, 10]}
# tasks whose policies read their quaternions as rotations (RobosuiteEnv.rotations). Not PickPlaceCan: the can is a
# cylinder, its orientation carries no grasp information, and reading it as rotations measured worse (RESULTS.md)
ROTATION_TASKS = ("Lift", "Stack", "NutAssemblySquare")


def _get(task_cfg: Any, key: str, default: Any = None) -> Any:
    return task_cfg.get(key, default) if isinstance(task_cfg, Mapping) else getattr(task_cfg, key, default)


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise UserError(f"{name} must be an int {bound}, got {value!r}")
    return int(value)


@contextlib.contextmanager
def numpy_global_seed(seed: int) -> Iterator[None]:
    """Seed numpy's global RNG (robosuite's samplers draw from it) for a block, then restore its state."""
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


def rot6d_to_matrix(r6: np.ndarray) -> np.ndarray:
    """(6,) the first two columns of a rotation matrix (any scale, not parallel) -> (3, 3), by Gram-Schmidt."""
    a, b = np.asarray(r6[:3], np.float64), np.asarray(r6[3:6], np.float64)
    na = np.linalg.norm(a)
    b = b - a * (a @ b) / max(na * na, 1e-12)
    nb = np.linalg.norm(b)
    if na < 1e-6 or nb < 1e-6:
        raise ValueError(f"the rotation part {np.round(r6, 4).tolist()} has a zero or parallel column")
    x, y = a / na, b / nb
    return np.stack([x, y, np.cross(x, y)], axis=1)


def absolute_to_axis_angle(actions: np.ndarray) -> np.ndarray:
    """Absolute actions (L, 10) (position, 6D rotation, gripper) -> (L, 7) with the rotation as axis-angle: what
    robosuite's absolute OSC_POSE input (and robomimic's absolute-action datasets) hold."""
    from scipy.spatial.transform import Rotation

    a = np.asarray(actions, np.float64)
    rotvec = Rotation.from_matrix(np.stack([rot6d_to_matrix(r) for r in a[:, 3:9]])).as_rotvec() if len(a) else np.zeros((0, 3))
    return np.concatenate([a[:, :3], rotvec, a[:, 9:10]], axis=1).astype(np.asarray(actions).dtype)


def axis_angle_to_absolute(actions: np.ndarray) -> np.ndarray:
    """The inverse of :func:`absolute_to_axis_angle`: (L, 7) -> (L, 10)."""
    from scipy.spatial.transform import Rotation

    a = np.asarray(actions, np.float64)
    m = Rotation.from_rotvec(a[:, 3:6]).as_matrix() if len(a) else np.zeros((0, 3, 3))
    return np.concatenate([a[:, :3], m[:, :, 0], m[:, :, 1], a[:, 6:7]], axis=1).astype(np.asarray(actions).dtype)


def delta_to_absolute(delta: np.ndarray, eef_pos: np.ndarray, eef_quat: np.ndarray, geometry: Mapping[str, Any]) -> np.ndarray:
    """An OSC_POSE delta action (7,) at the observed hand pose (world frame; quat xyzw) -> the absolute action (10,)
    that sets the same target: what the controller computes from the delta with robomimic's ``achieved`` goal update.
    ``geometry``: the env's ``base_pos``, ``base_ori`` and ``quat_to_site`` (the grip site's fixed rotation relative to
    the frame of ``robot0_eef_quat``; the controller turns the site)."""
    from scipy.spatial.transform import Rotation

    base_pos, base_ori = np.asarray(geometry["base_pos"]), np.asarray(geometry["base_ori"])
    d = np.clip(np.asarray(delta, np.float64), -1.0, 1.0)
    pos = base_ori.T @ (np.asarray(eef_pos, np.float64) - base_pos) + DELTA_SCALE[0] * d[:3]
    hand = base_ori.T @ Rotation.from_quat(np.asarray(eef_quat, np.float64)).as_matrix() @ np.asarray(geometry["quat_to_site"])
    rot = Rotation.from_rotvec(DELTA_SCALE[1] * d[3:6]).as_matrix() @ hand
    return np.concatenate([pos, rot[:, 0], rot[:, 1], d[6:7]]).astype(np.float32)


def import_robosuite():
    """``import robosuite`` with its import-time log lines (macro file, optional robot models) silenced."""
    try:
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            import robosuite
        finally:
            logging.disable(previous)
    except ImportError as e:
        raise ImportError("the robosuite env family needs robosuite 1.5: pip install 'rtpolicy[robosuite]'") from e
    # robosuite logs every controller load (INFO) and the Panda's unused composite parts (WARNING) per env
    logging.getLogger("robosuite_logs").setLevel(logging.ERROR)
    return robosuite


def camera_keys(obs_keys: Any) -> list[str]:
    """The ``rgb_<camera>`` keys among ``obs_keys``, checked against :data:`CAMERAS`."""
    keys = [k for k in (obs_keys or []) if isinstance(k, str) and k.startswith(IMAGE_PREFIX)]
    for key in keys:
        if key[len(IMAGE_PREFIX):] not in CAMERAS:
            raise UserError(f"obs key {key!r} names no robosuite camera; use rgb_<camera> with camera in {', '.join(CAMERAS)}")
    return keys


@ENVS.register("robosuite")
class RobosuiteEnv(gymnasium.Env):
    """One robosuite task; see the module docstring for spaces and episode semantics.

    Args:
        task_cfg: a TaskConfig (or mapping) with ``name`` (a key of :data:`TASKS` or an alias such as
            ``can``), ``max_episode_steps``, ``num_tasks``, ``task_id``, ``obs_keys``, ``image_size``.
        seed: seed of the stream of episode seeds used by ``reset()`` without a seed (None: OS entropy).
        render: enable ``render()``: (height, width, 3) uint8 frames of ``camera``.
        max_episode_steps: overrides ``task_cfg.max_episode_steps``.
        width, height, camera: ``render()`` size and camera (videos).
        cameras: cameras observed as ``obs["rgb_<camera>"]``; None: the ``rgb_<camera>`` keys of ``task_cfg.obs_keys``.
        image_size: side of those frames; None: ``task_cfg.image_size`` (default 84).
        action_mode: ``"delta"`` or ``"absolute"`` (see the module docstring).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}
    DEPLOY_SPEC = {
        "action_kind": "ee_delta",
        "action_names": ["dx", "dy", "dz", "drx", "dry", "drz", "gripper"],
        "action_low": [-1.0] * ACTION_DIM,
        "action_high": [1.0] * ACTION_DIM,
        "delta_dims": [0, 1, 2, 3, 4, 5],
        "twist_axes": ["linear.x", "linear.y", "linear.z", "angular.x", "angular.y", "angular.z"],
        "control_rate_hz": float(CONTROL_HZ),
        "obs_names": {"state": "robot0_eef_pos (3), robot0_eef_quat xyzw (4), robot0_gripper_qpos (2), object (task-specific)"},
    }

    @classmethod
    def deploy_spec(cls, env_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The bundle's action spec for these env kwargs: ``DEPLOY_SPEC`` (deltas as a Twist); absolute targets are refused."""
        mode = env_kwargs.get("action_mode", "delta")
        if mode != "delta":
            raise UserError(f"robosuite action_mode={mode}: the ROS 2 node has no command for absolute end-effector targets "
                            "yet (it publishes deltas as a Twist); export a policy trained with action_mode=delta")
        return dict(cls.DEPLOY_SPEC)

    @classmethod
    def rotations(cls, fields: Mapping[str, Any]) -> dict[str, list[int]]:
        """Where the observations of a task (``rtpolicy.envs.task_fields`` plus ``tasks``) hold quaternions for the
        policy to read as rotations: ``robot0_eef_quat``, the object sensors' (``*_quat``, e.g.
        ``SquareNut_to_robot0_eef_quat``, whose sign flips several times an episode) and both inside ``state``; {}
        for a task outside :data:`ROTATION_TASKS` (PickPlaceCan). A suite takes every member's."""
        names = [check_task_name(t) for t in (fields.get("tasks") or [fields["name"]])]
        if not any(n in ROTATION_TASKS for n in names):
            return {}
        obj = sorted({i for n in names for i in OBJECT_QUATS[n]})
        robot = 3  # robot0_eef_quat's start in state: after robot0_eef_pos
        return {"robot0_eef_quat": [0], "object": obj, "state": [robot, *(sum(ROBOT_DIMS.values()) + i for i in obj)]}

    def __init__(
        self,
        task_cfg: Any,
        seed: int | None = None,
        render: bool = False,
        max_episode_steps: int | None = None,
        width: int = 256,
        height: int = 256,
        camera: str = "agentview",
        cameras: list[str] | None = None,
        image_size: int | None = None,
        action_mode: str = "delta",
        **_: Any,
    ):
        super().__init__()
        if action_mode not in ACTION_MODES:
            raise UserError(f"robosuite action_mode must be one of {', '.join(ACTION_MODES)}, got {action_mode!r}")
        self.action_mode, self.action_dim = action_mode, ACTION_MODES[action_mode]
        self.task_name = check_task_name(_get(task_cfg, "name"))
        spec = TASKS[self.task_name]
        steps = max_episode_steps if max_episode_steps is not None else _get(task_cfg, "max_episode_steps", None)
        self.max_episode_steps = _check_int("max_episode_steps", steps if steps is not None else spec.max_episode_steps, 1)
        self.num_tasks = _check_int("num_tasks", _get(task_cfg, "num_tasks", 0) or 0, 0)
        task_id = _check_int("task_id", _get(task_cfg, "task_id", 0) or 0, 0)
        if self.num_tasks and task_id >= self.num_tasks:
            raise UserError(f"task_id must be in [0, num_tasks={self.num_tasks}), got {task_id}")
        self.task_id = task_id
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1)[0])
        self._seed_rng = np.random.default_rng(_check_int("seed", seed, 0))
        if cameras is None:
            cameras = [k[len(IMAGE_PREFIX):] for k in camera_keys(_get(task_cfg, "obs_keys", None))]
        self.cameras = [k[len(IMAGE_PREFIX):] for k in camera_keys([IMAGE_PREFIX + str(c) for c in cameras])]
        size = image_size if image_size is not None else (_get(task_cfg, "image_size", None) or 84)
        self.image_size = _check_int("image_size", size, 1, 1024)
        if camera not in CAMERAS:
            raise UserError(f"camera must be one of {', '.join(CAMERAS)}, got {camera!r}")
        self._render_camera, self._render_size = camera, (_check_int("height", height, 1, 2048), _check_int("width", width, 1, 2048))

        robosuite = import_robosuite()
        self._robosuite_version = str(robosuite.__version__)
        with numpy_global_seed(MODEL_SEED):
            self._env = robosuite.make(
                self.task_name, robots=["Panda"], controller_configs=controller_config(self._input_type), control_freq=CONTROL_HZ,
                has_renderer=False, has_offscreen_renderer=False, use_camera_obs=False, use_object_obs=True,
                reward_shaping=False, ignore_done=True, hard_reset=False,  # one model per env: renderers stay valid
            )
        self.model, self.data = self._env.sim.model._model, self._env.sim.data._data  # mujoco.MjModel / MjData
        self.object_layout = self._object_layout()
        object_dim = sum(s.stop - s.start for s in self.object_layout.values())
        if self.num_tasks > 0:  # members of a suite: one state shape for all tasks (zeros after the task's own dims)
            object_dim = max(OBJECT_DIMS.values())
        self.object_dim = object_dim
        self.state_dim = sum(ROBOT_DIMS.values()) + object_dim
        self.geometry = self._geometry()

        box = lambda n: spaces.Box(-np.inf, np.inf, (n,), np.float32)  # noqa: E731
        obs_spaces: dict[str, spaces.Space] = {"state": box(self.state_dim)}
        obs_spaces |= {k: box(ROBOT_DIMS[k]) for k in ROBOT_KEYS} | {"object": box(object_dim)}
        if self.num_tasks > 0:
            obs_spaces["task_id"] = spaces.Discrete(self.num_tasks)
        for cam in self.cameras:
            obs_spaces[IMAGE_PREFIX + cam] = spaces.Box(0, 255, (self.image_size, self.image_size, 3), np.uint8)
        self.observation_space = spaces.Dict(obs_spaces)
        if self.action_mode == "delta":
            self.action_space = spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)
        else:  # positions unbounded here; rotation columns and the gripper in [-1, 1]
            low = np.array([-np.inf] * 3 + [-1.0] * 7, np.float32)
            self.action_space = spaces.Box(low, -low, (self.action_dim,), np.float32)
        # collection noise (task.action_noise) per unit, per dim: in absolute mode a delta's metres and radians
        # per unit, so that noise 0.1 moves the target as far as it moves a delta (5 mm, 0.05 rad), not 10 cm
        self.action_noise_scale = np.ones(self.action_dim, np.float32)
        if self.action_mode == "absolute":
            self.action_noise_scale[:3], self.action_noise_scale[3:9] = DELTA_SCALE

        self.render_mode = "rgb_array" if render else None
        self._renderers: dict[tuple[int, int], Any] = {}
        self.record_frames = False  # when True, reset()/step() append a render() frame (see pop_frames)
        self._frames: list[np.ndarray] = []
        self._obs: dict[str, Any] | None = None
        self._info: dict[str, Any] = {}
        self._steps = 0
        self._terminated = self._truncated = False
        self.episode_seed: int | None = None

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """-> (obs, info). Same ``seed``, same object placement and robot start."""
        super().reset(seed=seed)
        episode_seed = _check_int("seed", seed, 0) if seed is not None else int(self._seed_rng.integers(2**31))
        with numpy_global_seed(episode_seed):
            raw = self._env.reset()
        self.episode_seed = episode_seed
        self._steps = 0
        self._terminated = self._truncated = False
        self._obs = self._make_obs(raw)
        self._info = {"success": False, "steps": 0}
        self._frames = []
        self._record()
        return self._copy_obs(), dict(self._info)

    def step(self, action):
        """action (7,) deltas in [-1, 1] or (10,) absolute (see the module docstring; deltas and the gripper are clipped;
        wrong shape, NaN/inf or a degenerate rotation: UserError, one line) -> (obs, reward, terminated, truncated, info)."""
        if self._obs is None:
            raise RuntimeError("call reset() before step()")
        try:
            action = self._robosuite_action(action)
        except ValueError as e:  # one line naming the task and the value
            raise UserError(f"robosuite {self.task_name}: {' '.join(str(e).split())}") from None
        if self._terminated or self._truncated:  # absorbing: no physics, same flags
            return self._copy_obs(), 0.0, self._terminated, self._truncated, dict(self._info)
        raw, reward, _, _ = self._env.step(action)
        self._steps += 1
        success = bool(self._env._check_success())
        self._terminated = success
        self._truncated = not success and self._steps >= self.max_episode_steps
        self._obs = self._make_obs(raw)
        self._info = {"success": success, "steps": self._steps}
        self._record()
        return self._copy_obs(), float(reward), self._terminated, self._truncated, dict(self._info)

    def resume_after_success(self) -> None:
        """Let a solved episode go on (demo collection with ``task.post_success_steps``); the next step reports
        success again from ``_check_success``. A truncated episode stays absorbing."""
        if self._terminated and not self._truncated:
            self._terminated = False

    def render(self) -> np.ndarray:
        """The scene from ``camera`` as (height, width, 3) uint8 (needs ``render=True``)."""
        if self.render_mode is None:
            raise RuntimeError("this env was built with render=False; build it with render=True to render")
        return self.render_camera(self._render_camera, self._render_size)

    def close(self) -> None:
        for renderer in self._renderers.values():
            renderer.close()
        self._renderers = {}
        self._env.close()

    # ------------------------------------------------------------------ extras
    def expert(self, noise: float = 0.0, seed: int | None = None) -> Callable[[Any], np.ndarray]:
        """This task's scripted expert: obs dict -> action float32 of this env's ``action_mode`` (see :mod:`.experts`;
        in absolute mode its delta, noise included, becomes the target it sets, from the observed hand pose)."""
        from rtpolicy.envs.robosuite.experts import make_expert

        expert = make_expert(self.task_name, self.object_layout, self.geometry, noise=noise, seed=seed)
        if self.action_mode == "delta":
            return expert
        return lambda obs: delta_to_absolute(expert(obs), obs["robot0_eef_pos"], obs["robot0_eef_quat"], self.geometry)

    @property
    def env_args(self) -> dict[str, Any]:
        """robomimic's ``env_args`` for this env (the ``data`` attr of its HDF5 datasets): robosuite env name,
        EnvType 1 and the constructor arguments (Panda, OSC_POSE composite controller, 20 Hz, cameras)."""
        return {"env_name": self.task_name, "type": 1, "env_version": self._robosuite_version, "env_kwargs": {
            "robots": ["Panda"], "controller_configs": controller_config(self._input_type), "control_freq": CONTROL_HZ,
            "has_renderer": False, "has_offscreen_renderer": bool(self.cameras), "ignore_done": True,
            "use_object_obs": True, "use_camera_obs": bool(self.cameras), "reward_shaping": False,
            "camera_names": list(self.cameras), "camera_heights": self.image_size, "camera_widths": self.image_size,
            "camera_depths": False}}

    @property
    def store_attrs(self) -> dict[str, Any]:
        """What a demo store of this env records (``collect_demos``): the control rate ``fps`` (20) and
        robomimic's ``env_args``, which the robomimic HDF5 writer puts in ``data.attrs["env_args"]``."""
        return {"fps": float(CONTROL_HZ), "env_args": self.env_args}

    @property
    def elapsed_steps(self) -> int:
        return self._steps

    @property
    def robosuite_env(self):
        """The wrapped robosuite environment (e.g. for ``sim.get_state()``)."""
        return self._env

    def pop_frames(self) -> list[np.ndarray]:
        """Frames recorded since the last reset while ``record_frames`` was True, then forgets them."""
        frames, self._frames = self._frames, []
        return frames

    def render_camera(self, camera: str, size: tuple[int, int]) -> np.ndarray:
        """Camera ``camera`` at ``size`` = (height, width) -> (height, width, 3) uint8, upright."""
        import mujoco

        renderer = self._renderers.get(size)
        if renderer is None:
            renderer = self._renderers[size] = mujoco.Renderer(self.model, height=size[0], width=size[1])
            renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0  # software GL: most of the frame time
            renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        renderer.update_scene(self.data, camera=camera)
        return np.ascontiguousarray(renderer.render(), dtype=np.uint8)

    # ------------------------------------------------------------------ internals
    @property
    def _input_type(self) -> str:
        return "delta" if self.action_mode == "delta" else "absolute"

    def _robosuite_action(self, action: Any) -> np.ndarray:
        """Our action -> robosuite's (7,): deltas clipped to [-1, 1]; an absolute target's rotation columns as
        axis-angle (the controller's absolute input). ValueError for a wrong shape, NaN/inf or a degenerate rotation."""
        if self.action_mode == "delta":
            return check_action(action, ACTION_DIM)
        from scipy.spatial.transform import Rotation

        a = np.asarray(action, dtype=np.float64)
        if a.shape != (self.action_dim,):
            raise ValueError(f"action must have shape ({self.action_dim},) (action_mode absolute), got {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"action has a non-finite value: {a}")
        rotvec = Rotation.from_matrix(rot6d_to_matrix(a[3:9])).as_rotvec()
        return np.concatenate([a[:3], rotvec, np.clip(a[9:10], -1.0, 1.0)])

    def _object_layout(self) -> dict[str, slice]:
        """name -> slice of ``obs["object"]``: the enabled object sensors in robosuite's concatenation order."""
        layout, start = {}, 0
        raw = self._env._get_observations(force_update=True)
        for name, obs in self._env._observables.items():
            if obs.modality == "object" and obs.is_enabled() and obs.is_active() and name in raw:
                n = int(np.asarray(raw[name]).size)
                layout[name] = slice(start, start + n)
                start += n
        expected = OBJECT_DIMS[self.task_name]
        if start != expected or start != int(np.asarray(raw["object-state"]).size):
            raise RuntimeError(f"robosuite {self.task_name}: object sensors {list(layout)} give {start} dims, "
                               f"object-state has {np.asarray(raw['object-state']).size}; robomimic's is {expected}")
        return layout

    def _geometry(self) -> dict[str, Any]:
        """Fixed scene geometry the experts may use (not state): table height and the goal regions."""
        env = self._env
        geo: dict[str, Any] = {}
        arm = env.robots[0].part_controllers["right"]  # the robot's base: the frame of absolute actions
        geo["base_pos"] = np.asarray(arm.origin_pos, dtype=np.float64).tolist()
        geo["base_ori"] = np.asarray(arm.origin_ori, dtype=np.float64).tolist()
        from scipy.spatial.transform import Rotation

        quat = env._get_observations(force_update=True)["robot0_eef_quat"]  # robosuite's xyzw, of another frame than the site's
        site = np.asarray(env.sim.data.get_site_xmat(arm.ref_name), dtype=np.float64)
        geo["quat_to_site"] = np.round(Rotation.from_quat(quat).as_matrix().T @ site, 6).tolist()
        if hasattr(env, "table_offset"):
            geo["table_z"] = float(env.table_offset[2])
        if self.task_name == "PickPlaceCan":
            # robosuite's not_in_bin for the can (object 3): the +x,+y quarter of bin 2
            low = np.asarray(env.bin2_pos[:2], dtype=np.float64)
            geo["goal_low"], geo["goal_high"] = low.tolist(), (low + np.asarray(env.bin_size[:2]) / 2).tolist()
            geo["bin_z"] = float(env.bin2_pos[2])
            geo["start_bin"] = np.asarray(env.bin1_pos[:2], dtype=np.float64).tolist()  # the can starts in bin 1
            geo["bin_half"] = (np.asarray(env.bin_size[:2], dtype=np.float64) / 2).tolist()
        if self.task_name == "NutAssemblySquare":
            geo["peg"] = np.asarray(env.sim.data.body_xpos[env.peg1_body_id], dtype=np.float64).tolist()
            geo["peg_top"] = geo["peg"][2] + 0.1  # the peg geom's half height
        return geo

    def _make_obs(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        obs: dict[str, Any] = {k: np.asarray(raw[k], dtype=np.float32) for k in ROBOT_KEYS}
        obs["object"] = np.zeros(self.object_dim, dtype=np.float32)
        native = np.asarray(raw["object-state"], dtype=np.float32)
        obs["object"][: native.size] = native
        obs = {"state": np.concatenate([obs[k] for k in (*ROBOT_KEYS, "object")])} | obs
        if self.num_tasks > 0:
            obs["task_id"] = np.int64(self.task_id)
        for cam in self.cameras:
            obs[IMAGE_PREFIX + cam] = self.render_camera(cam, (self.image_size, self.image_size))
        return obs

    def _record(self) -> None:
        if self.record_frames:
            self._frames.append(self.render())

    def _copy_obs(self) -> dict[str, Any]:
        assert self._obs is not None
        return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in self._obs.items()}
