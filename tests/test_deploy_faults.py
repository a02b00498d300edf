"""The policy node under the faults of issue 17, over the real RMW, on the rig of test_deploy_node.py.

Each test names the item it covers; every wait is a bound on an event, every count an upper or lower
bound that holds however slowly the machine runs.
"""

import json
import os
import signal
import time

import pytest

rclpy = pytest.importorskip("rclpy")
from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.qos import QoSDurabilityPolicy, QoSProfile, QoSReliabilityPolicy, qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import Bool, String  # noqa: E402

from rtpolicy.deploy.sim_robot import JOINT_NAMES  # noqa: E402
from test_deploy_node import (CLI, MW_SOURCES, RATE, bundle, holds_after, moving, rig, runs_policy, stamp_s, start,  # noqa: E402,F401
                              wait_for)


LATCHED = QoSProfile(depth=1, reliability=QoSReliabilityPolicy.RELIABLE, durability=QoSDurabilityPolicy.TRANSIENT_LOCAL)


def twists_between(rig, t0, t1):
    return [m for m in rig.got("twist", t0) if t0 < stamp_s(m) <= t1]


def deliver(rig, node, pub, msg, counter):
    """Publish and wait until the node took it (a reliable queue of 10 may drop a burst's oldest)."""
    n = node.stats()[counter]
    rig.send(pub, msg)
    assert wait_for(lambda: node.stats()[counter] > n), f"{counter} stayed at {n}"


def ticks_pass(node, n):
    ticks = node.stats()["ticks"]
    assert wait_for(lambda: node.stats()["ticks"] >= ticks + n), node.stats()


# ------------------------------------------------------------------------------------- 1: the e-stop is kept
def test_estop_latched_before_the_node_starts_is_seen_and_holds_from_the_first_command(rig, bundle):
    latched = rig.node.create_publisher(Bool, "/rtpolicy/estop", LATCHED)
    latched.publish(Bool(data=True))  # pressed (and latched) before the policy node exists
    rig.sensors()
    node = rig.policy(bundle)
    assert wait_for(lambda: node.estop_latch.latched), "the latched e-stop never reached the new node"
    start(node)
    ticks_pass(node, 10)
    st = node.stats()
    assert st["estopped"] and st["safety_estop"] >= 10 and st["submitted"] == 0
    assert rig.got("twist") and not any(moving(m) for m in rig.got("twist"))
    rig.send(rig.reset, String(data="reset_estop"))
    assert runs_policy(rig, time.time())


def test_estop_survives_deactivate_cleanup_configure_activate(rig, bundle):
    rig.sensors()
    node = start(rig.policy(bundle))
    assert runs_policy(rig, 0.0)
    rig.send(rig.estop, Bool(data=True))
    assert wait_for(lambda: node.stats()["estopped"])
    for trigger in (node.trigger_deactivate, node.trigger_cleanup):
        assert trigger() == TransitionCallbackReturn.SUCCESS
    mark = time.time()
    start(node)  # a new SafetyLayer, the same latch
    ticks_pass(node, 10)
    assert node.stats()["estopped"] and node.stats()["safety_estop"] >= 10
    assert not any(moving(m) for m in rig.got("twist", mark))


def test_estop_state_file_latches_a_restarted_node_until_reset(rig, bundle, tmp_path):
    state = tmp_path / "estop.json"
    rig.sensors()
    first = start(rig.policy(bundle, estop_state_file=str(state)))
    rig.send(rig.estop, Bool(data=True))
    assert wait_for(lambda: first.stats()["estopped"])
    assert json.loads(state.read_text())["estopped"] is True
    first.trigger_deactivate()
    rig.nodes.remove(first)
    rig.executor.remove_node(first)
    first.destroy_node()  # the process ends
    mark = time.time()
    second = start(rig.policy(bundle, estop_state_file=str(state)))  # a new process on the same file
    assert second.stats()["estopped"]
    ticks_pass(second, 10)
    assert not any(moving(m) for m in rig.got("twist", mark))
    rig.send(rig.reset, String(data="reset_estop"))
    assert runs_policy(rig, time.time())
    assert json.loads(state.read_text())["estopped"] is False
    state.write_text("{not json")  # a damaged file latches, to be safe
    assert second.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
    assert second.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
    start(second)
    assert second.stats()["estopped"] and "unreadable" in second.estop_latch.reason


