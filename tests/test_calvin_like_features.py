"""Issue 13: the hand-relative ``state_rel`` observation, re-planning experts that recover from a moved block,
DART labels (noise executed, clean action stored) and the chain-aware demo store."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "osmesa")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from rtpolicy.datasets.collect import run_expert_episode  # noqa: E402
from rtpolicy.envs.calvin_like import (  # noqa: E402
    OBJECTS_REL_DIM,
    OBJECTS_REL_NAMES,
    REL_DIM,
    REL_NAMES,
    STATE_DIM,
    TASKS,
    CalvinLikeEnv,
)
from rtpolicy.envs.calvin_like.demos import collect, split_subtasks  # noqa: E402
from rtpolicy.envs.calvin_like.tasks import quat_yaw  # noqa: E402

IDX = {n: i for i, n in enumerate(REL_NAMES)}


def make(name="lift_red_block_table", keys=("state", "state_rel"), **kw):
    cfg = {"name": name, "obs_keys": list(keys), "max_episode_steps": None if name.startswith("chain") else 150}
    return CalvinLikeEnv(cfg, seed=0, **kw)


def put_hand(env, xyz, yaw):
    """Teleport the hand (and its controller target) and refresh the env's snapshot and observation."""
    d = env.data
    d.qpos[env._hand_q] = (*xyz, yaw)
    env._target[:] = (*xyz, yaw)
    env._mj.mj_forward(env.model, d)
    env._snap = env.snapshot()
    return env.rel_vector()


def move_block(env, c, dxy):
    qa = env._qb[c]
    env.data.qpos[qa : qa + 2] += dxy
    env.data.qvel[env._vb[c] : env._vb[c] + 6] = 0.0
    env._mj.mj_forward(env.model, env.data)
    env._snap = env.snapshot()


def test_state_rel_shape_and_keys():
    assert len(REL_NAMES) == REL_DIM == 62 and not any(n.endswith(("_qw", "_qx", "_qy", "_qz")) for n in REL_NAMES)
    env = make()
    obs, _ = env.reset(seed=3)
    assert obs["state"].shape == (STATE_DIM,) and obs["state_rel"].shape == (REL_DIM,) and obs["state_rel"].dtype == np.float32
    assert env.observation_space["state_rel"].shape == (REL_DIM,)
    assert "state_rel" not in make(keys=("state",)).reset(seed=3)[0]  # only when task.obs_keys names it
    s = env.snapshot()
    rel = obs["state_rel"]
    np.testing.assert_allclose(rel[IDX["red_dx"] : IDX["red_dz"] + 1], s.pos["red"] - s.ee, atol=1e-6)
    assert rel[IDX["red_turned_cos"]] == pytest.approx(1.0) and rel[IDX["red_moved_x"]] == 0.0  # nothing moved yet


def test_objects_rel_is_state_rel_without_the_command_offsets():
    assert OBJECTS_REL_DIM == REL_DIM - 4 and not any(n.startswith("target_") for n in OBJECTS_REL_NAMES)
    env = make(keys=("state_rel", "objects_rel"))
    obs, _ = env.reset(seed=2)
    expert = env.expert()
    for _ in range(6):  # moving: the target leads the TCP
        obs, *_ = env.step(expert(obs))
    rel = obs["state_rel"]
    assert np.abs(rel[IDX["target_dx"] : IDX["target_dyaw"] + 1]).max() > 1e-3
    keep = [IDX[n] for n in OBJECTS_REL_NAMES]
    np.testing.assert_array_equal(obs["objects_rel"], rel[keep])


@pytest.mark.parametrize("task,block", [("lift_pink_block_table", "pink"), ("unstack_block", None), ("open_drawer", None)])
def test_target_rel_is_the_current_task_block(task, block):
    env = make(task, keys=("state_rel", "target_rel"))
    obs, _ = env.reset(seed=1)
    c = env.task_block_now()
    if task == "unstack_block":  # the top block of the stack
        assert c is not None and env.snapshot().pos[c][2] > 0.05
    else:
        assert c == block
    if c is None:
        assert obs["target_rel"].shape == (15,) and not obs["target_rel"].any()
    else:
        np.testing.assert_array_equal(obs["target_rel"], obs["state_rel"][[IDX[f"{c}_{k}"] for k in ("dx", "dy", "dz", "hand_dx",
                                      "hand_dy", "yaw_sin", "yaw_cos", "z", "up", "grasped", "moved_x", "moved_y", "moved_z",
                                      "turned_sin", "turned_cos")]])


