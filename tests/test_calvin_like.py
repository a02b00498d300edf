"""CALVIN-like tabletop env: predicates + scripted experts per task, chain sampler feasibility, episode
semantics (absorbing end, seeding, budgets), input validation, rendering and the gymnasium ids."""

from __future__ import annotations

import os
import time

os.environ.setdefault("MUJOCO_GL", "osmesa")

import gymnasium  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from rtpolicy.envs import ENVS, make_env  # noqa: E402
from rtpolicy.envs.calvin_like import ALL_INSTRUCTIONS, INSTRUCTIONS, STATE_DIM, STATE_NAMES, TASKS, CalvinLikeEnv  # noqa: E402
from rtpolicy.envs.calvin_like.chains import init_symbolic, random_init, sample_chain  # noqa: E402
from rtpolicy.envs.calvin_like.scene import BULB_ON_RGBA, LAYOUTS, LED_ON_RGBA, LIGHT_OFF_RGBA  # noqa: E402
from rtpolicy.envs.calvin_like.tasks import apply_effect, feasible, success  # noqa: E402


def make(name="open_drawer", **kw):
    cfg = {"env": "calvin_like", "name": name, "max_episode_steps": kw.pop("max_episode_steps", None if name.startswith("chain") else 200)}
    return CalvinLikeEnv(cfg, seed=kw.pop("seed", 0), **kw)


def run(env, expert, seed):
    obs, info = env.reset(seed=seed)
    for _ in range(env.max_episode_steps):
        obs, _, terminated, truncated, info = env.step(expert(obs))
        if terminated or truncated:
            return obs, terminated, truncated, info
    raise AssertionError("episode did not end")


def test_task_list_and_instructions():
    assert len(TASKS) >= 20 and len(set(TASKS)) == len(TASKS)
    assert all(len(INSTRUCTIONS[t]) >= 3 for t in TASKS)
    assert len(ALL_INSTRUCTIONS) == sum(len(v) for v in INSTRUCTIONS.values())
    assert len(STATE_NAMES) == STATE_DIM
    spec = CalvinLikeEnv.DEPLOY_SPEC
    assert spec["action_names"] == ["dx", "dy", "dz", "dyaw", "gripper"] and spec["delta_dims"] == [0, 1, 2, 3]
    assert 15 <= spec["control_rate_hz"] <= 30


@pytest.mark.parametrize("task", TASKS)
def test_expert_solves_task(task):
    env = make(task, scene="A" if TASKS.index(task) % 2 == 0 else "B")
    expert = env.expert()
    for seed in (0, 1):
        env.reset(seed=seed)
        start = env.snapshot()
        assert not success(task, start, start, env.layout), f"{task} already holds at reset (seed {seed})"
        assert feasible(task, env.symbolic_state(), env.layout)
        _, terminated, truncated, info = run(env, expert, seed)
        assert terminated and not truncated and info["success"] is True, f"{task} seed {seed}: {info}"
        assert success(task, start, env.snapshot(), env.layout)
        assert info["steps"] < 120


def test_chain_sampler_only_proposes_feasible_tasks():
    seen: set[str] = set()
    for scene in ("A", "B", "C", "D"):
        layout = LAYOUTS[scene]
        for seed in range(150):
            rng = np.random.default_rng(seed)
            sym = init_symbolic(random_init(layout, rng))
            chain = sample_chain(sym, 5, layout, rng)
            assert len(chain) == 5 and len(set(chain)) == 5
            for t in chain:
                assert feasible(t, sym, layout), (scene, seed, chain, t)
                sym = apply_effect(t, sym)
            seen.update(chain)
    assert seen == set(TASKS), f"never sampled: {set(TASKS) - seen}"


