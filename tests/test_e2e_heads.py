"""From where a user starts to where a user ends, for every registered head x denoiser: the Hydra config
``train.py`` composes -> a few training steps on a store ``collect`` wrote -> the checkpoint ``train``
saved -> ``eval.py`` -> export (safetensors and the ``torch.export`` program) -> ``load_bundle`` -> a
deploy node configures the bundle and drives the simulated robot over the real RMW. No hand-built config.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml

from rtpolicy.factory import compose
from rtpolicy.policies import load_all
from rtpolicy.policies.base import POLICIES
from rtpolicy.policies.denoisers.base import DENOISERS

rclpy = pytest.importorskip("rclpy")
from rclpy.context import Context  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from ros_helpers import CLI, REPO, Processes, new_domain  # noqa: E402
from rtpolicy.deploy.node import COMMAND_QOS  # noqa: E402

load_all()
TINY_DENOISER = {"unet1d": ["denoiser.down_dims=[16,32]"],
                 "transformer": ["denoiser.n_layer=1", "denoiser.n_head=2", "denoiser.n_emb=16"],
                 "mode": ["denoiser.n_layer=1", "denoiser.n_head=2", "denoiser.n_emb=16", "denoiser.expert_hidden=16"]}
TINY_HEAD = {"diffusion": ["policy.horizon=8", "policy.action_horizon=4", "policy.num_inference_steps=2"],
             "edm": ["policy.horizon=8", "policy.action_horizon=4", "policy.num_inference_steps=2"],
             "truncated": ["policy.horizon=8", "policy.action_horizon=4", "policy.num_anchors=4"],
             "streaming": ["policy.warmup_steps=2"]}
TRAIN = ["policy.cond_dim=16", "train.steps=2", "train.batch_size=8", "train.val_every=1000", "train.log_every=1",
         "train.ckpt_every=1000", "eval.episodes=0"]
DEPLOY_YAML = REPO / "rtpolicy" / "conf" / "deploy" / "metaworld.yaml"


def test_every_registered_head_and_denoiser_is_covered():
    assert set(TINY_HEAD) == set(POLICIES.names()) and set(TINY_DENOISER) == set(DENOISERS.names())


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two scripted reach demos, collected the way train.py collects them."""
    from rtpolicy.training import ensure_dataset

    path = tmp_path_factory.mktemp("data") / "reach.zarr"
    ensure_dataset(compose(["task=reach", f"task.dataset={path}", "task.collect=true", "task.demos=2"]).task)
    return path


def drive_sim_with_bundle(bundle, domain):
    """The deploy node (parameters from rtpolicy/conf/deploy/metaworld.yaml) and the sim robot, in one context on
    ``domain``: returns the sim's first episode result once the node has driven a whole episode."""
    from rtpolicy.deploy.node import PolicyNode
    from rtpolicy.deploy.sim_robot import SimRobotNode

    params = yaml.safe_load(DEPLOY_YAML.read_text())["rtpolicy"]["ros__parameters"]
    params |= {"bundle": str(bundle), "control_rate_hz": 20.0}
    context = Context()
    rclpy.init(context=context, domain_id=domain)
    executor = SingleThreadedExecutor(context=context)
    episodes, nodes, spinning = [], [], [True]
    try:
        listener = rclpy.create_node("listener", context=context)
        listener.create_subscription(String, "/rtpolicy/episode", lambda m: episodes.append(json.loads(m.data)), COMMAND_QOS)
        sim = SimRobotNode({"task": "reach-v3", "seed": 0, "max_episode_steps": 6, "step_on_command": True,
                            "control_rate_hz": 20.0}, context=context)
        node = PolicyNode(params, context=context)
        nodes += [listener, sim, node]
        for n in nodes:
            executor.add_node(n)
        thread = threading.Thread(target=lambda: [executor.spin_once(timeout_sec=0.05) for _ in iter(lambda: spinning[0], False)],
                                  daemon=True)
        thread.start()
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS, node.configure_error
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        end = time.monotonic() + 60
        while not episodes and time.monotonic() < end:
            time.sleep(0.05)
        stats = node.stats()
        node.trigger_deactivate()
        spinning[0] = False
        thread.join(5)
        assert episodes, f"the deployed policy never finished a sim episode: {stats}"
        assert stats["chunks"] >= 1 and stats["inference_errors"] == 0 and stats["invalid_observations"] == 0, stats
        return episodes[0]
    finally:
        spinning[0] = False
        executor.shutdown()
        for n in nodes[::-1]:
            n.destroy_node()
        rclpy.try_shutdown(context=context)