def test_relative_vectors_are_zero_at_the_block_and_rotate_with_the_hand():
    env = make()
    env.reset(seed=1)
    p = env.snapshot().pos["blue"].copy()
    yaw_b = quat_yaw(env.snapshot().quat["blue"])
    rel = put_hand(env, p, float(np.clip(yaw_b + np.pi / 2, -2.9, 2.9)))  # a quarter turn: same grasp for a square block
    np.testing.assert_allclose(rel[[IDX[f"blue_{k}"] for k in ("dx", "dy", "dz", "hand_dx", "hand_dy")]], 0.0, atol=1e-6)
    assert rel[IDX["blue_yaw_sin"]] == pytest.approx(0.0, abs=1e-5) and rel[IDX["blue_yaw_cos"]] == pytest.approx(1.0, abs=1e-5)
    # the hand turned by +90 deg: a block 5 cm along world +x is 5 cm along the hand's -y
    rel = put_hand(env, p - [0.05, 0.0, 0.0], np.pi / 2)
    assert rel[IDX["blue_dx"]] == pytest.approx(0.05, abs=1e-5)
    assert rel[IDX["blue_hand_dx"]] == pytest.approx(0.0, abs=1e-5) and rel[IDX["blue_hand_dy"]] == pytest.approx(-0.05, abs=1e-5)


def test_turned_and_moved_track_the_subtask_start():
    env = make("rotate_red_block_left")
    obs, _ = env.reset(seed=0)
    expert = env.expert()
    for _ in range(150):
        last = obs
        obs, _, terminated, truncated, _ = env.step(expert(obs))
        if terminated or truncated:
            break
    assert terminated
    rel = obs["state_rel"] if obs is not None else last["state_rel"]
    turned = np.arctan2(rel[IDX["red_turned_sin"]], rel[IDX["red_turned_cos"]])
    assert turned >= np.deg2rad(50)  # what the success predicate measures, now observable


@pytest.mark.parametrize("task,c", [("push_blue_block_right", "blue"), ("lift_pink_block_table", "pink"),
                                    ("rotate_red_block_right", "red")])
def test_experts_recover_from_a_block_moved_mid_approach(task, c):
    env = make(task, keys=("state",))
    obs, _ = env.reset(seed=4)
    expert = env.expert()
    for _ in range(12):  # halfway through the approach
        obs, *_ = env.step(expert(obs))
    move_block(env, c, np.array([0.0, 0.03]))
    for _ in range(140):
        obs, _, terminated, truncated, info = env.step(expert(obs))
        if terminated or truncated:
            break
    assert terminated and info["success"], f"{task}: {info}"


def test_dart_executes_noise_and_stores_clean_labels():
    env = make("push_red_block_left", keys=("state",))
    expert = env.expert()
    labels = []

    def recording(obs):
        a = expert(obs)
        labels.append(np.clip(a, -1, 1).astype(np.float32))
        return a

    noisy, ok = run_expert_episode(env, recording, seed=5, action_noise=0.2)
    assert ok
    np.testing.assert_array_equal(noisy["action"], np.stack(labels))  # the stored action is the expert's label
    clean, _ = run_expert_episode(env, expert, seed=5, action_noise=0.0)
    n = min(len(clean["state"]), len(noisy["state"]))
    assert not np.allclose(clean["state"][:n], noisy["state"][:n])  # ... while the env executed noisy actions
    assert np.abs(noisy["action"]).max() <= 1.0


def test_chain_demos_are_cut_per_subtask(tmp_path):
    env = make("chain3", keys=("state_rel",))
    episode, ok = run_expert_episode(env, env.expert(), seed=2)
    parts = split_subtasks(episode, env.completed)
    assert ok and len(parts) == 3 and sum(len(p["action"]) for p in parts) == len(episode["action"])
    assert [TASKS[int(p["task_id"][0])] for p in parts] == env.chain
    assert all((p["task_id"] == p["task_id"][0]).all() for p in parts)
    info = collect(tmp_path / "d.zarr", ["state_rel"], task_demos=0, chains=2, noise=0.1, chain_length=2)
    assert info["episodes"] >= 2 and info["obs_keys"] == ["state_rel", "task_id"] and info["action_noise"] == 0.1
    with pytest.raises(ValueError, match="obs-keys 'lang_emb' is made by a language policy's processor"):
        collect(tmp_path / "e.zarr", ["state", "lang_emb"], task_demos=1)
    with pytest.raises(ValueError, match="obs-keys"):
        collect(tmp_path / "e.zarr", ["task_id"], task_demos=1)