def test_chain_env_runs_with_expert():
    env = make("chain5", seed=3)
    assert env.max_episode_steps == 5 * env.subtask_steps
    expert = env.expert()
    obs, info = env.reset(seed=3)
    chain = info["chain"]
    assert len(chain) == 5 and info["completed"] == 0 and info["subtask"] == chain[0]
    assert obs["task_id"] == TASKS.index(chain[0]) and env.instruction in INSTRUCTIONS[chain[0]]
    assert ALL_INSTRUCTIONS[obs["instruction_id"]] == env.instruction
    done_seen = []
    for _ in range(env.max_episode_steps):
        obs, reward, terminated, truncated, info = env.step(expert(obs))
        if reward:
            done_seen.append(info["completed"])
            if not terminated:
                assert info["subtask"] == chain[info["completed"]] and obs["task_id"] == TASKS.index(info["subtask"])
                assert ALL_INSTRUCTIONS[obs["instruction_id"]] in INSTRUCTIONS[info["subtask"]]
        if terminated or truncated:
            break
    assert terminated and info["success"] is True and info["completed"] == 5 and done_seen == [1, 2, 3, 4, 5]


def test_chain_budget_runs_out():
    with pytest.warns(UserWarning, match="subtask_steps=4 is below"):
        env = make("chain3", subtask_steps=4)
    obs, _ = env.reset(seed=0)
    for k in range(4):
        obs, _, terminated, truncated, info = env.step(np.zeros(5, np.float32))
    assert truncated and not terminated and info["success"] is False and info["completed"] == 0
    with pytest.warns(UserWarning, match=r"subtask_steps=40 \(= max_episode_steps 200 // 5\)"):
        env = make("chain5", max_episode_steps=200)
    assert env.subtask_steps == 40 and env.max_episode_steps == 200
    assert make("chain5", max_episode_steps=750).subtask_steps == 150


def test_absorbing_end():
    env = make("turn_on_lightbulb", max_episode_steps=3)
    obs, _ = env.reset(seed=0)
    for _ in range(3):
        obs, _, terminated, truncated, info = env.step(np.zeros(5))
    assert truncated and not terminated and info["success"] is False
    t = env.data.time
    obs2, reward, terminated2, truncated2, info2 = env.step(np.ones(5))
    assert env.data.time == t and reward == 0.0 and (terminated2, truncated2) == (terminated, truncated)
    assert info2 == info and all(np.array_equal(obs[k], obs2[k]) for k in obs)
    # success ends it too, then stays ended
    env = make("turn_on_lightbulb")
    obs, terminated, _, info = run(env, env.expert(), 1)
    assert terminated and info["success"]
    assert env.step(np.zeros(5))[2:4] == (True, False)
    assert np.allclose(env.model.geom_rgba[env._bulb_geom], BULB_ON_RGBA)


def test_seeded_reset_is_deterministic():
    a, b = make("chain5", seed=11), make("chain5", seed=11)
    oa, ia = a.reset(seed=5)
    ob, ib = b.reset(seed=5)
    assert np.array_equal(oa["state"], ob["state"]) and ia["chain"] == ib["chain"] and a.instruction == b.instruction
    oc, ic = a.reset(seed=6)
    assert not np.array_equal(oa["state"], oc["state"])
    # the unseeded stream follows the constructor seed
    sa = [a.reset()[0]["state"] for _ in range(2)]
    a2 = make("chain5", seed=11)
    sb = [a2.reset()[0]["state"] for _ in range(2)]
    assert all(np.array_equal(x, y) for x, y in zip(sa, sb)) and not np.array_equal(sa[0], sa[1])
    # same seed after stepping: same state again
    for _ in range(5):
        a.step(np.ones(5))
    assert np.array_equal(a.reset(seed=5)[0]["state"], oa["state"])


def test_bad_inputs():
    with pytest.raises(ValueError, match="did you mean open_drawer"):
        make("open_drawr")
    with pytest.raises(ValueError, match="unknown scene"):
        make(scene="Z")
    with pytest.raises(ValueError, match="unknown camera"):
        make(cameras=("wrist",))
    with pytest.raises(ValueError, match="max_episode_steps"):
        make(max_episode_steps=0)
    env = make()
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(5))
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        env.step(np.zeros(4))
    with pytest.raises(ValueError, match="non-finite"):
        env.step(np.array([0, np.nan, 0, 0, 0]))
    with pytest.raises(RuntimeError, match="render=True"):
        env.render()


