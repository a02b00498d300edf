"""The robosuite env family: robomimic's observation keys and shapes, seeded starts, cameras, refusals,
the scripted experts (solve, recover from a perturbation) and demo collection through the collector."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from rtpolicy.envs import make_env  # first: picks MuJoCo's GL backend before robosuite's import loads it
from rtpolicy.envs.robosuite import OBJECT_DIMS, TASKS
from rtpolicy.envs.robosuite.env import delta_to_absolute
from rtpolicy.errors import UserError

pytest.importorskip("robosuite", reason="robosuite is not installed (pip install 'rtpolicy[robosuite]')")

ROBOT_SHAPES = {"robot0_eef_pos": (3,), "robot0_eef_quat": (4,), "robot0_gripper_qpos": (2,)}


def lift(**fields):
    return make_env({"env": "robosuite", "name": "Lift", "max_episode_steps": 200} | fields, seed=0)


@pytest.fixture(scope="module")
def lift_env():
    env = lift()
    yield env
    env.close()


@pytest.fixture(scope="module")
def task_env():
    """task name -> one env of that task (built once per module, closed at the end)."""
    envs = {}

    def get(task):
        if task not in envs:
            envs[task] = make_env({"env": "robosuite", "name": task}, seed=0)
        return envs[task]

    yield get
    for env in envs.values():
        env.close()


@pytest.mark.parametrize("task", list(TASKS))
def test_obs_keys_and_shapes_match_robomimic(task, task_env):
    env = task_env(task)
    obs, info = env.reset(seed=1)
    assert set(obs) == {"state", "object", *ROBOT_SHAPES}
    for key, shape in ROBOT_SHAPES.items():
        assert obs[key].shape == shape and obs[key].dtype == np.float32, key
    assert obs["object"].shape == (OBJECT_DIMS[task],)
    order = [obs[k] for k in (*ROBOT_SHAPES, "object")]
    np.testing.assert_array_equal(obs["state"], np.concatenate(order))
    assert env.observation_space.contains(obs)
    assert env.action_space.shape == (7,) and info["success"] is False
    obs, _, terminated, truncated, info = env.step(np.zeros(7))
    assert not (terminated or truncated or info["success"]) and env.observation_space.contains(obs)
    # the quaternions a policy reads as rotations (rtpolicy.processors) are the layout's *_quat sensors
    from rtpolicy.envs import env_rotations
    from rtpolicy.envs.robosuite.env import OBJECT_QUATS, ROTATION_TASKS

    assert [s.start for name, s in env.object_layout.items() if name.endswith("_quat")] == OBJECT_QUATS[task]
    rotations = env_rotations({"env": "robosuite", "name": task})
    if task in ROTATION_TASKS:
        assert rotations == {"robot0_eef_quat": [0], "object": OBJECT_QUATS[task], "state": [3, *(9 + i for i in OBJECT_QUATS[task])]}
        for key, starts in rotations.items():
            for i in starts:
                np.testing.assert_allclose(np.linalg.norm(obs[key][i : i + 4]), 1.0, atol=1e-4)
    else:
        assert rotations == {}


@pytest.mark.parametrize("task", list(TASKS))
def test_expert_solves_a_fixed_seed_and_the_episode_replays_exactly(task, task_env):
    """Every task: the scripted expert solves start seed 5; replaying its actions from the same seed gives the
    same states, rewards and flags step for step (success reported at the same step)."""
    env = task_env(task)

    def rollout(policy):
        obs, _ = env.reset(seed=5)
        trace = [(obs["state"], 0.0, False, False, False)]
        actions = []
        for t in range(env.max_episode_steps):
            action = policy(t, obs)
            actions.append(action)
            obs, reward, terminated, truncated, info = env.step(action)
            trace.append((obs["state"], reward, terminated, truncated, info["success"]))
            if terminated or truncated:
                break
        return actions, trace

    expert = env.expert()
    actions, trace = rollout(lambda t, obs: expert(obs))
    _, _, terminated, truncated, success = trace[-1]
    assert success and terminated and not truncated, (task, len(actions))
    assert not any(step[4] for step in trace[:-1])  # success is reported once, at the end
    _, again = rollout(lambda t, obs: actions[t])
    assert len(again) == len(trace)
    for t, (a, b) in enumerate(zip(trace, again)):
        np.testing.assert_array_equal(a[0], b[0], err_msg=f"{task} step {t}")
        assert a[1:] == b[1:], (task, t, a[1:], b[1:])


def test_seeded_starts_are_deterministic_across_instances(lift_env):
    actions = np.random.default_rng(0).uniform(-1, 1, (5, 7))

    def rollout(env, seed):
        out = [env.reset(seed=seed)[0]["state"]]
        out += [env.step(a)[0]["state"] for a in actions]
        return np.stack(out)

    first = rollout(lift_env, 7)
    np.testing.assert_array_equal(first, rollout(lift_env, 7))
    other = lift(max_episode_steps=50)
    try:
        np.testing.assert_array_equal(first, rollout(other, 7))  # same model, same start, same physics
    finally:
        other.close()
    assert not np.allclose(first[0], rollout(lift_env, 8)[0])  # another seed, another placement
    state = np.random.get_state()[1].copy()
    lift_env.reset(seed=3)
    np.testing.assert_array_equal(state, np.random.get_state()[1])  # numpy's global RNG is restored


def test_bad_actions_and_names_are_refused(lift_env):
    obs, _ = lift_env.reset(seed=0)
    bad = {
        r"robosuite Lift: action must have shape \(7,\), got \(4,\)": np.zeros(4),
        r"robosuite Lift: action must have shape \(7,\), got \(1, 7\)": np.zeros((1, 7)),
        r"robosuite Lift: action has a non-finite value: \[ ?0\. +0\. +nan": np.array([0, 0, np.nan, 0, 0, 0, 0]),
        r"robosuite Lift: action has a non-finite value: .*inf": np.array([0, 0, 0, 0, 0, 0, np.inf]),
        r"robosuite Lift: could not convert string to float: 'up'": ["up"] * 7,
    }
    for match, action in bad.items():
        with pytest.raises(UserError, match=match) as refused:
            lift_env.step(action)
        assert "\n" not in str(refused.value), str(refused.value)  # one line (the CLIs print it as is)
    assert lift_env.elapsed_steps == 0  # nothing was stepped; the env goes on
    again, _, _, _, info = lift_env.step(np.zeros(7))
    assert info["steps"] == 1 and again["object"].shape == obs["object"].shape
    with pytest.raises(UserError, match="unknown robosuite task 'Lfit'; did you mean Lift"):
        lift(name="Lfit")
    with pytest.raises(UserError, match="rgb_wristcam"):
        lift(obs_keys=["state", "rgb_wristcam"])


def test_episode_ends_absorbing():
    env = lift(max_episode_steps=2)
    try:
        env.reset(seed=0)
        env.step(np.ones(7))
        obs, _, terminated, truncated, info = env.step(np.ones(7))
        assert truncated and not terminated and info == {"success": False, "steps": 2}
        again = env.step(-np.ones(7))
        np.testing.assert_array_equal(again[0]["state"], obs["state"])
        assert again[3] and again[4]["steps"] == 2
    finally:
        env.close()


def test_camera_frames_and_suite_padding():
    env = make_env({"env": "robosuite", "name": "can", "obs_keys": ["state", "rgb_agentview", "rgb_robot0_eye_in_hand"],
                    "image_size": 48, "num_tasks": 4, "task_id": 2}, seed=0)
    try:
        obs, _ = env.reset(seed=0)
        for key in ("rgb_agentview", "rgb_robot0_eye_in_hand"):
            assert obs[key].shape == (48, 48, 3) and obs[key].dtype == np.uint8
            assert obs[key].std() > 5, f"{key} looks blank"
        assert not np.array_equal(obs["rgb_agentview"], obs["rgb_robot0_eye_in_hand"])
        # a suite member: object padded to the largest task's size, its own 14 dims first
        assert obs["object"].shape == (max(OBJECT_DIMS.values()),) and obs["state"].shape == (9 + max(OBJECT_DIMS.values()),)
        assert not obs["object"][OBJECT_DIMS["PickPlaceCan"]:].any() and int(obs["task_id"]) == 2
        assert env.observation_space.contains(obs)
        args = env.env_args  # robomimic's HDF5 env_args
        assert args["env_name"] == "PickPlaceCan" and args["type"] == 1 and args["env_kwargs"]["control_freq"] == 20
        assert args["env_kwargs"]["camera_names"] == ["agentview", "robot0_eye_in_hand"]
    finally:
        env.close()


def run(env, expert, seed, perturb=None):
    obs, info = env.reset(seed=seed)
    for t in range(env.max_episode_steps):
        action = expert(obs) if perturb is None else perturb(t, obs, expert(obs))
        obs, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            break
    return info


def test_lift_expert_solves_seeds_quickly(lift_env):
    expert = lift_env.expert()
    for seed in (0, 1):
        info = run(lift_env, expert, seed)
        assert info["success"] and info["steps"] < 80, info
    obs, _ = lift_env.reset(seed=2)
    tic = time.perf_counter()
    for _ in range(50):
        expert(obs)
    assert (time.perf_counter() - tic) / 50 < 0.01  # a scripted controller, not a planner: well under a 50 ms control step


def test_lift_expert_recovers_when_the_cube_is_dropped(lift_env):
    expert = lift_env.expert()
    lifted = []

    def perturb(t, obs, action):
        cube_z = obs["object"][2]
        if not lifted and cube_z > 0.826:  # the cube leaves the table: open the gripper for 8 steps (it drops)
            lifted.append(t)
        if lifted and t < lifted[0] + 8:
            return np.array([0, 0, 0, 0, 0, 0, -1.0])
        return action

    info = run(lift_env, expert, 4, perturb)
    assert lifted and info["success"] and info["steps"] > lifted[0] + 8, (lifted, info)


def test_absolute_actions_set_the_same_targets_as_the_deltas(task_env):
    """``action_mode=absolute``: the expert's delta, turned into a target pose from the observed hand, moves the Can
    arm as the delta does (same controller goal, same hand path); that expert solves a fixed seed; bad targets are refused."""
    delta_env = task_env("PickPlaceCan")
    abs_env = make_env({"env": "robosuite", "name": "PickPlaceCan", "env_kwargs": {"action_mode": "absolute"}}, seed=0)
    try:
        assert abs_env.action_space.shape == (10,) and abs_env.geometry["base_pos"] == delta_env.geometry["base_pos"]
        expert, abs_expert = delta_env.expert(), abs_env.expert()
        obs, _ = delta_env.reset(seed=5)
        abs_obs, _ = abs_env.reset(seed=5)
        arm = lambda env: env.robosuite_env.robots[0].part_controllers["right"]  # noqa: E731
        # robosuite's delta goal starts from the hand as its controller last saw it, one physics substep (2 ms) before
        # the observation: from the second step on, the two goals differ by about 0.5 mm and the paths part slowly
        for t in range(30):
            action = expert(obs)
            np.testing.assert_allclose(abs_expert(abs_obs), delta_to_absolute(expert(abs_obs), abs_obs["robot0_eef_pos"],
                                                                             abs_obs["robot0_eef_quat"], abs_env.geometry))
            obs, *_ = delta_env.step(action)
            abs_obs, *_ = abs_env.step(abs_expert(abs_obs))
            tol = 1e-6 if t == 0 else 5e-3  # the first step: the same state, the same target
            np.testing.assert_allclose(arm(abs_env).goal_pos, arm(delta_env).goal_pos, atol=tol)
            np.testing.assert_allclose(arm(abs_env).goal_ori, arm(delta_env).goal_ori, atol=max(tol, 2e-3))
        np.testing.assert_allclose(abs_obs["robot0_eef_pos"], obs["robot0_eef_pos"], atol=5e-3)  # 30 steps: 2 mm apart
        info = run(abs_env, abs_expert, 5)
        assert info["success"], info
        # DART noise (task.action_noise) means the same in both modes: 0.1 moves a target by about 5 mm, not 10 cm
        from rtpolicy.datasets.collect import run_expert_episode

        executed, step = [], abs_env.step
        abs_env.step = lambda action: (executed.append(np.array(action)), step(action))[1]  # record, then step
        try:
            episode, _ = run_expert_episode(abs_env, abs_expert, 5, action_noise=0.1)
        finally:
            del abs_env.step
        offset = np.array(executed) - episode["action"]
        assert 0.003 < offset[:, :3].std() < 0.008 and 0.03 < offset[:, 3:9].std() < 0.08, offset.std(axis=0)
        abs_env.reset(seed=0)
        for match, action in {r"shape \(10,\) \(action_mode absolute\), got \(7,\)": np.zeros(7),
                              "a zero or parallel column": np.r_[0.5, 0.0, 0.1, np.zeros(6), 1.0],
                              "non-finite": np.r_[np.nan, np.zeros(9)]}.items():
            with pytest.raises(UserError, match=match):
                abs_env.step(action)
        assert abs_env.elapsed_steps == 0
    finally:
        abs_env.close()
    with pytest.raises(UserError, match="action_mode must be one of delta, absolute, got 'abs'"):
        lift(env_kwargs={"action_mode": "abs"})


def test_collect_two_episodes_with_robomimic_keys(tmp_path):
    from rtpolicy.datasets.collect import collect_demos
    from rtpolicy.datasets.replay_buffer import ReplayBuffer

    task = {"env": "robosuite", "name": "Lift", "max_episode_steps": 120}
    info = collect_demos(task, tmp_path / "lift.zarr", episodes=2, seed=0, action_noise=0.05, progress=False)
    assert info["episodes"] == 2 and info["successes"] == 2
    buf = ReplayBuffer.open(tmp_path / "lift.zarr")
    assert {"state", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object", "action"} <= set(buf.keys)
    assert buf.shape("action") == (7,) and buf.shape("object") == (OBJECT_DIMS["Lift"],) and buf.shape("state") == (19,)
    assert buf.attrs["env"] == "robosuite" and buf.attrs["task"] == "Lift" and buf.attrs["fps"] == 20.0
    # post_success_steps: the same starts go on for 5 expert steps past the success (the lift's last states become
    # training inputs for a head that executes one action per observation)
    collect_demos(task, tmp_path / "post.zarr", episodes=2, seed=0, action_noise=0.05, progress=False, post_success_steps=5)
    post = ReplayBuffer.open(tmp_path / "post.zarr")
    assert post.episode_lengths.tolist() == [n + 5 for n in buf.episode_lengths.tolist()]
    assert post.get_episode(0)["object"][-1][2] > buf.get_episode(0)["object"][-1][2]  # the cube goes on rising


def test_demos_export_to_robomimic_hdf5_whose_env_args_build_our_env(tmp_path, lift_env):
    """collect -> rtpolicy-convert -> robomimic HDF5: robomimic's obs names and shapes, actions, 20 Hz, and
    env_args from which robosuite builds an env with the same controller, rate and observations."""
    h5py = pytest.importorskip("h5py")
    from rtpolicy.datasets.collect import collect_demos
    from rtpolicy.datasets.convert import main as convert
    from rtpolicy.datasets.replay_buffer import ReplayBuffer
    from rtpolicy.envs.robosuite.env import import_robosuite, numpy_global_seed

    task = {"env": "robosuite", "name": "Lift", "max_episode_steps": 120}
    collect_demos(task, tmp_path / "lift.zarr", episodes=2, seed=0, progress=False)
    assert convert([str(tmp_path / "lift.zarr"), str(tmp_path / "lift.hdf5")]) == 0
    buf = ReplayBuffer.open(tmp_path / "lift.zarr")
    with h5py.File(tmp_path / "lift.hdf5", "r") as f:
        args = json.loads(f["data"].attrs["env_args"])
        assert args == json.loads(json.dumps(lift_env.env_args))
        assert json.loads(f["data"].attrs["rtpolicy_attrs"])["fps"] == 20.0
        assert sorted(f["data"]) == ["demo_0", "demo_1"] and int(f["data"].attrs["total"]) == buf.n_steps
        demo = f["data/demo_0"]
        L = int(demo.attrs["num_samples"])
        assert demo["actions"].shape == (L, 7) and demo["dones"][-1] == 1
        np.testing.assert_array_equal(demo["actions"][:], buf.get_episode(0, ["action"])["action"])
        shapes = {k: demo["obs"][k].shape[1:] for k in demo["obs"]}
    assert shapes == {"state": (19,), "object": (10,)} | ROBOT_SHAPES

    robosuite = import_robosuite()  # what a robomimic user does with env_args (EnvRobosuite: robosuite.make)
    with numpy_global_seed(0):
        theirs = robosuite.make(args["env_name"], **args["env_kwargs"])
    try:
        raw = theirs.reset()
        assert theirs.control_freq == 20 and theirs.robots[0].name == "Panda"
        arm, ours = (e.robots[0].part_controllers["right"] for e in (theirs, lift_env.robosuite_env))
        assert type(arm) is type(ours) and type(arm).__name__ == "OperationalSpaceController"
        for attr in ("kp", "kd", "output_max", "output_min", "input_max"):
            np.testing.assert_array_equal(getattr(arm, attr), getattr(ours, attr), err_msg=attr)
        assert np.allclose(arm.kp, 150) and np.allclose(arm.output_max, [0.05] * 3 + [0.5] * 3)
        for key, shape in ROBOT_SHAPES.items():
            assert np.asarray(raw[key]).shape == shape, key
        assert np.asarray(raw["object-state"]).shape == (10,)
    finally:
        theirs.close()


def test_absolute_demos_export_to_robomimic_absolute_actions_that_replay_in_robosuite(tmp_path):
    """``rtpolicy-collect --env-kwarg action_mode=absolute`` -> an absolute-mode store -> robomimic HDF5: actions (L, 7) with axis-angle rotations (robosuite's absolute
    OSC_POSE input, as in Chi et al.'s ``*_abs`` datasets); robosuite built from the file's env_args replays them to
    the demo's success; reading the file back gives the store's (L, 10) actions."""
    h5py = pytest.importorskip("h5py")
    from rtpolicy.datasets.collect import main as collect_main
    from rtpolicy.datasets.convert import main as convert
    from rtpolicy.datasets.formats import FORMATS
    from rtpolicy.datasets.replay_buffer import ReplayBuffer
    from rtpolicy.envs.robosuite.env import MODEL_SEED, import_robosuite, numpy_global_seed

    collect_main(["--env", "robosuite", "--task", "Lift", "--episodes", "1", "--seed", "3", "--max-steps", "120",
                  "--env-kwarg", "action_mode=absolute", "--out", str(tmp_path / "lift.zarr"), "--no-progress"])
    assert convert([str(tmp_path / "lift.zarr"), str(tmp_path / "lift.hdf5")]) == 0
    ours = ReplayBuffer.open(tmp_path / "lift.zarr").get_episode(0, ["action"])["action"]
    with h5py.File(tmp_path / "lift.hdf5", "r") as f:
        args = json.loads(f["data"].attrs["env_args"])
        actions = f["data/demo_0/actions"][:]
    assert actions.shape == (len(ours), 7) and args["env_kwargs"]["controller_configs"]["body_parts"]["right"]["input_type"] == "absolute"
    np.testing.assert_allclose(actions[:, :3], ours[:, :3])
    back = next(FORMATS.get("robomimic").cls().read(tmp_path / "lift.hdf5").episodes())["action"]
    np.testing.assert_allclose(back, ours, atol=1e-5)

    robosuite = import_robosuite()
    with numpy_global_seed(MODEL_SEED):  # our env's model and start of seed 3 (no hard reset: the model stays)
        theirs = robosuite.make(args["env_name"], **args["env_kwargs"] | {"hard_reset": False})
    try:
        with numpy_global_seed(3):
            theirs.reset()
        for a in actions:
            theirs.step(a)
        assert theirs._check_success()
    finally:
        theirs.close()


def test_robosuite4_multitask_collects_and_trains(tmp_path):
    """task=robosuite4 like MT10: one demo per member into one suite store (state (32,), task_id 0..3) and a
    2-step task-conditioned training (the suite evaluation, ~15 s of worker start-ups, is left out)."""
    from rtpolicy.datasets.replay_buffer import ReplayBuffer
    from rtpolicy.factory import compose
    from rtpolicy.training import train

    cfg = compose(["task=robosuite4", f"task.dataset={tmp_path}/rs4.zarr", "task.collect=true", "task.demos=1",
                   "policy=truncated", "policy.horizon=8", "policy.action_horizon=4", "policy.num_anchors=4",
                   "denoiser.down_dims=[16,32]", "policy.cond_dim=16", "train.batch_size=8", "train.steps=2",
                   "train.threads=1", "train.val_every=1000", "train.log_every=1", "train.ckpt_every=1000",
                   "eval.episodes=0", f"run_dir={tmp_path}/run"])
    res = train(cfg)
    assert res["step"] == 2 and Path(res["checkpoint"]).exists()
    buf = ReplayBuffer.open(tmp_path / "rs4.zarr")
    assert buf.n_episodes == 4 and buf.shape("state") == (9 + max(OBJECT_DIMS.values()),)
    assert sorted({int(buf.get_episode(i, ["task_id"])["task_id"][0]) for i in range(4)}) == [0, 1, 2, 3]


def test_absolute_action_mode_from_the_task_config(tmp_path):
    """task=robosuite_lift task.env_kwargs.action_mode=absolute: collects 10-dim target actions, trains, evaluates the
    checkpoint on the absolute env (eval.py's path); the delta store is refused before training; export refuses
    (the node commands deltas only), naming the mode."""
    from rtpolicy.datasets.replay_buffer import ReplayBuffer
    from rtpolicy.deploy.export import export_bundle
    from rtpolicy.evaluation import evaluate
    from rtpolicy.factory import compose
    from rtpolicy.checkpoint import load_policy
    from rtpolicy.factory import task_config
    from rtpolicy.training import train

    small = ["policy=truncated", "policy.horizon=8", "policy.action_horizon=4", "policy.num_anchors=4",
             "denoiser.down_dims=[16,32]", "policy.cond_dim=16", "train.batch_size=8", "train.steps=2", "train.threads=1",
             "train.val_every=1000", "train.log_every=1", "train.ckpt_every=1000", "task.demos=1", "task.collect=true"]
    delta = compose(["task=robosuite_lift", f"task.dataset={tmp_path}/delta.zarr", "eval.episodes=0",
                     f"run_dir={tmp_path}/delta", *small])
    train(delta)
    # the checkpoint and the bundle carry the quaternions of the state (robot0_eef_quat, cube_quat), and the policy
    # they load reads the store's observation and its sign-flipped quaternions (one rotation each) alike
    from rtpolicy.deploy.export import load_bundle

    export_bundle(tmp_path / "delta" / "checkpoints" / "last.safetensors", tmp_path / "delta_bundle", onnx=True)
    state = torch.from_numpy(ReplayBuffer.open(tmp_path / "delta.zarr")["state"][5:7])[None]  # (1, To=2, 19)
    flipped = state.clone()
    flipped[..., 3:7] *= -1
    flipped[..., 12:16] *= -1
    for backend in ("torch", "ort"):
        policy, bundle = load_bundle(tmp_path / "delta_bundle", backend=backend)
        assert bundle["processor"]["rotations"] == {"state": [3, 12]} and bundle["observation"]["state"]["shape"] == [19]
        # the quaternion dims' range is a unit quaternion's: neither the normalizer nor the node's range check objects
        assert bundle["normalizer"]["state.min"][3:7] == bundle["normalizer"]["state.min"][12:16] == [-1.0] * 4
        chunks = []
        for obs in (state, flipped):
            torch.manual_seed(0)
            policy.reset()
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                chunks.append(torch.as_tensor(policy.predict_chunk({"state": obs})))
        assert torch.allclose(chunks[0], chunks[1], atol=1e-5), backend
    absolute = ["task=robosuite_lift", "task.env_kwargs.action_mode=absolute", "eval.episodes=1", "eval.num_envs=1", *small]
    with pytest.raises(UserError, match=rf"task.dataset={tmp_path}/delta.zarr holds actions of shape \(7,\), but robosuite "
                                        r"Lift with env_kwargs \{'action_mode': 'absolute'\} takes \(10,\)"):
        train(compose([*absolute, f"task.dataset={tmp_path}/delta.zarr", f"run_dir={tmp_path}/refused"]))
    assert not (tmp_path / "refused").exists()
    res = train(compose([*absolute, f"task.dataset={tmp_path}/abs.zarr", f"run_dir={tmp_path}/abs"]))
    assert res["episodes"] == 1 and Path(res["checkpoint"]).exists()
    buf = ReplayBuffer.open(tmp_path / "abs.zarr")
    assert buf.shape("action") == (10,) and buf.attrs["env_kwargs"] == {"action_mode": "absolute"}
    assert buf.attrs["env_args"]["env_kwargs"]["controller_configs"]["body_parts"]["right"]["input_type"] == "absolute"
    policy, meta = load_policy(res["checkpoint"], "cpu")  # eval.py's path: the env from the checkpoint's task config
    assert meta["config"]["task"]["env_kwargs"] == {"action_mode": "absolute"}
    again = evaluate(policy, task_config(meta["config"]["task"]), {"episodes": 1, "num_envs": 1}, progress=False)
    assert again["episodes"] == 1
    with pytest.raises(UserError, match="robosuite action_mode=absolute: the ROS 2 node has no command for absolute"):
        export_bundle(res["checkpoint"], tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
