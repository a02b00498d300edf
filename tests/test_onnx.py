"""The ONNX Runtime backend: for every head and denoiser, ORT's actions equal the eager head's for the same
noise; bundles with and without ONNX graphs load; the ORT policy runs in the simulator runner."""

import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from rtpolicy import checkpoint as ck  # noqa: E402
from rtpolicy.deploy.export import BundleError, export_bundle, load_bundle, read_bundle  # noqa: E402
from rtpolicy.deploy.onnx import PARITY_ATOL, NoiseFeed, OrtPolicy, example_obs  # noqa: E402
from rtpolicy.factory import build_policy, denoiser_config, policy_config  # noqa: E402

SHAPES = {"state": [39], "action": [4]}
DENOISERS = {"unet1d": {"down_dims": [16, 32]}, "transformer": {"n_layer": 1, "n_head": 2, "n_emb": 16},
             "mode": {"n_layer": 1, "n_head": 2, "n_emb": 16, "expert_hidden": 16}}
HEADS = [("diffusion", {"sampler": "ddim", "num_inference_steps": 3}), ("diffusion", {"sampler": "ddpm", "num_inference_steps": 3}),
         ("edm", {"sampler": "heun", "num_inference_steps": 2}), ("truncated", {"num_anchors": 4, "mode_select": "sample"}),
         ("truncated", {"num_anchors": 4, "num_inference_steps": 2}), ("streaming", {"warmup_steps": 2})]


def trained_like(head, over, den, num_tasks=0):
    """A tiny policy with fitted stats and perturbed weights (zero-initialized output layers would make
    every output equal and parity trivial)."""
    horizons = {"horizon": 8, "action_horizon": 1 if head == "streaming" else 4}
    pol = policy_config(head, {"cond_dim": 16, **horizons}, over)
    dcfg = denoiser_config(den, DENOISERS[den])
    torch.manual_seed(0)
    policy = build_policy(pol, dcfg, SHAPES, num_tasks)
    policy.stored_denoiser = OmegaConf.to_container(dcfg, enum_to_str=True)
    policy.normalizer.fit({"state": torch.randn(64, 39), "action": torch.rand(64, 4) * 2 - 1})
    policy.prepare(torch.rand(32, policy.data_horizon, 4) * 2 - 1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return policy.eval()


def bundle_of(policy, tmp_path, onnx=True):
    cfg = {"policy": OmegaConf.to_container(policy.cfg, enum_to_str=True), "denoiser": policy.stored_denoiser,
           "task": {"env": "metaworld", "name": "reach-v3", "tasks": []}}
    ckpt = ck.save_checkpoint(tmp_path / "run" / "last.safetensors", ema=policy, step=1, config=cfg, shapes=SHAPES,
                              num_tasks=policy.num_tasks)
    return export_bundle(ckpt, tmp_path / "bundle", onnx=onnx)


@pytest.mark.parametrize("den", sorted(DENOISERS))
@pytest.mark.parametrize("head, over", HEADS, ids=[f"{h}-{'-'.join(map(str, o.values()))}" for h, o in HEADS])
def test_ort_equals_eager_for_the_same_noise(tmp_path, head, over, den):
    policy = trained_like(head, over, den)
    out = bundle_of(policy, tmp_path)
    bundle = read_bundle(out)
    for graph in bundle["onnx"].values():
        assert graph["parity_max_abs"] <= PARITY_ATOL  # checked at export on random observations and noise
    ort_policy, _ = load_bundle(out, backend="ort")
    eager, _ = load_bundle(out)
    # two consecutive calls (a streaming head carries its buffer): the same noise -> the same actions
    obs = [{"state": torch.randn(1, eager.obs_horizon, 39)} for _ in range(2)]
    feed = NoiseFeed()
    with torch.no_grad(), eager.noise_feed(feed):
        eager.reset()
        want = [eager.predict_chunk(o) for o in obs]
    ort_policy.reset()
    with ort_policy.noise_feed(NoiseFeed(feed.drawn)):  # ORT gets the eager head's noise, in its draw order
        got = [ort_policy.predict_chunk(o) for o in obs]
    for g, w in zip(got, want):
        assert (g - w).abs().max().item() <= PARITY_ATOL, (g, w)


def test_bundle_without_onnx_loads_and_names_the_flag_for_ort(tmp_path):
    policy = trained_like("truncated", {"num_anchors": 4}, "unet1d")
    out = bundle_of(policy, tmp_path, onnx=False)
    assert "onnx" not in read_bundle(out) and not (out / "policy.onnx").exists()
    load_bundle(out)  # torch backend: fine
    with pytest.raises(BundleError, match="--onnx"):
        load_bundle(out, backend="ort")


def test_tampered_graph_is_refused(tmp_path):
    out = bundle_of(trained_like("truncated", {"num_anchors": 4}, "unet1d"), tmp_path)
    (out / "policy.onnx").write_bytes((out / "policy.onnx").read_bytes()[:-10])
    with pytest.raises(BundleError, match="SHA-256"):
        load_bundle(out, backend="ort")


def test_multi_task_policy_takes_its_task_id(tmp_path):
    policy = trained_like("truncated", {"num_anchors": 4}, "unet1d", num_tasks=3)
    ort = OrtPolicy.from_policy(policy, tmp_path / "g")
    obs = example_obs(policy) | {"state": torch.randn(1, 2, 39)}
    feed = NoiseFeed()
    with torch.no_grad(), policy.noise_feed(feed):  # one noise draw, used for every task below
        policy.predict_chunk(obs | {"task_id": torch.tensor([0])})
    got, want = {}, {}
    for t in range(3):  # the same noise for every task: only the task id differs
        with torch.no_grad(), policy.noise_feed(NoiseFeed(feed.drawn)):
            want[t] = policy.predict_chunk(obs | {"task_id": torch.tensor([t])})
        with ort.noise_feed(NoiseFeed(feed.drawn)):
            got[t] = ort.predict_chunk(obs | {"task_id": torch.tensor([t])})
        assert (got[t] - want[t]).abs().max() <= PARITY_ATOL
    assert not torch.allclose(got[0], got[1], atol=1e-3) or not torch.allclose(got[0], got[2], atol=1e-3)


@pytest.mark.slow
def test_ort_policy_runs_in_the_simulator_runner(tmp_path):
    from omegaconf import OmegaConf

    from rtpolicy.config import EvalConfig
    from rtpolicy.evaluation import evaluate
    from rtpolicy.factory import compose

    policy = trained_like("truncated", {"num_anchors": 4}, "unet1d")
    ort = OrtPolicy.from_policy(policy, tmp_path / "g")
    task = compose(["task=reach"]).task
    cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), {"episodes": 2, "num_envs": 2, "max_episode_steps": 8,
                                                             "latency_reps": 2})
    res = evaluate(ort, task, cfg, progress=False)
    assert res["episodes"] == 2 and res["chunk_ms_p50"] > 0