def test_observations_and_rendering():
    env = make("chain2", cameras=("static", "gripper"), image_size=32, width=32, height=32, render=True)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert obs["state"].shape == (STATE_DIM,) and obs["state"].dtype == np.float32
    for cam in ("static", "gripper"):
        assert obs[f"rgb_{cam}"].shape == (32, 32, 3) and obs[f"rgb_{cam}"].dtype == np.uint8
    assert obs["rgb_static"].std() > 0
    assert env.render().shape == (32, 32, 3)
    obs, *_ = env.step(env.action_space.sample())
    assert env.observation_space.contains(obs)
    single = make("open_drawer")
    obs, _ = single.reset(seed=0)
    assert set(obs) == {"state", "instruction_id"}
    multi = CalvinLikeEnv({"name": "open_drawer", "num_tasks": len(TASKS), "task_id": TASKS.index("open_drawer")}, seed=0)
    assert multi.reset(seed=0)[0]["task_id"] == TASKS.index("open_drawer")
    # the light bulb and the LED change colour
    for seed in range(4):
        single.reset(seed=seed)
        s = single.snapshot()
        assert np.allclose(single.model.geom_rgba[single._led_geom], LED_ON_RGBA if s.led else LIGHT_OFF_RGBA)
        assert np.allclose(single.model.geom_rgba[single._bulb_geom], BULB_ON_RGBA if s.bulb else LIGHT_OFF_RGBA)


def test_registration_and_gymnasium_make():
    assert "calvin_like" in ENVS
    env = make_env({"env": "calvin_like", "name": "close_drawer", "max_episode_steps": 50}, seed=0)
    assert isinstance(env, CalvinLikeEnv) and env.max_episode_steps == 50
    g = gymnasium.make("rtpolicy/CalvinLike-v0", task="open_drawer", scene="C")
    obs, _ = g.reset(seed=0)
    assert obs["state"].shape == (STATE_DIM,)
    g = gymnasium.make("rtpolicy/CalvinLikeChain-v0", length=3)
    _, info = g.reset(seed=0)
    assert len(info["chain"]) == 3
    import importlib

    importlib.reload(importlib.import_module("rtpolicy.envs.calvin_like"))  # registering twice is harmless


def test_expert_noise_and_speed():
    env = make("lift_red_block_table")
    _, terminated, _, info = run(env, env.expert(noise=0.1, seed=0), 0)
    assert terminated and info["success"]
    env = make("chain5")
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, size=(500, 5))
    t0 = time.perf_counter()
    for a in actions:
        if env.step(a)[2:4] != (False, False):
            env.reset()
    print(f"\ncalvin_like env steps/s (no rendering): {500 / (time.perf_counter() - t0):.0f}")


def test_collected_episodes_carry_their_instruction_text(tmp_path):
    """The collector stores each episode's task id per step and its instruction text per episode."""
    from rtpolicy.datasets.collect import collect_demos
    from rtpolicy.datasets.replay_buffer import ReplayBuffer

    task = {"env": "calvin_like", "name": "open_drawer", "max_episode_steps": 150, "num_tasks": 27, "task_id": 0}
    collect_demos(task, tmp_path / "d.zarr", 3, 0, progress=False)
    buf = ReplayBuffer.open(tmp_path / "d.zarr")
    texts = buf.attrs["instructions"]
    assert len(texts) == buf.n_episodes == 3 and all(t in INSTRUCTIONS["open_drawer"] for t in texts)
    for i, text in enumerate(texts):
        ep = buf.get_episode(i)
        assert (ep["task_id"] == 0).all() and {ALL_INSTRUCTIONS[j] for j in ep["instruction_id"]} == {text}


def test_cameras_from_obs_keys_at_image_size():
    env = make_env({"env": "calvin_like", "name": "open_drawer", "obs_keys": ["state", "rgb_static"], "image_size": 24})
    obs, _ = env.reset(seed=0)
    assert obs["rgb_static"].shape == (24, 24, 3) and "rgb_gripper" not in obs
    assert env.observation_space.contains(obs) and obs["rgb_static"].std() > 5
    env.close()
