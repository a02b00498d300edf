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
from rtpolicy.envs.runner import evaluate
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