@pytest.mark.parametrize("backbone, size", [("small_cnn", 84), ("resnet18", 64)])
def test_camera_policy_ort_equals_eager(tmp_path, backbone, size):
    """Camera policies (proprio + two cameras, centre crop 0.9): the crop, the CNN, the keypoints and the head
    in one graph; the export leaves the policy in eval mode (a train-mode policy random-crops)."""
    shapes = {"proprio": [4], "rgb_a": [size, size, 3], "rgb_b": [size, size, 3], "action": [4]}
    cfg = policy_config("truncated", {"obs_horizon": 1, "cond_dim": 16, "horizon": 8, "action_horizon": 4,
                                      "num_anchors": 4, "encoder": {"image_backbone": backbone, "num_keypoints": 8}})
    torch.manual_seed(0)
    policy = build_policy(cfg, denoiser_config("unet1d", DENOISERS["unet1d"]), shapes).eval()
    policy.normalizer.fit({"proprio": torch.randn(64, 4), "action": torch.rand(64, 4) * 2 - 1})
    policy.prepare(torch.rand(32, policy.data_horizon, 4) * 2 - 1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ort = OrtPolicy.from_policy(policy, tmp_path / "g")
    assert not policy.training
    obs = {"proprio": torch.randn(1, 1, 4),
           **{k: torch.randint(0, 256, (1, 1, size, size, 3), dtype=torch.uint8) for k in ("rgb_a", "rgb_b")}}
    feed = NoiseFeed()
    with torch.no_grad(), policy.noise_feed(feed):
        want = policy.predict_chunk(obs)
    with ort.noise_feed(NoiseFeed(feed.drawn)):
        got = ort.predict_chunk(obs)
    assert (got - want).abs().max().item() <= PARITY_ATOL, (got, want)
    # Mish goes out as Exp/Div, not the exporter's Softplus -> Tanh (ORT's Softplus kernel was 45% of the camera graph)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "g" / "policy.onnx")).graph.node}
    assert "Softplus" not in ops and {"Exp", "Conv"} <= ops
    # a large activation stays finite through the capped exponential
    big = {"proprio": torch.full((1, 1, 4), 1e4), **{k: obs[k] for k in ("rgb_a", "rgb_b")}}
    with ort.noise_feed(NoiseFeed(feed.drawn)):
        assert torch.isfinite(ort.predict_chunk(big)).all()
    other = obs | {"rgb_a": 255 - obs["rgb_a"]}  # the frames matter: another image, another chunk for the same noise
    with ort.noise_feed(NoiseFeed(feed.drawn)):
        assert (ort.predict_chunk(other) - got).abs().max().item() > 1e-4


def test_policy_node_runs_an_ort_bundle_and_refuses_ort_without_graphs(tmp_path):
    """The ROS 2 node with ``backend: ort`` drives the sim robot over the real RMW (own domain); a bundle without
    ONNX graphs still configures on torch, and ``backend: ort`` on it fails configure with one line naming --onnx
    (in-process and through the ``rtpolicy deploy`` process, exit 1)."""
    pytest.importorskip("rclpy")
    import json
    import threading
    import time

    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.lifecycle import TransitionCallbackReturn
    from ros_helpers import CLI, Processes, new_domain

    from rtpolicy.deploy.node import PolicyNode
    from rtpolicy.deploy.sim_robot import JOINT_NAMES, SimRobotNode

    policy = trained_like("truncated", {"num_anchors": 4}, "unet1d")
    with_onnx = bundle_of(policy, tmp_path / "a")
    without = bundle_of(policy, tmp_path / "b", onnx=False)
    sources = json.dumps({"state": [{"joint_state": {"topic": "/joint_states", "names": list(JOINT_NAMES), "field": "position"}},
                                    {"array": {"topic": "/object_state", "size": 35}}]})
    domain = new_domain()
    context = Context()
    rclpy.init(context=context, domain_id=domain)
    executor = SingleThreadedExecutor(context=context)
    nodes, spinning = [], [True]

    def spin():
        while spinning[0]:
            executor.spin_once(timeout_sec=0.05)

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    procs = Processes(domain)
    try:
        torch_node = PolicyNode({"bundle": str(without), "observation_sources": sources}, node_name="torch_policy",
                                context=context)
        nodes.append(torch_node)
        assert torch_node.trigger_configure() == TransitionCallbackReturn.SUCCESS, torch_node.configure_error
        refused = PolicyNode({"bundle": str(without), "backend": "ort"}, node_name="refused", context=context)
        nodes.append(refused)
        assert refused.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert "no ONNX graph" in refused.configure_error and "--onnx" in refused.configure_error
        assert "\n" not in refused.configure_error
        for n in (torch_node, refused):
            n.destroy_node()
        nodes.clear()

        sim = SimRobotNode({"task": "reach-v3", "seed": 3, "max_episode_steps": 6, "max_episodes": 1, "step_on_command": True,
                            "control_rate_hz": 20.0}, context=context)
        node = PolicyNode({"bundle": str(with_onnx), "observation_sources": sources, "control_rate_hz": 20.0,
                           "backend": "ort", "intra_op_threads": 1}, context=context)
        nodes += [sim, node]
        executor.add_node(sim)
        executor.add_node(node)
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS, node.configure_error
        assert type(node.policy).__name__ == "OrtPolicy"
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        end = time.monotonic() + 30
        while time.monotonic() < end and not (sim.done and node.stats().get("chunks", 0) >= 1):
            time.sleep(0.05)
        st = node.stats()
        assert sim.done and sim.results[0]["length"] == 6 and sim.bad_commands == 0, sim.results
        assert st["backend"] == "ort" and st["chunks"] >= 1 and st["inference_errors"] == 0, st
        node.trigger_deactivate()

        out = procs.run([*CLI, "deploy", f"bundle={without}", "backend=ort"], timeout=120)  # the process: exit 1, one line
        assert out.returncode == 1, out.stdout[-2000:]
        lines = [ln for ln in out.stdout.splitlines() if "ONNX" in ln]
        assert len(lines) == 1 and "configure failed" in lines[0] and "--onnx" in lines[0], out.stdout[-2000:]
        assert "Traceback" not in out.stdout
    finally:
        procs.stop_all()
        spinning[0] = False
        thread.join(5)
        executor.shutdown()
        for n in nodes[::-1]:
            n.destroy_node()
        rclpy.shutdown(context=context)


@pytest.mark.parametrize("size, fraction", [((84, 84), 0.9), ((63, 80), 0.9), ((64, 64), 0.95), ((20, 21), 0.5)])
def test_eval_centre_crop_is_torchvision_center_crop(size, fraction):
    """The traceable centre crop (fixed slices) takes the pixels torchvision's CenterCrop takes."""
    from torchvision.transforms import v2

    from rtpolicy.policies.encoders.image import ImageAugment

    aug = ImageAugment(size, fraction).eval()
    frames = torch.randint(0, 256, (2, *size, 3), dtype=torch.uint8)
    want = v2.CenterCrop(aug.crop)(frames.permute(0, 3, 1, 2)).float() / 255.0 * 2.0 - 1.0
    assert torch.equal(aug(frames), want)


def test_inference_worker_runs_a_bundle_on_ort(tmp_path):
    from rtpolicy.deploy.scheduler import ActionScheduler, InferenceWorker

    policy = trained_like("truncated", {"num_anchors": 4}, "unet1d")
    out = bundle_of(policy, tmp_path)
    sched = ActionScheduler(4)
    with InferenceWorker.from_bundle(str(out), sched, step_fn=lambda: 0, backend="ort", warmup=0) as w:
        assert isinstance(w.policy, OrtPolicy)
        w.submit({"state": torch.randn(1, 2, 39)}, obs_step=0)
        assert w.wait_idle(30)
        assert w.errors == 0 and w.calls == 1 and sched.chunks == 1 and len(sched) == 4, w.last_error
    with pytest.raises(BundleError, match="--onnx"):
        InferenceWorker.from_bundle(str(bundle_of(policy, tmp_path / "b", onnx=False)), sched, lambda: 0, backend="ort")
