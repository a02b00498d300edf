"""``rtpolicy record`` on a real RMW: the simulated robot (``rtpolicy sim``, free-running) driven by the scripted
teleoperator (``rtpolicy teleop``, Meta-World's reach-v3 expert acting on the robot's topics), recorded by two
recorders at once: one into a zarr store and an MCAP bag, one into a sqlite3 bag. The store holds each command
with the observation it answered; both bags convert (``rtpolicy-convert``) and one trains.

Each process runs in its own process group on a ROS domain of its own (tests/ros_helpers.py) and is killed
in teardown."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import rtpolicy.envs  # noqa: E402,F401  first: it orders the GL/triton imports (rtpolicy.envs.gl)

pytest.importorskip("rclpy")
pytest.importorskip("rosbags")

from ros_helpers import CLI, Processes, new_domain  # noqa: E402

from rtpolicy.datasets.formats import read_dataset  # noqa: E402
from rtpolicy.datasets.replay_buffer import ReplayBuffer  # noqa: E402

OBS = {"state": [{"joint_state": {"topic": "/joint_states", "names": ["hand_x", "hand_y", "hand_z", "gripper_opening"]}},
                 {"array": {"topic": "/object_state", "size": 35}}]}
ACT = {"action": [{"array": {"topic": "/rtpolicy/cmd_twist", "size": 3}}, {"array": {"topic": "/rtpolicy/cmd_gripper", "size": 1}}]}
TYPES = {"/rtpolicy/cmd_twist": "geometry_msgs/msg/TwistStamped"}
EPISODE_TOPIC = "/rtpolicy/record/episode"
READ = {"sources": {**OBS, **ACT}, "rate": 40, "split": "topic", "episode_topic": EPISODE_TOPIC,
        "tick_on": ["/rtpolicy/cmd_twist", "/rtpolicy/cmd_gripper"]}


@pytest.fixture
def procs():
    p = Processes(new_domain())
    yield p
    p.stop_all()


def _record_args(**kw) -> list[str]:
    args = {"observation_sources": json.dumps(OBS), "action_sources": json.dumps(ACT), "message_types": json.dumps(TYPES),
            "sample_on": "action", "control_rate_hz": "40.0", **kw}
    return [*CLI, "record", *(f"{k}={v}" for k, v in args.items())]


def _wait_for(proc, pattern: str, timeout: float = 60.0) -> None:
    """Read ``proc``'s output until a line matches (the node is up)."""
    import select
    import time

    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            line = proc.stdout.readline()
            seen.append(line)
            if re.search(pattern, line):
                return
            if not line and proc.poll() is not None:
                break
    raise AssertionError(f"no line matching {pattern!r}; output:\n{''.join(seen)[-3000:]}")


