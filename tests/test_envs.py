"""Meta-World env wrapper, scripted demo collection and the parallel evaluation runner (real physics)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rtpolicy.config import EvalConfig, TaskConfig
from rtpolicy.datasets.collect import collect_demos
from rtpolicy.datasets.replay_buffer import ReplayBuffer
from rtpolicy.envs import ENVS, make_env
from rtpolicy.envs.metaworld import MetaWorldEnv, expert_policy
from rtpolicy.evaluation import evaluate, wilson_interval
from rtpolicy.policies.base import Policy

TASK = "pick-place-v3"


def task_cfg(**kw) -> TaskConfig:
    return TaskConfig(name=TASK, **kw)


def run_expert(env, seed):
    expert = env.expert()
    obs, _ = env.reset(seed=seed)
    for _ in range(env.max_episode_steps):
        obs, _, terminated, truncated, info = env.step(expert(obs))
        if terminated or truncated:
            return terminated, info
    raise AssertionError("episode did not end")


def test_registry_and_spaces():
    assert "metaworld" in ENVS
    env = make_env(task_cfg(), seed=0)
    assert isinstance(env, MetaWorldEnv)
    obs, info = env.reset()
    assert set(obs) == {"state"} and obs["state"].shape == (39,) and obs["state"].dtype == np.float32
    assert env.observation_space.contains(obs) and env.action_space.shape == (4,)
    assert info["success"] is False
    multi = make_env(task_cfg(num_tasks=3), seed=0)
    obs, _ = multi.reset()
    assert obs["task_id"] == 0 and multi.observation_space["task_id"].n == 3
    with pytest.raises(RuntimeError, match="render=True"):
        env.render()
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        env.step(np.zeros(3))
    with pytest.raises(ValueError, match="non-finite"):
        env.step(np.array([0, np.nan, 0, 0]))


@pytest.mark.parametrize("seed", [0, 1])
def test_expert_solves_pick_place(seed):
    env = make_env(task_cfg(), seed=seed)
    success, info = run_expert(env, seed)
    assert success and info["success"] is True
    assert info["steps"] < 150


def test_absorbing_after_termination():
    env = make_env(task_cfg(), seed=0)
    success, info = run_expert(env, 0)
    assert success
    last = env.step(np.zeros(4))
    state = env._env.data.qpos.copy()
    for action in [np.ones(4), -np.ones(4)]:
        obs, reward, terminated, truncated, info2 = env.step(action)
        np.testing.assert_array_equal(obs["state"], last[0]["state"])
        assert (terminated, truncated, reward, info2) == (True, False, 0.0, info)
    np.testing.assert_array_equal(env._env.data.qpos, state)  # no physics stepped
    assert env.elapsed_steps == info["steps"]

    # truncation is absorbing too
    env = make_env(task_cfg(), seed=0, max_episode_steps=5)
    env.reset(seed=3)
    flags = [env.step(np.zeros(4))[2:4] for _ in range(8)]
    assert flags[:4] == [(False, False)] * 4 and flags[4:] == [(False, True)] * 4
    assert env.elapsed_steps == 5


def test_seeded_layouts():
    a, b = make_env(task_cfg(), seed=0), make_env(task_cfg(), seed=123)
    oa, _ = a.reset(seed=7)
    ob, _ = b.reset(seed=7)
    np.testing.assert_array_equal(oa["state"], ob["state"])
    np.testing.assert_array_equal(a.layout, b.layout)
    oc, _ = b.reset(seed=8)
    assert not np.allclose(a.layout, b.layout)
    assert not np.allclose(oa["state"][4:7], oc["state"][4:7])  # object moved
    # without a seed, resets draw fresh layouts from the constructor seed's stream
    c, d = make_env(task_cfg(), seed=5), make_env(task_cfg(), seed=5)
    layouts_c = [c.reset()[0]["state"] for _ in range(3)]
    layouts_d = [d.reset()[0]["state"] for _ in range(3)]
    np.testing.assert_array_equal(np.stack(layouts_c), np.stack(layouts_d))
    assert not np.allclose(layouts_c[0], layouts_c[1])
    np.testing.assert_array_equal(layouts_c[0], c.reset(seed=5)[0]["state"])


def test_unknown_task_errors():
    with pytest.raises(ValueError, match=r"unknown Meta-World V3 task 'pick-place'.*did you mean pick-place-v3"):
        make_env(TaskConfig(name="pick-place"))
    with pytest.raises(KeyError, match="unknown env family 'gazebo'"):
        make_env(TaskConfig(env="gazebo", name=TASK))
    with pytest.raises(ValueError, match="max_episode_steps"):
        make_env(task_cfg(), max_episode_steps=0)
    # a misspelt env_kwargs key is named, for every family (no **kwargs swallows it)
    for family, name in (("metaworld", TASK), ("calvin_like", "open_drawer"), ("robosuite", "Lift")):
        with pytest.raises(ValueError, match=rf"task.env_kwargs: unknown key 'scen' for env family '{family}'"):
            make_env(TaskConfig(env=family, name=name, env_kwargs={"scen": "B"}))


def test_collect_demos_store_and_determinism(tmp_path):
    cfg = task_cfg(max_episode_steps=150)
    info = collect_demos(cfg, tmp_path / "a.zarr", 2, seed=3, action_noise=0.1, progress=False)
    assert info["episodes"] == 2 and info["new_episodes"] == 2
    buf = ReplayBuffer.open(tmp_path / "a.zarr")
    assert buf.keys == ["action", "state"]
    assert buf["state"].dtype == np.float32 and buf.shape("state") == (39,)
    assert buf["action"].dtype == np.float32 and buf.shape("action") == (4,)
    attrs = dict(buf.attrs)
    assert (attrs["env"], attrs["task"], attrs["action_noise"]) == ("metaworld", TASK, 0.1)
    assert attrs["seeds"] == [3, 4] and attrs["successes"] == 2 and attrs["next_seed"] >= 5
    data = buf.load()
    assert np.abs(data["action"]).max() <= 1.0

    # every stored episode is a success: replaying its clean labels plus the seed's noise (DART: the env executed
    # label + noise, the store holds the label) from its seed reaches the goal at the last step
    env = make_env(cfg, seed=0)
    for i, seed in enumerate(attrs["seeds"]):
        ep = buf.get_episode(i)
        obs, _ = env.reset(seed=seed)
        np.testing.assert_array_equal(obs["state"], ep["state"][0])
        rng = np.random.default_rng(seed)
        for t, label in enumerate(ep["action"]):
            action = np.clip(label + rng.normal(0.0, 0.1, size=label.shape), -1.0, 1.0).astype(np.float32)
            obs, _, terminated, _, _ = env.step(action)
            assert terminated == (t == len(ep["action"]) - 1)
            if t + 1 < len(ep["action"]):
                np.testing.assert_array_equal(obs["state"], ep["state"][t + 1])

    # same seed -> identical store
    collect_demos(cfg, tmp_path / "b.zarr", 2, seed=3, action_noise=0.1, progress=False)
    other = ReplayBuffer.open(tmp_path / "b.zarr")
    np.testing.assert_array_equal(other.episode_ends, buf.episode_ends)
    for key, value in other.load().items():
        np.testing.assert_array_equal(value, data[key])
    assert dict(other.attrs) == attrs

    # complete store: nothing to do; smaller target too
    assert collect_demos(cfg, tmp_path / "a.zarr", 1, seed=3, action_noise=0.1, progress=False)["new_episodes"] == 0
    # extending appends with fresh seeds
    info = collect_demos(cfg, tmp_path / "a.zarr", 3, seed=3, action_noise=0.1, progress=False)
    assert info["new_episodes"] == 1 and info["episodes"] == 3
    assert len(set(info["seeds"])) == 3 and info["seeds"][:2] == [3, 4]
    with pytest.raises(ValueError, match="action_noise"):
        collect_demos(cfg, tmp_path / "a.zarr", 4, seed=3, action_noise=0.0, progress=False)
    with pytest.raises(ValueError, match="unknown Meta-World V3 task"):
        collect_demos(TaskConfig(name="nope-v3"), tmp_path / "c.zarr", 1, seed=0, progress=False)
    assert not (tmp_path / "c.zarr").exists()


def test_collect_post_success_steps(tmp_path):
    # each demo goes on for 5 expert steps after its first success: the states at the goal become training inputs
    cfg = task_cfg(max_episode_steps=150)
    plain = collect_demos(cfg, tmp_path / "a.zarr", 1, seed=3, progress=False)
    info = collect_demos(cfg, tmp_path / "p.zarr", 1, seed=3, progress=False, post_success_steps=5)
    assert info["post_success_steps"] == 5 and plain["post_success_steps"] == 0
    a, p = ReplayBuffer.open(tmp_path / "a.zarr").get_episode(0), ReplayBuffer.open(tmp_path / "p.zarr").get_episode(0)
    n = len(a["action"])
    assert len(p["action"]) == n + 5
    np.testing.assert_array_equal(p["state"][:n], a["state"])  # the same episode up to its success, then 5 more steps
    env = make_env(cfg, seed=0)
    env.reset(seed=3)
    for t, action in enumerate(p["action"]):
        _, _, terminated, truncated, info = env.step(action)
        assert not truncated and terminated == (t >= n - 1) == info["success"]
        env.resume_after_success()
    # a store is only extended with its own post-success steps
    with pytest.raises(ValueError, match="post_success_steps=5, not 0"):
        collect_demos(cfg, tmp_path / "p.zarr", 2, seed=3, progress=False)
    assert ReplayBuffer.open(tmp_path / "p.zarr").n_episodes == 1


def test_reach_expert_brings_the_tcp_to_the_goal():
    # reach-v3 scores the TCP (4.5 cm below the observed hand): our expert ends with the TCP, not the hand, on the goal
    from rtpolicy.envs.metaworld import HAND_MINUS_TCP

    env = make_env(TaskConfig(name="reach-v3"), seed=0)
    for seed in (400009, 400014):  # goals 25-27 cm high, above the start: Meta-World's own expert stops 4.5 cm short
        obs, _ = env.reset(seed=seed)
        expert = env.expert()
        for _ in range(80):
            obs, _, _, _, info = env.step(expert(obs))
            env.resume_after_success()
        tcp = env._env.tcp_center
        assert info["success"] and np.linalg.norm(tcp - obs["state"][-3:]) < 0.01
        np.testing.assert_allclose(obs["state"][:3] - tcp, HAND_MINUS_TCP, atol=0.004)


def test_collect_gives_up_with_clear_error(tmp_path):
    # 3 steps are too few for any success: 3x attempts, then a clear error
    with pytest.raises(RuntimeError, match=r"succeeded in only 0 of 6 attempts"):
        collect_demos(task_cfg(max_episode_steps=3), tmp_path / "x.zarr", 2, seed=0, progress=False)


def test_collect_cli(tmp_path, capsys):
    from rtpolicy.datasets.collect import main

    out = tmp_path / "cli.zarr"
    main(["--task", TASK, "--episodes", "1", "--out", str(out), "--seed", "2", "--no-progress"])
    assert ReplayBuffer.open(out).n_episodes == 1
    assert "1 episodes" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--task", TASK, "--bogus", "1"])


class ExpertPolicy(Policy):
    """Replays the scripted expert on the latest observation: a real Policy with horizons 1."""

    obs_horizon = 1
    action_horizon = 1

    def __init__(self, task: str, obs_horizon: int = 1):
        super().__init__()
        self.expert = expert_policy(task)
        self.obs_horizon = obs_horizon
        self.calls: list[tuple[int, ...]] = []

    def reset(self) -> None:
        pass

    def predict_chunk(self, obs):
        state = obs["state"]
        assert state.shape[1:] == (self.obs_horizon, 39)
        self.calls.append(tuple(state.shape))
        actions = [self.expert(s[-1].numpy()) for s in state]
        return torch.as_tensor(np.stack(actions))[:, None]

    def compute_loss(self, batch):
        raise NotImplementedError


class ZeroPolicy(Policy):
    obs_horizon = 2
    action_horizon = 4

    def __init__(self):
        super().__init__()
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1

    def predict_chunk(self, obs):
        return torch.zeros(obs["state"].shape[0], self.action_horizon, 4)

    def compute_loss(self, batch):
        raise NotImplementedError


def test_runner_expert_succeeds(tmp_path):
    policy = ExpertPolicy(TASK, obs_horizon=2)
    cfg = EvalConfig(episodes=4, num_envs=2, seed=10, max_episode_steps=150, latency_reps=5, out=str(tmp_path / "r" / "res.json"))
    res = evaluate(policy, task_cfg(), cfg, progress=False)
    assert res["success"] == 1.0 and res["successes"] == 4 and res["episodes"] == 4
    lo, hi = res["ci95"]
    assert lo < 1.0 and hi == 1.0
    assert [e["seed"] for e in res["per_episode"]] == [10, 11, 12, 13]
    assert all(e["success"] and 0 < e["length"] < 150 for e in res["per_episode"])
    assert res["chunk_ms_p50"] > 0 and res["chunk_ms_p95"] >= res["chunk_ms_p50"] and res["rollout_chunk_ms_p50"] > 0
    assert {(2, 2, 39), (1, 2, 39)} == set(policy.calls)  # batched rollouts, batch-1 latency
    # the runner's episodes match single-env rollouts of the same seeds
    env = make_env(task_cfg(), seed=0, max_episode_steps=150)
    for e in res["per_episode"][:2]:
        success, info = run_expert(env, e["seed"])
        assert success and info["steps"] == e["length"]
    saved = json.loads((tmp_path / "r" / "res.json").read_text())
    assert saved["success"] == 1.0 and saved["ci95"] == res["ci95"]


def test_runner_zero_policy_fails():
    policy = ZeroPolicy()
    cfg = EvalConfig(episodes=3, num_envs=2, max_episode_steps=12, latency_reps=3)  # 2 rounds, the last one short
    res = evaluate(policy, task_cfg(), cfg, progress=False)
    assert res["success"] == 0.0 and res["successes"] == 0 and res["episodes"] == 3
    lo, hi = res["ci95"]
    assert lo <= res["success"] <= hi and lo == 0.0 and 0 < hi < 1
    assert [e["length"] for e in res["per_episode"]] == [12, 12, 12]
    assert res["mean_length"] == 12.0
    json.dumps(res)  # JSON-able
    with pytest.raises(ValueError, match="episodes"):
        evaluate(policy, task_cfg(), EvalConfig(episodes=0), progress=False)


class TaskIdPolicy(ZeroPolicy):
    obs_horizon, action_horizon = 1, 2

    def predict_chunk(self, obs):
        assert obs["task_id"].dtype == torch.long and obs["task_id"].shape == obs["state"].shape[:1]
        assert (obs["task_id"] == 0).all()
        return super().predict_chunk(obs)


def test_runner_multitask_obs(tmp_path):
    cfg = EvalConfig(episodes=2, num_envs=2, max_episode_steps=4, latency_reps=1)
    res = evaluate(TaskIdPolicy(), task_cfg(num_tasks=2), cfg, progress=False)
    assert res["episodes"] == 2 and res["success"] == 0.0
    info = collect_demos(task_cfg(num_tasks=2), tmp_path / "mt.zarr", 1, seed=0, progress=False)
    assert info["obs_keys"] == ["state", "task_id"]
    ep = ReplayBuffer.open(tmp_path / "mt.zarr").get_episode(0)
    assert ep["task_id"].dtype == np.int64 and ep["task_id"].shape == ep["state"].shape[:1] and (ep["task_id"] == 0).all()


def test_wilson_interval():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == 1.0
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(3, 0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_runner_video(tmp_path):
    import imageio.v2 as imageio

    cfg = EvalConfig(episodes=1, num_envs=1, max_episode_steps=20, video=1, latency_reps=3)
    res = evaluate(ZeroPolicy(), task_cfg(), cfg, video_dir=tmp_path / "videos", progress=False)
    assert len(res["videos"]) == 1
    with imageio.get_reader(res["videos"][0]) as reader:
        frames = np.stack([frame for frame in reader])  # list(reader) trips on its len() of inf
    assert frames.ndim == 4 and frames.shape[0] == 21 and frames.shape[-1] == 3  # reset + 20 steps
    assert frames.std() > 5  # not a blank image


def test_render_frame():
    env = make_env(task_cfg(), seed=0, render=True, width=64, height=48)
    env.reset()
    frame = env.render()
    assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8 and frame.std() > 5


def test_envs_import_order_is_safe_under_osmesa():
    """mujoco under OSMesa, then diffusers (-> torch._dynamo -> triton): segfaulted before envs.gl imported triton first."""
    import subprocess
    import sys

    code = "import rtpolicy.envs, mujoco, diffusers; from rtpolicy.envs.gl import configure_gl; print(configure_gl())"
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "MUJOCO_GL": "osmesa"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("osmesa")  # a user's choice is kept
