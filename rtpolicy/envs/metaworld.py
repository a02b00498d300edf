"""Meta-World (V3, goal-observable) tasks as gymnasium envs with seeded layouts and absorbing ends.

Observations: ``{"state": (39,) float32}`` (hand xyz + gripper, object poses, their previous-step copy,
goal xyz), plus ``{"task_id": int}`` when ``task_cfg.num_tasks > 0``, plus ``{"proprio": (4,) float32}`` (hand
xyz and gripper opening: the robot's own state, no object or goal) when ``"proprio"`` is in
``task_cfg.obs_keys`` (the state key of image-only policies), plus ``{"rgb_<camera>": (S, S, 3)
uint8}`` for every ``rgb_<camera>`` key in ``task_cfg.obs_keys`` (S = ``task_cfg.image_size``), rendered
offscreen from that MuJoCo camera (see :data:`CAMERAS`; frames of cameras mounted upside down, such as
``corner``, are turned upright). Actions: (4,) in [-1, 1]
(hand xyz delta, gripper). An episode terminates on success and is truncated after
``max_episode_steps``; later ``step()`` calls return the last observation and flags without
stepping the physics.

Layouts (object and goal positions) are drawn from a per-env RNG: ``reset(seed=s)`` always gives the
layout of seed ``s``; ``reset()`` without a seed draws the next layout of the current stream.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from rtpolicy.envs import ENVS, check_action


STATE_DIM = 39
PROPRIO_DIM = 4  # state[:4]: hand xyz, gripper opening
ACTION_DIM = 4
CAMERAS = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")
IMAGE_PREFIX = "rgb_"


def camera_keys(obs_keys: Any) -> list[str]:
    """The ``rgb_<camera>`` keys among ``obs_keys``, checked against :data:`CAMERAS`."""
    keys = [k for k in (obs_keys or []) if isinstance(k, str) and k.startswith(IMAGE_PREFIX)]
    for key in keys:
        if key[len(IMAGE_PREFIX) :] not in CAMERAS:
            raise ValueError(f"obs key {key!r} names no Meta-World camera; use rgb_<camera> with camera in {', '.join(CAMERAS)}")
    return keys


def v3_task_names() -> list[str]:
    """All Meta-World V3 task names, e.g. ``pick-place-v3``."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

    suffix = "-goal-observable"
    return sorted(k[: -len(suffix)] for k in ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE)


def check_task_name(name: Any) -> str:
    """``name`` if it is a Meta-World V3 task, else a ValueError naming the closest tasks."""
    names = v3_task_names()
    if isinstance(name, str) and name in names:
        return name
    close = difflib.get_close_matches(str(name), names, n=5, cutoff=0.5)
    if isinstance(name, str) and not name.endswith("-v3") and f"{name}-v3" in names:
        close = [f"{name}-v3"] + [c for c in close if c != f"{name}-v3"]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ValueError(f"unknown Meta-World V3 task {name!r}; {hint}available: {', '.join(names)}")


# The observed hand position (the hand body) minus the gripper's tool centre point, which is what reach-v3's success
# (TCP within 5 cm of the goal) measures; constant, since the hand's orientation is fixed.
HAND_MINUS_TCP = np.array([0.001, 0.0, 0.045])
# tasks whose Meta-World expert moves the observed hand onto a point the task scores with the TCP: our expert moves
# the TCP there instead (goal xyz, the last 3 state dims, raised by HAND_MINUS_TCP before the expert reads it)
AIM_TCP = ("reach-v3",)


def expert_policy(name: str) -> Callable[[Any], np.ndarray]:
    """The scripted Meta-World expert of task ``name``: state (39,) (or an obs dict) -> action (4,) float32 in [-1, 1].

    reach-v3: Meta-World's expert drives the observed hand (4.5 cm above the TCP) onto the goal, so its demos end
    with the TCP just inside the 5 cm success ball, on its lower edge; a goal above the start height is reached
    only when the hand gets within ~5 mm of the goal's height. Ours drives the TCP onto the goal (AIM_TCP)."""
    from metaworld.policies import ENV_POLICY_MAP

    name = check_task_name(name)
    if name not in ENV_POLICY_MAP:
        raise ValueError(f"Meta-World has no scripted expert for {name!r}")
    policy = ENV_POLICY_MAP[name]()
    aim_tcp = name in AIM_TCP

    def act(obs: Any) -> np.ndarray:
        state = obs["state"] if isinstance(obs, Mapping) else obs
        state = np.asarray(state, dtype=np.float64)
        if state.shape != (STATE_DIM,):
            raise ValueError(f"expert expects a state of shape ({STATE_DIM},), got {state.shape}")
        if aim_tcp:
            state = state.copy()
            state[-3:] += HAND_MINUS_TCP
        with warnings.catch_warnings():  # the experts' gains exceed 1 by design; the action is clipped below
            warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
            action = policy.get_action(state)
        return np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)

    return act