# ------------------------------------------------------------------------------------- 2 and 6: observation faults
def test_each_observation_fault_holds_with_its_own_kind_and_no_inference_error(rig, bundle):
    sensors = rig.sensors()
    node = start(rig.policy(bundle, obs_range_margin=0.5))
    assert runs_policy(rig, 0.0)
    faults = {  # hold kind -> the faulty driver
        "obs_non_finite": lambda n, p, o: (n, p, o[:6] + [1e39] + o[7:]),  # finite in float64, inf as float32
        "obs_out_of_range": lambda n, p, o: (n, p, o[:6] + [50.0] + o[7:]),  # far outside the training data
        "obs_duplicate_joint": lambda n, p, o: (n + ["hand_x"], p + [0.0], o),
        "obs_wrong_length": lambda n, p, o: (n, p, o[:-1]),
    }
    for kind, mangle in faults.items():
        sensors.mangle = mangle
        _, held = holds_after(rig, f"safety_{kind}", node)
        assert not any(moving(m) for m in held)
        assert node.stats()["observation"].startswith(f"{kind}: "), (kind, node.stats()["observation"])
        sensors.mangle = None
        assert runs_policy(rig, time.time())
    st = node.stats()
    assert st["inference_errors"] == 0 and st["safety_stale_obs"] == 0 and st["safety_non_finite"] == 0


# ------------------------------------------------------------------------------------- 4: no inference while holding
def test_no_inference_is_submitted_while_the_observation_is_stale(rig, bundle):
    sensors = rig.sensors()
    node = start(rig.policy(bundle, stale_obs_s=0.3))
    assert runs_policy(rig, 0.0)
    sensors.publishing = False
    holds_after(rig, "safety_stale_obs", node)
    submitted = node.stats()["submitted"]
    ticks_pass(node, 15)
    assert node.stats()["submitted"] == submitted and node.stats()["observation"].startswith("stale_obs")
    sensors.publishing = True
    assert runs_policy(rig, time.time())
    assert node.stats()["submitted"] > submitted


# ------------------------------------------------------------------------------------- 5 and 7: operator topics
def test_operator_warnings_are_throttled_and_echoes_cut(rig, bundle, capfd):
    rig.sensors()
    node = start(rig.policy(bundle))
    instruction = rig.node.create_publisher(String, "/rtpolicy/instruction", 10)
    huge = "x" * (256 * 1024)
    for _ in range(30):
        deliver(rig, node, rig.estop, Bool(data=False), "estop_msgs")
    for _ in range(3):
        deliver(rig, node, rig.reset, String(data=huge + "r"), "reset_msgs")
        deliver(rig, node, instruction, String(data=huge + "i"), "instruction_msgs")
    err = capfd.readouterr().err
    lines = err.splitlines()
    assert 1 <= sum("does not clear the e-stop" in line for line in lines) <= 3, err[-3000:]
    assert 1 <= sum("unknown request" in line for line in lines) <= 2
    assert 1 <= sum("is single-task and not language-conditioned" in line for line in lines) <= 2
    assert max(map(len, lines)) < 1000 and f"({len(huge) + 1} chars)" in err


def test_repeated_estops_publish_commands_only_on_the_tick(rig, bundle):
    rig.sensors()
    node = start(rig.policy(bundle))
    assert runs_policy(rig, 0.0)
    st0, t0 = node.stats(), time.time()
    for _ in range(40):
        deliver(rig, node, rig.estop, Bool(data=True), "estop_msgs")
    ticks_pass(node, 2)
    st1, t1 = node.stats(), time.time()
    assert st1["commands_published"] - st0["commands_published"] == st1["ticks"] - st0["ticks"]
    assert wait_for(lambda: len(rig.got("twist", t1)) >= 1)  # what was published by t1 has arrived
    assert len(twists_between(rig, t0, t1)) <= st1["ticks"] - st0["ticks"] + 1


