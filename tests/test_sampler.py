"""Windows over episodes: counts, edge padding inside each episode, episode splits, the torch Dataset."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from rtpolicy.datasets.replay_buffer import ReplayBuffer
from rtpolicy.datasets.sampler import SequenceDataset, SequenceSampler, split_episodes

LENGTHS = [5, 9, 3]


def rows_sampler(horizon, pad_before, pad_after, **kw):
    """Sampler whose data is the global row index, so windows show exactly which rows they read."""
    ends = np.cumsum(LENGTHS)
    data = {"row": np.arange(ends[-1]), "obs": np.arange(ends[-1])[:, None] * 10}
    return SequenceSampler(data, ends, horizon, pad_before, pad_after, **kw)


@pytest.mark.parametrize("horizon, pad_before, pad_after", [(4, 1, 2), (4, 0, 0), (6, 3, 0), (10, 0, 0), (2, 1, 1)])
def test_window_count(horizon, pad_before, pad_after):
    sampler = rows_sampler(horizon, pad_before, pad_after)
    assert len(sampler) == sum(max(n - horizon + pad_before + pad_after + 1, 0) for n in LENGTHS)


def test_edge_padding_repeats_the_episodes_own_first_and_last_step():
    sampler = rows_sampler(horizon=4, pad_before=1, pad_after=2)
    windows = [sampler.sample(i)["row"].tolist() for i in range(len(sampler))]
    # episode 0 is rows 0..4: starts -1 .. 5-4+2 = 3
    assert windows[:5] == [[0, 0, 1, 2], [0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 4], [3, 4, 4, 4]]
    # episode 1 is rows 5..13: first window repeats row 5, last repeats row 13
    assert windows[5] == [5, 5, 6, 7] and windows[5 + 9 - 4 + 3] == [12, 13, 13, 13]
    # episode 2 (rows 14..16) is shorter than the horizon: padded on both sides
    assert windows[-3:] == [[14, 14, 15, 16], [14, 15, 16, 16], [15, 16, 16, 16]]
    assert windows[-1] == sampler.sample(-1)["row"].tolist()
    with pytest.raises(IndexError, match="window 17 out of range for 17 windows"):
        sampler.sample(17)


def test_no_cross_episode_leakage():
    ends = np.cumsum(LENGTHS)
    values = np.repeat(np.arange(1, 4), LENGTHS).astype(np.float32)
    sampler = SequenceSampler({"x": np.stack([values, -values], 1)}, ends, horizon=8, pad_before=3, pad_after=3)
    assert len(sampler) > 0
    for i in range(len(sampler)):
        x = sampler.sample(i)["x"]
        assert x.shape == (8, 2) and np.all(x[:, 0] == x[0, 0]) and np.all(x[:, 1] == -x[0, 0])
    assert {float(sampler.sample(i)["x"][0, 0]) for i in range(len(sampler))} == {1.0, 2.0, 3.0}


def test_key_horizon_and_episode_mask():
    sampler = rows_sampler(horizon=4, pad_before=1, pad_after=2, key_horizon={"obs": 2}, episode_mask=[False, True, False])
    assert len(sampler) == 9 - 4 + 3 + 1
    w = sampler.sample(0)
    assert w["row"].tolist() == [5, 5, 6, 7] and w["obs"].tolist() == [[50], [50]]
    assert all(5 <= r <= 13 for i in range(len(sampler)) for r in sampler.sample(i)["row"])
    with pytest.raises(ValueError, match=r"episode_mask has shape \(2,\), expected \(3,\)"):
        rows_sampler(4, 0, 0, episode_mask=[True, False])
    with pytest.raises(ValueError, match=r"key_horizon\['obs'\]=5"):
        rows_sampler(4, 0, 0, key_horizon={"obs": 5})
    with pytest.raises(ValueError, match=r"data\['x'\] has 3 rows but episode_ends ends at 17"):
        SequenceSampler({"x": np.zeros(3)}, np.cumsum(LENGTHS), 2)


def test_split_episodes():
    train, val = split_episodes(20, 0.2, seed=3)
    assert train.dtype == bool and val.sum() == 4 and train.sum() == 16 and not np.any(train & val)
    again = split_episodes(20, 0.2, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert any(not np.array_equal(val, split_episodes(20, 0.2, seed=s)[1]) for s in range(4, 8))
    assert split_episodes(2, 0.01, seed=0)[1].sum() == 1  # at least one val episode
    assert split_episodes(3, 0.9, seed=0)[0].sum() == 1  # at least one train episode
    assert split_episodes(1, 0.5, seed=0)[1].sum() == 0
    assert split_episodes(5, 0.0, seed=0)[0].all()
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1.0"):
        split_episodes(5, 1.0, seed=0)
    with pytest.raises(ValueError, match="at least one episode"):
        split_episodes(0, 0.1, seed=0)


@pytest.fixture
def buffer(tmp_path):
    buf = ReplayBuffer.create(tmp_path / "ds.zarr")
    for task, n in enumerate(LENGTHS):
        steps = np.arange(n, dtype=np.float64)[:, None]
        buf.add_episode({
            "state": np.hstack([steps, np.full((n, 2), task)]),
            "image": np.full((n, 3, 2, 2), task, np.uint8),
            "action": np.hstack([steps, -steps]).astype(np.float32),
            "task_id": np.full(n, task, np.int64),
        })
    return buf


def test_dataset_items_and_dataloader(buffer):
    ds = SequenceDataset(buffer, ["state", "image"], "action", obs_horizon=2, horizon=4, action_horizon=2)
    assert len(ds) == sum(n - 4 + 1 + 1 + 1 for n in LENGTHS)
    item = ds[0]
    assert item["obs"]["state"].dtype == torch.float32 and item["obs"]["state"].shape == (2, 3)
    assert item["obs"]["state"][:, 0].tolist() == [0, 0] and item["action"][:, 0].tolist() == [0, 0, 1, 2]
    batch = next(iter(DataLoader(ds, batch_size=5, shuffle=False)))
    assert batch["obs"]["state"].shape == (5, 2, 3) and batch["obs"]["image"].shape == (5, 2, 3, 2, 2)
    assert batch["action"].shape == (5, 4, 2) and batch["action"].dtype == torch.float32
    assert batch["task_id"].dtype == torch.long and batch["task_id"].shape == (5,)
    for b in DataLoader(ds, batch_size=len(ds)):
        assert torch.equal(b["task_id"].float(), b["obs"]["state"][:, -1, 1])  # task id of each window's own episode


def test_dataset_episode_mask(buffer):
    mask = np.array([False, True, False])
    ds = SequenceDataset(buffer, ["state"], "action", obs_horizon=2, horizon=4, action_horizon=2, episode_mask=mask)
    assert len(ds) == 9 - 4 + 2 + 1 and {int(ds[i]["task_id"]) for i in range(len(ds))} == {1}


@pytest.mark.parametrize("head, current_steps", [("truncated", 6), ("streaming", 9)])
def test_heads_pad_after_the_episode_end(buffer, head, current_steps):
    """Chunked heads keep diffusion_policy's windows (the Ha executed actions are real); the streaming head,
    one action per tick, makes every step a current step once, so an episode's last steps are trained on."""
    from rtpolicy.factory import build_policy, denoiser_config, policy_config
    from rtpolicy.policies import load_all

    load_all()
    over = {"horizon": 8, "obs_horizon": 2, "action_horizon": 1 if head == "streaming" else 4, "cond_dim": 16}
    policy = build_policy(policy_config(head, over, {}), denoiser_config("unet1d", {"down_dims": [16, 32]}, {}),
                          {"state": [3], "action": [2]})
    ds = SequenceDataset(buffer, ["state"], "action", policy.obs_horizon, policy.data_horizon, policy.action_horizon,
                         episode_mask=np.array([False, True, False]), pad_after=policy.pad_after)
    now = [int(ds[i]["obs"]["state"][-1, 0]) for i in range(len(ds))]  # the current step of each window
    assert now == list(range(current_steps))  # truncated: the last 3 steps never are (9 - 8 + 1 + 3 + 1 windows)
    last = ds[len(ds) - 1]["action"][:, 0]  # its actions, steps t-1 .. : real ones, then the last repeated
    assert last[-1] == 8 and (last[-policy.pad_after - 1:] == 8).all()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(obs_keys=["pose"]), r"keys \['pose'\] are not in the replay buffer; available keys: \['action', 'image', 'state', 'task_id'\]"),
        (dict(action_key="act"), r"keys \['act'\] are not in the replay buffer"),
        (dict(horizon=1), r"need 1 <= obs_horizon <= horizon, got obs_horizon=2 horizon=1"),
        (dict(action_horizon=4), r"action_horizon must be in \[1, horizon - obs_horizon \+ 1\] = \[1, 3\], got 4"),
        (dict(action_key="image"), r"action key 'image' has feature shape \(3, 2, 2\), expected \(Da,\)"),
        (dict(horizon=16, action_horizon=1), r"no training windows: 3 selected episodes, the longest 9 steps, for horizon=16"),
        (dict(episode_mask=np.zeros(3, bool)), r"no training windows: 0 selected episodes"),
    ],
    ids=["obs_key", "action_key", "horizon", "action_horizon", "action_shape", "too_short", "empty_mask"],
)
def test_dataset_validation(buffer, kw, match):
    args = dict(obs_keys=["state"], action_key="action", obs_horizon=2, horizon=4, action_horizon=2) | kw
    with pytest.raises(ValueError, match=match):
        SequenceDataset(buffer, **args)
