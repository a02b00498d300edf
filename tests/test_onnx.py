"""The ONNX Runtime backend: for every head and denoiser, ORT's actions equal the eager head's for the same
noise; bundles with and without ONNX graphs load; the ORT policy runs in the simulator runner."""

import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("onnxruntime")

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
    from rtpolicy.envs.runner import evaluate
    from rtpolicy.factory import compose

    policy = trained_like("truncated", {"num_anchors": 4}, "unet1d")
    ort = OrtPolicy.from_policy(policy, tmp_path / "g")
    task = compose(["task=reach"]).task
    cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), {"episodes": 2, "num_envs": 2, "max_episode_steps": 8,
                                                             "latency_reps": 2})
    res = evaluate(ort, task, cfg, progress=False)
    assert res["episodes"] == 2 and res["chunk_ms_p50"] > 0
