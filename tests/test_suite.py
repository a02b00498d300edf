"""Multi-task suites (e.g. MT10): per-member task ids, suite demo stores, per-task evaluation (real Meta-World)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtpolicy.config import EvalConfig, TaskConfig
from rtpolicy.datasets.collect import collect_suite
from rtpolicy.datasets.replay_buffer import ReplayBuffer
from rtpolicy.envs import make_env, suite_members
from rtpolicy.envs.metaworld import expert_policy
from rtpolicy.evaluation import evaluate
from rtpolicy.policies.base import Policy

TASKS = ["reach-v3", "button-press-topdown-v3"]


def suite(**kw) -> TaskConfig:
    return TaskConfig(name="duo", tasks=list(TASKS), num_tasks=len(TASKS), max_episode_steps=150, **kw)


class TaskExpertPolicy(Policy):
    """Runs the scripted expert of the task named by obs["task_id"]: succeeds only if ids are routed right."""

    obs_horizon, action_horizon = 1, 1

    def __init__(self):
        super().__init__()
        self.experts = [expert_policy(t) for t in TASKS]
        self.seen: set[int] = set()

    def reset(self) -> None:
        pass

    def predict_chunk(self, obs):
        ids = obs["task_id"].tolist()
        self.seen.update(ids)
        acts = [self.experts[i](s[-1].numpy()) for i, s in zip(ids, obs["state"])]
        return torch.as_tensor(np.stack(acts))[:, None]

    def compute_loss(self, batch):
        raise NotImplementedError


def test_members_and_task_id_validation():
    members = suite_members(suite())
    assert [(m["name"], m["task_id"], m["num_tasks"]) for m in members] == [("reach-v3", 0, 2), ("button-press-topdown-v3", 1, 2)]
    assert suite_members(TaskConfig(name="reach-v3")) == []
    with pytest.raises(ValueError, match="num_tasks=3"):
        suite_members(TaskConfig(name="duo", tasks=list(TASKS), num_tasks=3))
    with pytest.raises(ValueError, match="twice"):
        suite_members(TaskConfig(name="duo", tasks=["reach-v3", "reach-v3"], num_tasks=2))
    env = make_env(members[1], seed=0)
    obs, _ = env.reset(seed=0)
    assert obs["task_id"] == 1 and env.observation_space["task_id"].n == 2
    with pytest.raises(ValueError, match="task_id"):
        make_env(members[1] | {"task_id": 2}, seed=0)


def test_collect_suite_store(tmp_path):
    path = tmp_path / "duo.zarr"
    info = collect_suite(suite(), path, episodes=2, seed=0, progress=False)
    assert info["tasks"] == TASKS and info["episodes"] == 4 and info["new_episodes"] == 4
    buf = ReplayBuffer.open(path)
    ids = [int(np.unique(buf.get_episode(i)["task_id"])[0]) for i in range(4)]
    assert ids == [0, 0, 1, 1]
    # the members' episodes are copied unchanged
    part = ReplayBuffer.open(tmp_path / "duo.zarr.parts" / "button-press-topdown-v3.zarr")
    np.testing.assert_array_equal(buf.get_episode(3)["action"], part.get_episode(1)["action"])
    assert not (tmp_path / ".duo.zarr.tmp").exists()
    again = collect_suite(suite(), path, episodes=2, seed=0, progress=False)
    assert again["new_episodes"] == 0
    with pytest.raises(ValueError, match="not a complete suite store"):
        collect_suite(suite(), path, episodes=3, seed=0, progress=False)


def test_evaluate_suite_routes_task_ids(tmp_path):
    policy = TaskExpertPolicy()
    cfg = EvalConfig(episodes=2, num_envs=2, seed=5, latency_reps=3, out=str(tmp_path / "res.json"))
    res = evaluate(policy, suite(), cfg, progress=False)
    assert set(res["per_task"]) == set(TASKS) and policy.seen == {0, 1}
    assert res["episodes"] == 4 and res["success"] == 1.0
    assert all(r["episodes"] == 2 and r["success"] == 1.0 for r in res["per_task"].values())
    assert {e["task"] for e in res["per_episode"]} == set(TASKS)
    assert (tmp_path / "res.json").exists()


class RecordingZeroPolicy(Policy):
    """Holds still (zero actions) and records the task ids it is asked about."""

    obs_horizon, action_horizon = 2, 4

    def __init__(self, action_dim: int):
        super().__init__()
        self.action_dim, self.seen, self.resets = action_dim, [], 0

    def reset(self) -> None:
        self.resets += 1

    def predict_chunk(self, obs):
        self.seen += obs["task_id"].tolist()
        return torch.zeros(obs["state"].shape[0], self.action_horizon, self.action_dim)

    def compute_loss(self, batch):
        raise NotImplementedError


def test_calvin_like_config_evaluates_chains(tmp_path):
    """task=calvin_like: the suite is evaluated on 5-chains with per-chain completed counts (the CALVIN metrics)."""
    from hydra import compose, initialize_config_dir

    from rtpolicy.config import register_configs
    from rtpolicy.envs.calvin_like import TASKS as CALVIN_TASKS

    register_configs()
    conf = str(__import__("rtpolicy.factory", fromlist=["CONF_DIR"]).CONF_DIR)
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("train", overrides=["task=calvin_like", "task.max_episode_steps=20"])
    assert list(cfg.task.tasks) == CALVIN_TASKS and cfg.task.chain_length == 5
    members = suite_members(cfg.task)
    assert [m["task_id"] for m in members] == list(range(len(CALVIN_TASKS)))
    policy = RecordingZeroPolicy(action_dim=5)
    with pytest.warns(UserWarning, match="subtask_steps"):  # 20 steps per subtask is too short for real chains
        make_env({"env": "calvin_like", "name": "chain5", "max_episode_steps": 100, "num_tasks": 27}).close()
    res = evaluate(policy, cfg.task, EvalConfig(episodes=3, num_envs=2, seed=11, latency_reps=2, out=str(tmp_path / "c.json")),
                   progress=False)
    assert res["chain_length"] == 5 and res["episodes"] == 3 and res["task"] == "calvin_like"
    completed = [e["completed"] for e in res["per_episode"]]
    assert all(0 <= c <= 5 for c in completed) and res["avg_chain_length"] == pytest.approx(np.mean(completed))
    assert res["chain_success"] == [float(np.mean([c >= k for c in completed])) for k in range(1, 6)]
    assert all(e["length"] <= 100 for e in res["per_episode"])  # 5 x 20 steps at most
    assert set(policy.seen) <= set(range(len(CALVIN_TASKS))) and policy.seen
    assert (tmp_path / "c.json").exists()
    with pytest.raises(ValueError, match="num_tasks must be 27"):
        make_env({"env": "calvin_like", "name": "open_drawer", "num_tasks": 3, "task_id": 0})
    with pytest.raises(ValueError, match="must have task_id 1"):
        make_env({"env": "calvin_like", "name": "close_drawer", "num_tasks": 27, "task_id": 0})