def test_record_sim_driven_by_teleop_into_zarr_and_bags_that_convert_and_train(tmp_path, procs):
    from rtpolicy.envs.metaworld import expert_policy

    rec = procs.start(_record_args(output=tmp_path / "demo.zarr", bag=tmp_path / "demo_mcap", bag_storage="mcap", max_episodes=2))
    rec_sql = procs.start(_record_args(bag=tmp_path / "demo_sqlite", bag_storage="sqlite3"))  # stopped by SIGINT mid-episode
    teleop = procs.start([*CLI, "teleop", "task=reach-v3"])
    for p in (rec, rec_sql, teleop):
        _wait_for(p, r"expert on" if p is teleop else r"recording \[")
    # episode 0 warms up (discovery); the reset after it opens the first recorded episode
    sim = procs.start([*CLI, "sim", "task=reach-v3", "seed=7", "step_on_command=false", "control_rate_hz=40.0", "max_episodes=3"])
    rec_out = rec.communicate(timeout=120)[0]
    assert rec.returncode == 0, rec_out[-3000:]
    sim_out = procs.stop(sim)
    sql_out = procs.stop(rec_sql)  # an episode is open (the sim's last reset started it): never ended, so never converted
    procs.stop(teleop)
    sim_eps = [json.loads(m.replace("'", '"').replace("True", "true").replace("False", "false"))
               for m in re.findall(r"episode (\{.*\})", sim_out)]
    assert [e["episode"] for e in sim_eps[:3]] == [0, 1, 2] and all(e["success"] for e in sim_eps), sim_out[-2000:]

    buf = ReplayBuffer.open(tmp_path / "demo.zarr")
    assert buf.n_episodes == 2 and buf.shape("state") == (39,) and buf.shape("action") == (4,)
    expert = expert_policy("reach-v3")
    for i, sim_ep in enumerate(sim_eps[1:3]):
        ep = buf.get_episode(i)
        # one row per control step: the sim's steps of that episode, give or take the command answering the reset
        # state (it may race the reset message) and the one answering the terminal state (before or after the reset)
        assert sim_ep["length"] - 2 <= len(ep["action"]) <= sim_ep["length"] + 1, (len(ep["action"]), sim_ep)
        answered = np.stack([expert(s) for s in ep["state"]])
        np.testing.assert_allclose(ep["action"][1:], answered[1:], atol=1e-6)  # each command with the state it answered
    assert [e["length"] for e in buf.attrs["recorded_episodes"]] == list(buf.episode_lengths)

    # the zarr store's recorder also wrote the MCAP bag: converted the same way, the same rows
    eps = list(read_dataset(tmp_path / "demo_mcap", **READ).episodes())
    assert [len(e["action"]) for e in eps] == list(buf.episode_lengths)
    for i, e in enumerate(eps):
        np.testing.assert_allclose(e["state"][1:], buf.get_episode(i)["state"][1:])
        np.testing.assert_allclose(e["action"], buf.get_episode(i)["action"])
    # the other recorder saw the resets at its own moments (a row more or less at a boundary) and was stopped
    # with an episode open: that one was never ended, so it is not converted
    assert (tmp_path / "demo_sqlite").exists(), sql_out[-3000:]
    eps = list(read_dataset(tmp_path / "demo_sqlite", **READ).episodes())
    assert len(eps) == 2 and all(abs(len(e["action"]) - n) <= 2 for e, n in zip(eps, buf.episode_lengths))
    for e in eps:
        np.testing.assert_allclose(e["action"][1:], np.stack([expert(s) for s in e["state"][1:]]), atol=1e-6)

    # the MCAP bag -> zarr with the convert CLI; the sqlite3 bag trains directly
    from rtpolicy.datasets.convert import main as convert_main

    assert convert_main([str(tmp_path / "demo_mcap"), str(tmp_path / "conv.zarr"), "--options", json.dumps(READ)]) in (0, None)
    assert ReplayBuffer.open(tmp_path / "conv.zarr").n_episodes == 2
    res = _train(tmp_path, ["task=reach", f"task.dataset={tmp_path}/demo_sqlite"], dataset_options=READ)
    assert res["step"] == 2


def _train(tmp_path, overrides, dataset_options):
    from hydra import compose, initialize_config_dir

    from rtpolicy.config import register_configs
    from rtpolicy.factory import CONF_DIR
    from rtpolicy.training import train

    register_configs()
    tiny = ["denoiser.down_dims=[16,32]", "policy.cond_dim=16", "train.batch_size=8", "train.steps=2", "train.threads=1",
            "train.val_every=1000", "train.log_every=1", "train.ckpt_every=1000", "eval.episodes=0", f"run_dir={tmp_path}/run",
            f"task.dataset_cache={tmp_path}/cache"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=[*overrides, *tiny])
    cfg.task.dataset_options = dataset_options
    return train(cfg)


def test_recorder_refuses_bad_parameters(tmp_path):
    import rclpy
    from rclpy.context import Context

    from rtpolicy.deploy.record import RecorderNode

    ctx = Context()
    rclpy.init(context=ctx, domain_id=new_domain())
    base = {"observation_sources": json.dumps(OBS), "action_sources": json.dumps(ACT), "output": str(tmp_path / "s.zarr")}
    cases = [({"output": ""}, "nowhere to record"),
             ({"action_sources": json.dumps(OBS)}, r"keys \['state'\] are in both"),
             ({"message_types": json.dumps({"/joint_states": "std_msgs/msg/Float64"})}, "no array source"),
             ({"message_types": json.dumps({"/rtpolicy/cmd_twist": "geometry_msgs/msg/Nope"})}, "Nope.*not importable"),
             ({"sample_on": "tick"}, "sample_on must be one of"),
             ({"bag": str(tmp_path / "b"), "bag_storage": "zip"}, "bag_storage must be one of"),
             ({"action_sources": "{"}, "action_sources: not valid JSON")]
    try:
        for bad, msg in cases:
            with pytest.raises(ValueError, match=msg):
                RecorderNode({**base, **bad}, context=ctx).destroy_node()
        # a store holding other keys is refused before anything is recorded into it
        ReplayBuffer.create(tmp_path / "other.zarr").add_episode({"x": np.zeros((3, 2), np.float32)})
        with pytest.raises(ValueError, match=r"other.zarr holds keys \['x'\]"):
            RecorderNode({**base, "output": str(tmp_path / "other.zarr")}, context=ctx).destroy_node()
    finally:
        rclpy.try_shutdown(context=ctx)
