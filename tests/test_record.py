"""``rtpolicy record`` on a real RMW: the simulated robot (``rtpolicy sim``, free-running) driven by the scripted
teleoperator (``rtpolicy teleop``, Meta-World's reach-v3 expert acting on the robot's topics), recorded by two
recorders at once: one into a zarr store and an MCAP bag, one into a sqlite3 bag. The store holds each command
with the observation it answered; both bags convert (``rtpolicy-convert``) and one trains.

Each process runs in its own process group on a ROS domain of its own (tests/ros_helpers.py) and is killed
in teardown."""

from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pytest

import rtpolicy.envs  # noqa: F401  first: it orders the GL/triton imports (rtpolicy.envs.gl)

pytest.importorskip("rclpy")
pytest.importorskip("rosbags")

from ros_helpers import CLI, Processes, new_domain

from rtpolicy.datasets.formats import read_dataset
from rtpolicy.datasets.replay_buffer import ReplayBuffer

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
    # the first resets the recorder hears (after discovery) open and end its episodes; the sim runs until stopped
    sim = procs.start([*CLI, "sim", "task=reach-v3", "seed=7", "step_on_command=false", "control_rate_hz=40.0"])
    try:
        rec_out = rec.communicate(timeout=90)[0]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the recorder did not end; its output:\n{procs.stop(rec)[-3000:]}\nthe sim's:\n{procs.stop(sim)[-2000:]}")
    assert rec.returncode == 0, rec_out[-3000:]
    # the other recorder heard the sim's resets on its own discovery schedule: one kept episode of its own
    # (an announced one it was not yet connected for is discarded), then the next one is open when it is stopped
    _wait_for(rec_sql, r"episode 0 recorded", timeout=60)
    sim_out = procs.stop(sim)
    sql_out = procs.stop(rec_sql)  # an episode is open (the sim's last reset started it): never ended, so never converted
    procs.stop(teleop)
    sim_eps = sim_episodes(sim_out)
    assert len(sim_eps) >= 3 and all(e["success"] for e in sim_eps), sim_out[-2000:]

    buf = ReplayBuffer.open(tmp_path / "demo.zarr")
    assert buf.n_episodes == 2 and buf.shape("state") == (39,) and buf.shape("action") == (4,)
    assert [e["length"] for e in buf.attrs["recorded_episodes"]] == list(buf.episode_lengths)
    expert = expert_policy("reach-v3")

    def paired(ep) -> float:
        """The fraction of rows (after the first, which may hold the command answering the reset's last state)
        whose command is the expert's answer to the row's state: 1.0 unless the free-running sim stepped before
        a late command came (a loaded machine), which makes the next state the latest one sent before it."""
        answered = np.stack([expert(s) for s in ep["state"][1:]])
        return float(np.mean(np.abs(answered - ep["action"][1:]).max(1) < 1e-5))

    for i, rec_ep in enumerate(buf.attrs["recorded_episodes"]):
        ep, sim_ep = buf.get_episode(i), min(sim_eps, key=lambda e: abs(e["time"] - rec_ep["end_time"]))  # the sim's one
        assert abs(sim_ep["time"] - rec_ep["end_time"]) < 0.5 * sim_ep["length"] / 40
        # one row per command: the sim's steps of that episode, give or take the commands around the reset; fewer
        # when a late command made the free-running sim step twice with the same one
        assert 0.8 * sim_ep["length"] <= len(ep["action"]) <= sim_ep["length"] + 1, (len(ep["action"]), sim_ep)
        assert paired(ep) >= 0.75, paired(ep)  # see the bags below
    # the MCAP bag, from the store's recorder: the same episodes, row for row but at the boundaries (converted with
    # tick_on, the rows' moments are the commands' as logged); the sqlite3 one, from the other recorder (its own
    # discovery and reset moments), stopped with an episode open: that one never ended and is not converted
    eps = list(read_dataset(tmp_path / "demo_mcap", **READ).episodes())
    assert len(eps) == 2 and all(abs(len(e["action"]) - n) <= 2 for e, n in zip(eps, buf.episode_lengths))
    assert (tmp_path / "demo_sqlite").exists(), sql_out[-3000:]
    sql_eps = list(read_dataset(tmp_path / "demo_sqlite", **READ).episodes())
    assert sql_eps and all(0.8 * 30 <= len(e["action"]) <= 120 for e in sql_eps), [len(e["action"]) for e in sql_eps]
    # a recorder pairing commands with the wrong observation scores near 0; a loaded machine (four processes on
    # two cores) measured 0.83 on one bag episode
    assert all(paired(e) >= 0.75 for e in eps + sql_eps), [paired(e) for e in eps + sql_eps]

    # the MCAP bag -> zarr with the convert CLI; the sqlite3 bag trains directly
    from rtpolicy.datasets.convert import main as convert_main

    assert convert_main([str(tmp_path / "demo_mcap"), str(tmp_path / "conv.zarr"), "--options", json.dumps(READ)]) in (0, None)
    assert ReplayBuffer.open(tmp_path / "conv.zarr").n_episodes == 2
    res = _train(tmp_path, ["task=reach", f"task.dataset={tmp_path}/demo_sqlite"], dataset_options=READ)
    assert res["step"] == 2