def _run(env, expert, obs, until, steps=150):
    """Step the expert until ``until(env, obs)`` holds after a step or the episode ends; returns (obs, held, ended)."""
    for _ in range(steps):
        obs, _, terminated, truncated, _ = env.step(expert(obs))
        if until(env, obs) or terminated or truncated:
            return obs, until(env, obs), terminated or truncated
    return obs, False, False


@pytest.mark.parametrize("task", ["place_in_drawer", "stack_block"])
def test_goal_rel_points_the_held_block_at_its_destination(task):
    from rtpolicy.envs.calvin_like import GOAL_REL_DIM
    from rtpolicy.envs.calvin_like.tasks import grasped

    env = make(task, keys=("target_rel", "goal_rel"))
    obs, _ = env.reset(seed=2)
    assert obs["goal_rel"].shape == (GOAL_REL_DIM,) and obs["goal_rel"][4] == 1.0
    c = env.task_block_now()
    assert np.linalg.norm(obs["goal_rel"][:2]) > 0.05  # the block starts away from where it must go
    expert = env.expert()
    # the expert lets go where goal_rel says: at release its xy offset is under 1.5 cm
    assert env._grip_closed and grasped(env.snapshot(), c)
    obs, opened, _ = _run(env, expert, obs, lambda e, o: not e._grip_closed)  # the first step with the fingers opening
    assert opened
    assert np.linalg.norm(obs["goal_rel"][:2]) < 0.015 and abs(obs["goal_rel"][2]) < 0.02
    assert not make("open_drawer", keys=("goal_rel",)).reset(seed=0)[0]["goal_rel"].any()  # fixture tasks: zeros


def test_rotate_goal_is_the_yaw_still_to_turn_and_the_expert_lets_go_there():
    from rtpolicy.envs.calvin_like.experts import ROTATE_DONE
    from rtpolicy.envs.calvin_like.goals import ROTATE_BY

    for task, sign in (("rotate_pink_block_left", 1.0), ("rotate_pink_block_right", -1.0)):
        env = make(task, keys=("target_rel", "goal_rel"))
        obs, _ = env.reset(seed=5)
        assert obs["goal_rel"][3] == pytest.approx(sign * ROTATE_BY, abs=1e-4) and not obs["goal_rel"][:3].any()
        expert = env.expert()
        was_closed = False

        def opens(e, o):
            nonlocal was_closed
            if e._grip_closed:
                was_closed = True
            return was_closed and not e._grip_closed

        obs, opened, _ = _run(env, expert, obs, opens)
        assert opened
        # it lets go once the remaining yaw is within ROTATE_BY - ROTATE_DONE, with the block still lifted
        assert sign * obs["goal_rel"][3] <= ROTATE_BY - ROTATE_DONE + 0.02
        s = env.snapshot()
        assert s.pos["pink"][2] > 0.018 + 0.004  # not put down first
        if not env._terminated:
            _run(env, expert, obs, lambda e, o: False)
        assert env._terminated  # and the task succeeds


def test_post_success_steps_keep_the_release_as_a_training_input(tmp_path):
    """A solved rotate demo goes on for the requested expert steps: the same labels up to the success, then the
    release (gripper open) and the rise, so the state where the expert lets go is no longer an episode's last."""
    env = make("rotate_red_block_left", keys=("objects_rel", "goal_rel"))
    plain, ok = run_expert_episode(env, env.expert(), 3, 0.2)
    more, ok_more = run_expert_episode(env, env.expert(), 3, 0.2, post_success_steps=6)
    n = len(plain["action"])
    assert ok and ok_more and len(more["action"]) == n + 6
    np.testing.assert_array_equal(more["action"][:n], plain["action"])
    assert (more["action"][n - 1 :, 4] <= 0).all()  # open from the release on
    assert env._terminated  # still solved at the end
    with pytest.raises(RuntimeError, match="single-task"):
        make("chain2", keys=("state",)).resume_after_success()
    info = collect(tmp_path / "p.zarr", ["objects_rel"], task_demos=1, chains=0, post_success_steps=4)
    assert info["post_success_steps"] == 4