# ------------------------------------------------------------------------------------- 3: a sensor flood
def test_sensor_flood_work_is_bounded_and_the_loop_keeps_driving(rig, bundle):
    sensors = rig.sensors()
    node = start(rig.policy(bundle, sensor_poll_hz=40.0))
    assert runs_policy(rig, 0.0)
    flood = rig.node.create_publisher(JointState, "/joint_states", qos_profile_sensor_data)
    msg = JointState(name=list(JOINT_NAMES), position=[float(x) for x in sensors.state[:4]])
    taken0, ticks0, t0 = node.sensor_msgs, node.stats()["ticks"], time.monotonic()
    sent, mark = 0, time.time()
    while time.monotonic() - t0 < 2.0:  # up to 2 kHz for 2 s, on top of the 50 Hz sensors
        for _ in range(20):
            flood.publish(msg)
        sent += 20
        time.sleep(0.01)
    elapsed = time.monotonic() - t0
    taken = node.sensor_msgs - taken0
    # at most one message per topic (2) per poll period, however many arrive
    assert taken <= 2 * (40.0 * elapsed + 2), (taken, sent, elapsed)
    assert node.stats()["ticks"] > ticks0 and runs_policy(rig, mark)


# ------------------------------------------------------------------------------------- 9: header stamps
def test_stale_by_stamp_holds_on_old_or_future_header_stamps(rig, bundle):
    sensors = rig.sensors()
    sensors.stamp_offset = 0.0
    node = start(rig.policy(bundle, stale_by="stamp", stale_obs_s=0.5, max_clock_skew_s=0.5))
    assert runs_policy(rig, 0.0)
    sensors.stamp_offset = -10.0  # a 10 s old JointState, arriving on time
    _, held = holds_after(rig, "safety_stale_obs", node)
    assert not any(moving(m) for m in held) and "10." in node.stats()["observation"]
    sensors.stamp_offset = 5.0  # from 5 s in the future: the clocks disagree
    _, held = holds_after(rig, "safety_obs_bad_stamp", node)
    assert not any(moving(m) for m in held)
    sensors.stamp_offset = 0.0
    assert runs_policy(rig, time.time())


# ------------------------------------------------------------------------------------- 8: two SIGINTs
def test_two_sigints_50_ms_apart_exit_0_after_the_hold(rig, bundle):
    rig.sensors()
    proc = rig.procs.start([*CLI, "deploy", f"bundle={bundle}", f"observation_sources={json.dumps(MW_SOURCES)}",
                            f"control_rate_hz={RATE}", "diagnostics_rate_hz=5"])
    assert wait_for(lambda: runs_policy(rig, 0.0), timeout=60), "the deployed node never drove"
    mark = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out = rig.procs.stop(proc, grace=30)
    assert proc.returncode == 0, (proc.returncode, out[-3000:])
    assert "holding: shutting down" in out, out[-3000:]
    assert wait_for(lambda: any(not moving(m) for m in rig.got("twist", mark)), 5.0)


# ------------------------------------------------------------------------------------- 5: a policy failing every tick
def test_a_policy_failing_every_call_logs_one_traceback_not_one_per_call():
    import logging

    from rtpolicy.deploy.scheduler import ActionScheduler, InferenceWorker

    def predict(obs):
        raise RuntimeError("inf in the input")

    records = []  # its own handler: the node tests run with -p no:logging (no caplog)
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    logger = logging.getLogger("rtpolicy.deploy")
    logger.addHandler(handler)
    try:
        with InferenceWorker(predict, ActionScheduler(2), step_fn=lambda: 0, warmup=0, error_log_s=3600) as w:
            for step in range(20):
                w.submit("obs", obs_step=step)
                assert w.wait_idle(10)
    finally:
        logger.removeHandler(handler)
    assert w.errors == 20
    failures = [r for r in records if "fail" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info


def test_worker_reports_each_latency_once_for_window_percentiles():
    """benchmarks/control_loop.py takes every inference latency of a window from diagnostics' inference_ms_recent."""
    import numpy as np

    from rtpolicy.deploy.scheduler import ActionScheduler, InferenceWorker

    with InferenceWorker(lambda obs: np.ones((2, 2)), ActionScheduler(2), step_fn=lambda: 0, warmup=0, max_latency_samples=3) as w:
        for step in range(5):
            w.submit("obs", obs_step=0)
            assert w.wait_idle(10)
        count, new = w.latency_since(0)
        assert count == 5 and len(new) == 3  # only the kept ones
        assert w.latency_since(count) == (5, [])
        w.submit("obs", obs_step=0)
        assert w.wait_idle(10)
        assert len(w.latency_since(count)[1]) == 1 and len(w.latency_since(0, limit=2)[1]) == 2