def sim_episodes(log: str) -> list[dict]:
    """The sim's episode results from its log, each with the time it was logged (s)."""
    out = []
    for t, m in re.findall(r"\[(\d+\.\d+)\] \[rtpolicy_sim\]: episode (\{.*\})", log):
        out.append({**json.loads(m.replace("'", '"').replace("True", "true").replace("False", "false")), "time": float(t)})
    return out


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
             ({"action_sources": "{"}, "action_sources: not valid JSON"),
             ({"bag": str(tmp_path)}, "already exists")]
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


def test_recorder_discards_an_announced_episode_it_was_not_connected_for(tmp_path):
    """A reset announces an episode before the recorder is connected to the robot's sources (discovery still
    going): that episode misses its start and is discarded, in the store and in the bag; the next one, heard
    from its reset on, is recorded whole."""
    import rclpy
    from geometry_msgs.msg import TwistStamped
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64MultiArray, String

    from rtpolicy.deploy.record import COMMAND_QOS, RecorderNode

    ctx = Context()
    rclpy.init(context=ctx, domain_id=new_domain())
    rec = RecorderNode({"observation_sources": json.dumps(OBS), "action_sources": json.dumps(ACT),
                        "message_types": json.dumps(TYPES), "sample_on": "action", "control_rate_hz": 40.0,
                        "output": str(tmp_path / "s.zarr"), "bag": str(tmp_path / "bag"), "bag_storage": "mcap"}, context=ctx)
    robot = rclpy.create_node("robot", context=ctx)
    executor = SingleThreadedExecutor(context=ctx)
    for node in (rec, robot):
        executor.add_node(node)

    def spin_until(cond, timeout=20.0):
        import time

        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, "timed out"
            executor.spin_once(timeout_sec=0.01)

    def spin_for(seconds):
        import time

        end = time.monotonic() + seconds
        while time.monotonic() < end:
            executor.spin_once(timeout_sec=0.005)

    def steps(n):
        """n control steps: the state, then the command answering it."""
        for i in range(n):
            js = JointState(name=["hand_x", "hand_y", "hand_z", "gripper_opening"], position=[0.01 * i, 0.0, 0.2, 1.0])
            pubs["js"].publish(js)
            pubs["obj"].publish(Float64MultiArray(data=[float(i)] * 35))
            spin_for(0.005)
            pubs["twist"].publish(TwistStamped())
            pubs["grip"].publish(Float64MultiArray(data=[float(i)]))
            spin_for(0.02)

    try:
        reset = robot.create_publisher(String, "/rtpolicy/reset", COMMAND_QOS)
        spin_until(lambda: reset.get_subscription_count() > 0)
        reset.publish(String(data="episode"))  # an episode starts; the robot's sources come up only now
        spin_until(lambda: rec.rows is not None)
        spin_for(0.3)
        pubs = {"js": robot.create_publisher(JointState, "/joint_states", qos_profile_sensor_data),
                "obj": robot.create_publisher(Float64MultiArray, "/object_state", qos_profile_sensor_data),
                "twist": robot.create_publisher(TwistStamped, "/rtpolicy/cmd_twist", COMMAND_QOS),
                "grip": robot.create_publisher(Float64MultiArray, "/rtpolicy/cmd_gripper", COMMAND_QOS)}
        spin_until(lambda: all(p.get_subscription_count() > 0 for p in pubs.values()))
        spin_for(0.2)
        steps(10)
        reset.publish(String(data="episode"))  # ends the first (discarded), starts the second
        spin_until(lambda: rec.discarded == 1)
        steps(12)
        reset.publish(String(data="episode"))
        spin_until(lambda: rec.written == 1)
    finally:
        executor.shutdown()
        rec.destroy_node()
        robot.destroy_node()
        rclpy.try_shutdown(context=ctx)
    buf = ReplayBuffer.open(tmp_path / "s.zarr")
    assert buf.n_episodes == 1 and 10 <= buf.episode_lengths[0] <= 12, buf.episode_lengths
    assert buf.get_episode(0)["action"][-1, 3] == 11.0  # the second episode's last command
    eps = list(read_dataset(tmp_path / "bag", **READ).episodes())
    assert len(eps) == 1 and abs(len(eps[0]["action"]) - buf.episode_lengths[0]) <= 1, [len(e["action"]) for e in eps]