@ENVS.register("metaworld")
class MetaWorldEnv(gymnasium.Env):
    """One Meta-World V3 task; see the module docstring for spaces and episode semantics.

    Args:
        task_cfg: a TaskConfig (or mapping) with ``name``, ``max_episode_steps`` and ``num_tasks``.
        seed: layout seed of the first ``reset()`` without a seed (None: from OS entropy).
        render: build an offscreen renderer; ``render()`` then returns (height, width, 3) uint8 frames.
        max_episode_steps: overrides ``task_cfg.max_episode_steps``.
        width, height, camera: render size and MuJoCo camera name (None: a free camera over the table).
        cameras: cameras observed as ``obs["rgb_<camera>"]``; None: the ``rgb_<camera>`` keys of
            ``task_cfg.obs_keys``.
        image_size: side of those frames; None: ``task_cfg.image_size`` (default 84).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 80}
    # What a deployed policy of this family commands and how often (read by rtpolicy.deploy.export):
    # end-effector xyz deltas (relative; TwistStamped on a robot) plus an absolute gripper effort,
    # at the simulator's control rate (frame_skip 5 x 2.5 ms = 12.5 ms).
    DEPLOY_SPEC = {
        "action_kind": "ee_delta",
        "action_names": ["dx", "dy", "dz", "gripper"],
        "action_low": [-1.0, -1.0, -1.0, -1.0],
        "action_high": [1.0, 1.0, 1.0, 1.0],
        "delta_dims": [0, 1, 2],
        "control_rate_hz": 80.0,
        "obs_names": {"state": "hand xyz, gripper opening, object 1 pose (7), object 2 pose (7), previous 18, goal xyz",
                      "proprio": "hand xyz, gripper opening"},
    }

    def __init__(
        self,
        task_cfg: Any,
        seed: int | None = None,
        render: bool = False,
        max_episode_steps: int | None = None,
        width: int = 256,
        height: int = 256,
        camera: str | None = None,
        cameras: list[str] | None = None,
        image_size: int | None = None,
    ):
        super().__init__()
        get = task_cfg.get if isinstance(task_cfg, Mapping) else lambda k, d=None: getattr(task_cfg, k, d)
        self.task_name = check_task_name(get("name"))
        steps = max_episode_steps if max_episode_steps is not None else get("max_episode_steps", 200)
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"max_episode_steps must be a positive int, got {steps!r}")
        self.max_episode_steps = int(steps)
        num_tasks = get("num_tasks", 0) or 0
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer)) or num_tasks < 0:
            raise ValueError(f"num_tasks must be an int >= 0, got {num_tasks!r}")
        self.num_tasks = int(num_tasks)
        task_id = get("task_id", 0) or 0
        if isinstance(task_id, bool) or not isinstance(task_id, (int, np.integer)) or not 0 <= task_id < max(1, self.num_tasks):
            raise ValueError(f"task_id must be an int in [0, num_tasks={self.num_tasks}), got {task_id!r}")
        self.task_id = int(task_id)  # the index of this task among num_tasks (observed as obs["task_id"])
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise ValueError(f"seed must be an int >= 0 or None, got {seed!r}")
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1)[0])

        from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

        self._env = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{self.task_name}-goal-observable"](seed=int(seed))
        self._env._freeze_rand_vec = False  # a fresh layout at every reset ...
        self._env.seeded_rand_vec = True  # ... drawn from the env's own seeded RNG
        self._env.seed(int(seed))
        # metaworld raises past its own limit (500); ours decides truncation
        self._env.max_path_length = max(int(self._env.max_path_length), self.max_episode_steps)
        self.metadata = dict(self.metadata, render_fps=int(round(1.0 / self._env.dt)))

        obs_spaces: dict[str, spaces.Space] = {"state": spaces.Box(-np.inf, np.inf, (STATE_DIM,), np.float32)}
        if self.num_tasks > 0:
            obs_spaces["task_id"] = spaces.Discrete(self.num_tasks)
        self.proprio = "proprio" in list(get("obs_keys", None) or [])
        if self.proprio:
            obs_spaces["proprio"] = spaces.Box(-np.inf, np.inf, (PROPRIO_DIM,), np.float32)
        if cameras is None:
            cameras = [k[len(IMAGE_PREFIX) :] for k in camera_keys(get("obs_keys", None))]
        self.cameras = [k[len(IMAGE_PREFIX) :] for k in camera_keys([IMAGE_PREFIX + str(c) for c in cameras])]
        size = image_size if image_size is not None else (get("image_size", None) or 84)
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size <= 480:
            raise ValueError(f"image_size must be an int in [1, 480] (MuJoCo's offscreen buffer), got {size!r}")
        self.image_size = int(size)
        for cam in self.cameras:
            obs_spaces[IMAGE_PREFIX + cam] = spaces.Box(0, 255, (self.image_size, self.image_size, 3), np.uint8)
        self._camera_renderer = None
        self._upside_down: dict[str, bool] = {}
        self.observation_space = spaces.Dict(obs_spaces)
        self.action_space = spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)

        self.render_mode = "rgb_array" if render else None
        self._render_size = (int(width), int(height))
        self._camera = camera
        self._renderer = None
        self.record_frames = False  # when True, reset()/step() append a rendered frame to a buffer (see pop_frames)
        self._frames: list[np.ndarray] = []

        self._obs: dict[str, Any] | None = None
        self._info: dict[str, Any] = {}
        self._steps = 0
        self._terminated = self._truncated = False

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """-> (obs, info). A given ``seed`` reseeds the layout RNG: same seed, same layout."""
        super().reset(seed=seed)
        if seed is not None:
            self._env.seed(int(seed))
        raw, _ = self._env.reset()
        self._steps = 0
        self._terminated = self._truncated = False
        self._obs = self._make_obs(raw)
        self._info = {"success": False, "steps": 0}
        self._frames = []
        self._record()
        return self._copy_obs(), dict(self._info)

    def step(self, action):
        """action (4,) in [-1, 1] (clipped) -> (obs, reward, terminated, truncated, info)."""
        if self._obs is None:
            raise RuntimeError("call reset() before step()")
        if self._terminated or self._truncated:  # absorbing: no physics, same flags
            return self._copy_obs(), 0.0, self._terminated, self._truncated, dict(self._info)
        raw, reward, _, _, info = self._env.step(check_action(action, ACTION_DIM))
        self._steps += 1
        success = bool(info["success"])
        self._terminated = success
        self._truncated = not success and self._steps >= self.max_episode_steps
        self._obs = self._make_obs(raw)
        self._info = {"success": success, "steps": self._steps}
        self._record()
        return self._copy_obs(), float(reward), self._terminated, self._truncated, dict(self._info)

    def resume_after_success(self) -> None:
        """Let a solved episode go on (demo collection with post-success steps); the next step reports
        success again from the physics. A truncated episode stays absorbing."""
        if self._terminated and not self._truncated:
            self._terminated = False

    def render(self) -> np.ndarray:
        """The current scene as an RGB frame (height, width, 3) uint8 (needs ``render=True``)."""
        if self.render_mode is None:
            raise RuntimeError("this env was built with render=False; build it with render=True to render")
        if self._renderer is None:
            import mujoco
            from gymnasium.envs.mujoco.mujoco_rendering import MujocoRenderer

            w, h = self._render_size
            self._renderer = MujocoRenderer(self._env.model, self._env.data, width=w, height=h, camera_name=self._camera)
            viewer = self._renderer._get_viewer("rgb_array")
            # software GL: shadows and reflections cost ~4x the frame time for little visual gain
            viewer.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
            viewer.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        return np.ascontiguousarray(self._renderer.render("rgb_array"), dtype=np.uint8)

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        if self._camera_renderer is not None:
            self._camera_renderer.close()
            self._camera_renderer = None
        self._env.close()

    # ------------------------------------------------------------------ extras
    def expert(self) -> Callable[[Any], np.ndarray]:
        """The scripted expert of this task: obs (dict or (39,) state) -> action (4,) float32."""
        return expert_policy(self.task_name)

    @property
    def layout(self) -> np.ndarray:
        """The current episode's sampled layout (object and goal positions), float64."""
        return np.array(self._env._last_rand_vec, dtype=np.float64)

    @property
    def elapsed_steps(self) -> int:
        return self._steps

    def pop_frames(self) -> list[np.ndarray]:
        """Frames recorded since the last reset while ``record_frames`` was True, then forgets them."""
        frames, self._frames = self._frames, []
        return frames

    def _record(self) -> None:
        if self.record_frames:
            self._frames.append(self.render())

    def _make_obs(self, raw: np.ndarray) -> dict[str, Any]:
        obs: dict[str, Any] = {"state": np.asarray(raw, dtype=np.float32)}
        if self.num_tasks > 0:
            obs["task_id"] = np.int64(self.task_id)
        if self.proprio:
            obs["proprio"] = obs["state"][:PROPRIO_DIM].copy()
        for cam in self.cameras:
            obs[IMAGE_PREFIX + cam] = self._camera_frame(cam)
        return obs

    def _camera_frame(self, camera: str) -> np.ndarray:
        """The current scene from a named camera, (image_size, image_size, 3) uint8, upright."""
        import mujoco

        model, data = self._env.model, self._env.data
        if self._camera_renderer is None:
            self._camera_renderer = mujoco.Renderer(model, self.image_size, self.image_size)
            flags = self._camera_renderer.scene.flags
            flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0  # as in render(): software GL cost, little visual gain
            flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        if camera not in self._upside_down:  # decided once: the camera's image-up axis points down in the world
            cam_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
            self._upside_down[camera] = bool(data.cam_xmat[cam_id].reshape(3, 3)[2, 1] < 0)
        self._camera_renderer.update_scene(data, camera=camera)
        frame = self._camera_renderer.render()
        if self._upside_down[camera]:
            frame = frame[::-1, ::-1]
        return np.ascontiguousarray(frame, dtype=np.uint8)

    def _copy_obs(self) -> dict[str, Any]:
        assert self._obs is not None
        return {k: v.copy() for k, v in self._obs.items()}