@pytest.mark.slow
@pytest.mark.parametrize("denoiser", sorted(TINY_DENOISER))
@pytest.mark.parametrize("head", sorted(TINY_HEAD))
def test_train_eval_export_deploy(store, tmp_path, head, denoiser):
    from rtpolicy.deploy.export import load_bundle, load_program, main as export_main
    from rtpolicy.training import train

    run = tmp_path / "run"
    cfg = compose(["task=reach", f"task.dataset={store}", f"policy={head}", f"denoiser={denoiser}",
                   *TINY_HEAD[head], *TINY_DENOISER[denoiser], *TRAIN, f"run_dir={run}"])
    ckpt = train(cfg)["checkpoint"]
    assert (run / "config.yaml").is_file()

    res = tmp_path / "eval.json"
    env = dict(os.environ, MUJOCO_GL="osmesa", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(REPO / "eval.py"), f"checkpoint={ckpt}", "eval.episodes=1", "eval.num_envs=1",
                           "eval.max_episode_steps=6", "eval.latency_reps=1", f"eval.out={res}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads(res.read_text())["episodes"] == 1

    out = export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "bundle"), "--program"])
    policy, bundle = load_bundle(out)
    assert bundle["policy"]["name"] == head and bundle["denoiser"]["name"] == denoiser
    program = load_program(out)  # the exported denoiser runs in the head in place of the eager one
    obs = {"state": torch.zeros(1, policy.obs_horizon, *bundle["shapes"]["state"])}
    torch.manual_seed(0)
    policy.reset()
    eager = policy.predict_chunk(obs)
    policy.denoiser = program
    torch.manual_seed(0)
    policy.reset()
    torch.testing.assert_close(policy.predict_chunk(obs), eager, rtol=0, atol=1e-4)
    assert oct((out / "policy.safetensors").stat().st_mode & 0o044) == oct(0o044 & ~_umask())  # readable as the umask allows

    result = drive_sim_with_bundle(out, new_domain())
    assert result["episode"] == 0 and 1 <= result["length"] <= 6


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.slow
def test_the_commands_train_py_prints_drive_the_sim(tmp_path):
    """``python train.py``, then the export, sim and deploy commands it prints, run as a user runs them."""
    procs = Processes(new_domain())
    env = procs.env(MUJOCO_GL="osmesa")
    data = tmp_path / "data" / "metaworld" / "reach-v3.zarr"  # the task's default path, relative to the run's cwd
    train_args = ["task=reach", "task.demos=2", *TINY_HEAD["diffusion"], *TINY_DENOISER["unet1d"], *TRAIN[:-1],
                  "eval.episodes=1", "eval.num_envs=1", "eval.max_episode_steps=4", "eval.latency_reps=1"]
    trained = subprocess.run([sys.executable, str(REPO / "train.py"), *train_args], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    assert data.is_dir()
    nxt = trained.stdout.split("next:\n", 1)[1].splitlines()
    export = next(ln for ln in nxt if "rtpolicy.deploy.export" in ln)
    sim = next(ln for ln in nxt if "rtpolicy sim" in ln)
    deploy = next(ln for ln in nxt if "rtpolicy deploy" in ln)
    exported = subprocess.run(shlex.split(export.strip().replace("python", sys.executable, 1)), cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]

    def cli(line, *extra):  # `rtpolicy X ...` from the printed line, run with this interpreter
        words = shlex.split(re.sub(r"\s*&?\s*(#.*)?$", "", line.strip()))
        assert words[0] == "rtpolicy"
        ros = words.index("--ros-args") if "--ros-args" in words else len(words)
        return [*CLI, *words[1:ros], *extra, *words[ros:]]

    try:
        sim_p = procs.start(cli(sim, "max_episode_steps=6", "control_rate_hz=20"), cwd=tmp_path)
        deploy_p = procs.start(cli(deploy, "control_rate_hz=20"), cwd=tmp_path)
        context = Context()
        rclpy.init(context=context, domain_id=procs.domain)
        episodes = []
        listener = rclpy.create_node("listener", context=context)
        listener.create_subscription(String, "/rtpolicy/episode", lambda m: episodes.append(json.loads(m.data)), COMMAND_QOS)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(listener)
        end = time.monotonic() + 120
        while not episodes and time.monotonic() < end and sim_p.poll() is None and deploy_p.poll() is None:
            executor.spin_once(timeout_sec=0.1)
        executor.shutdown()
        listener.destroy_node()
        rclpy.try_shutdown(context=context)
        t0 = time.monotonic()
        out = procs.stop(deploy_p, grace=30)
        assert episodes, f"no sim episode driven by the deployed policy:\n{out[-3000:]}\n{procs.stop(sim_p)[-2000:]}"
        assert deploy_p.returncode == 0 and time.monotonic() - t0 < 10, out[-2000:]
        assert "holding: shutting down" in out, out[-2000:]
    finally:
        procs.stop_all()
