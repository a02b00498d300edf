"""Image observations end to end: env cameras, zarr storage, windowed sampling, image policies, config."""


import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from rtpolicy.config import EncoderConfig, TaskConfig
from rtpolicy.datasets.replay_buffer import ReplayBuffer
from rtpolicy.datasets.sampler import SequenceDataset
from rtpolicy.policies import load_all
from rtpolicy.factory import CONF_DIR, build_policy, denoiser_config, policy_config

load_all()
S = 32  # frame side in these tests
SR = 64  # resnet18 needs >= 64 pixels for a 2x2 keypoint map


def episode(length, seed, size=S):
    rng = np.random.default_rng(seed)
    return {
        "state": rng.normal(size=(length, 5)).astype(np.float32),
        "rgb_corner": rng.integers(0, 256, size=(length, size, size, 3), dtype=np.uint8),
        "action": rng.uniform(-1, 1, size=(length, 3)).astype(np.float32),
    }


def image_store(tmp_path):
    """Two episodes (7 and 12 steps) of state, 32x32 frames and actions in a zarr store, reopened -> (episodes, store)."""
    eps = [episode(7, 0), episode(12, 1)]
    buf = ReplayBuffer.create(tmp_path / "img.zarr")
    for ep in eps:
        buf.add_episode(ep)
    return eps, ReplayBuffer.open(tmp_path / "img.zarr")


# ---------------------------------------------------------------------------------------------- storage
def test_image_store_round_trip_and_time_chunks(tmp_path):
    eps, buf = image_store(tmp_path)
    arr = buf["rgb_corner"]
    assert arr.dtype == np.uint8 and arr.shape == (19, S, S, 3)
    assert arr.chunks[1:] == (S, S, 3) and 1 <= arr.chunks[0] <= 16, f"frames chunked a few steps at a time, got {arr.chunks}"
    assert buf["state"].chunks[0] > arr.chunks[0]
    for i, ep in enumerate(eps):
        got = buf.get_episode(i)
        for k, v in ep.items():
            assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k
    big = ReplayBuffer.create(tmp_path / "big.zarr")
    big.add_episode({"rgb": np.zeros((3, 256, 256, 3), np.uint8)})
    assert big["rgb"].chunks == (1, 256, 256, 3)


def test_dataset_reads_only_image_windows(tmp_path):
    eps, buf = image_store(tmp_path)
    ds = SequenceDataset(buf, ["state", "rgb_corner"], "action", obs_horizon=2, horizon=6, action_horizon=3)
    assert ds.image_keys == ["rgb_corner"]
    assert not isinstance(ds.sampler.data["rgb_corner"], np.ndarray), "image frames must stay in the store"
    item = ds[0]  # first window of episode 0: step -1 is padded with step 0
    assert item["obs"]["rgb_corner"].dtype == torch.uint8 and item["obs"]["rgb_corner"].shape == (2, S, S, 3)
    assert item["obs"]["state"].dtype == torch.float32
    ref = eps[0]["rgb_corner"]
    assert np.array_equal(item["obs"]["rgb_corner"].numpy(), ref[[0, 0]])
    for idx in range(len(ds)):  # frames always match the in-memory state's window
        w = ds[idx]
        ep = [e for e in eps if any(np.array_equal(w["obs"]["state"][-1].numpy(), s) for s in e["state"])][0]
        rows = [int(np.flatnonzero((ep["state"] == s.numpy()).all(1))[0]) for s in w["obs"]["state"]]
        assert np.array_equal(w["obs"]["rgb_corner"].numpy(), ep["rgb_corner"][rows])
    batch = next(iter(DataLoader(ds, batch_size=4, shuffle=True)))
    assert batch["obs"]["rgb_corner"].shape == (4, 2, S, S, 3) and batch["obs"]["rgb_corner"].dtype == torch.uint8
    frames, ds.sampler.data["rgb_corner"] = ds.sampler.data["rgb_corner"], None  # action windows read no frame
    windows = ds.action_windows()
    ds.sampler.data["rgb_corner"] = frames
    assert torch.equal(windows, torch.stack([ds[i]["action"] for i in range(len(ds))]))


# ---------------------------------------------------------------------------------------------- policies
def image_policy(head="diffusion", backbone="resnet18", shared=True, cameras=("rgb_corner",), size=S, **encoder):
    base = {"horizon": 8, "obs_horizon": 2, "cond_dim": 16, "action_horizon": 4}
    base |= {"diffusion": {"num_inference_steps": 2}, "edm": {"num_inference_steps": 2},
             "truncated": {"num_anchors": 4, "num_inference_steps": 1},
             "streaming": {"action_horizon": 1, "warmup_steps": 2}}[head]
    enc = {"image_backbone": backbone, "shared_backbone": shared, "num_keypoints": 4, "crop_fraction": 0.875} | encoder
    pol = policy_config(head, base, {"encoder": enc})
    den = denoiser_config("unet1d", {"down_dims": [16, 32]})
    shapes = {"state": [5], **{c: [size, size, 3] for c in cameras}, "action": [3]}
    policy = build_policy(pol, den, shapes)
    g = torch.Generator().manual_seed(0)
    policy.normalizer.fit({"state": torch.randn(64, 5, generator=g), "action": torch.rand(64, 3, generator=g) * 2 - 1})
    if head == "truncated":
        policy.prepare(torch.rand(16, policy.data_horizon, 3, generator=g) * 2 - 1)
    return policy


def image_obs(b, cameras=("rgb_corner",), size=S):
    g = torch.Generator().manual_seed(1)
    obs = {"state": torch.randn(b, 2, 5, generator=g)}
    return obs | {c: torch.randint(0, 256, (b, 2, size, size, 3), dtype=torch.uint8, generator=g) for c in cameras}


def test_image_policy_trains_and_predicts():
    torch.manual_seed(0)
    policy = image_policy(size=SR)
    assert sorted(policy.normalizer.shapes) == ["action", "state"], "pixels get no normalizer statistics"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in policy.modules())
    batch = {"obs": image_obs(3, size=SR), "action": torch.rand(3, policy.data_horizon, 3) * 2 - 1}
    policy.train()
    loss, metrics = policy.compute_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and metrics["loss"] == pytest.approx(loss.item())
    grads = [p.grad for p in policy.encoder.images.backbones.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), "loss must reach the backbone"
    chunk = policy.eval().predict_chunk(image_obs(2, size=SR))
    assert chunk.shape == (2, policy.action_horizon, 3) and torch.isfinite(chunk).all()
    with pytest.raises(ValueError, match=r"observation 'rgb_corner' has shape \(2, 2, 16, 16, 3\)"):
        policy.predict_chunk(image_obs(2, size=SR) | {"rgb_corner": torch.zeros(2, 2, 16, 16, 3, dtype=torch.uint8)})
    with pytest.raises(ValueError, match="1x1 resnet18 feature map"):
        image_policy(size=32)


@pytest.mark.parametrize("head", ["edm", "truncated", "streaming"])
def test_every_head_takes_images(head):
    torch.manual_seed(0)
    policy = image_policy(head, backbone="small_cnn", shared=False, cameras=("rgb_a", "rgb_b"))
    assert len(policy.encoder.images.backbones) == 2
    batch = {"obs": image_obs(2, ("rgb_a", "rgb_b")), "action": torch.rand(2, policy.data_horizon, 3) * 2 - 1}
    loss, _ = policy.train().compute_loss(batch)
    loss.backward()
    policy.eval().reset()
    assert policy.predict_chunk(image_obs(2, ("rgb_a", "rgb_b"))).shape == (2, policy.action_horizon, 3)


def test_frozen_image_encoder_trains_on_cached_keypoints(tmp_path):
    from rtpolicy.checkpoint import save_checkpoint
    from rtpolicy.policies.encoders.image import cache_keypoints
    from rtpolicy.training import cached_keypoints

    torch.manual_seed(0)
    trained = image_policy(backbone="small_cnn")
    save_checkpoint(tmp_path / "pre.safetensors", ema=trained, model=trained, optimizer=None, lr_scheduler=None, step=0,
                    config={}, shapes={}, num_tasks=0, metrics={})
    policy = image_policy(backbone="small_cnn", freeze_image=True, image_weights=str(tmp_path / "pre.safetensors"))
    enc = policy.encoder.images
    for a, b in zip(enc.backbones.parameters(), trained.encoder.images.backbones.parameters()):
        assert torch.equal(a, b), "image_weights initialises the backbone from the checkpoint"
    assert not any(p.requires_grad for p in enc.backbones.parameters())
    assert all(p.requires_grad for p in enc.heads[0][1].parameters()), "the projection still trains"
    # a store's frames -> cached keypoints that the dataset serves in place of frames
    _, buf = image_store(tmp_path)
    feats = cached_keypoints(policy, buf, torch.device("cpu"))
    assert feats["rgb_corner"].shape == (19, enc.keypoint_dim)
    ds = SequenceDataset(buf, ["state", "rgb_corner"], "action", obs_horizon=2, horizon=8, action_horizon=4, arrays=feats)
    assert ds.image_keys == []
    batch = next(iter(DataLoader(ds, batch_size=5)))
    frames = next(iter(DataLoader(SequenceDataset(buf, ["state", "rgb_corner"], "action", obs_horizon=2, horizon=8,
                                                  action_horizon=4), batch_size=5)))
    assert batch["obs"]["rgb_corner"].shape == (5, 2, enc.keypoint_dim)
    policy.train()  # a frozen encoder does not augment, even in train(): cached == computed from frames
    torch.testing.assert_close(policy.encode(batch["obs"]), policy.encode(frames["obs"]))
    before = [p.clone() for p in enc.backbones.parameters()]
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    loss, _ = policy.compute_loss(batch)
    loss.backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, enc.backbones.parameters()))
    assert policy.eval().predict_chunk(image_obs(2)).shape == (2, policy.action_horizon, 3)  # frames at inference
    with pytest.raises(ValueError, match="needs a frozen image encoder"):
        cache_keypoints(trained.encoder.images, {"rgb_corner": buf["rgb_corner"]})
    with pytest.raises(ValueError, match="no image encoder weights"):
        image_policy(backbone="resnet18", size=SR, freeze_image=True, image_weights=str(tmp_path / "pre.safetensors"))
    with pytest.raises(ValueError, match="one row per stored step"):
        SequenceDataset(buf, ["state", "rgb_corner"], "action", 2, 8, 4, arrays={"rgb_corner": feats["rgb_corner"][:5]})
    # its checkpoint loads after the init file is gone: the weights are in the checkpoint
    from rtpolicy.checkpoint import load_policy

    cfg = {"policy": OmegaConf.to_container(policy.cfg), "denoiser": {"name": "unet1d", "down_dims": [16, 32]}}
    ckpt = save_checkpoint(tmp_path / "run.safetensors", ema=policy, step=1, config=cfg,
                           shapes={"state": [5], "rgb_corner": [S, S, 3], "action": [3]})
    (tmp_path / "pre.safetensors").unlink()
    loaded, _ = load_policy(ckpt)
    torch.testing.assert_close(loaded.encode(frames["obs"]), policy.eval().encode(frames["obs"]))


def test_language_policy_takes_embeddings():
    base = {"horizon": 8, "obs_horizon": 2, "action_horizon": 4, "cond_dim": 16, "num_inference_steps": 2}
    pol = policy_config("diffusion", base)
    den = denoiser_config("unet1d", {"down_dims": [16, 32]})
    policy = build_policy(pol, den, {"state": [5], "lang_emb": [384], "action": [3]})
    assert sorted(policy.normalizer.shapes) == ["action", "state"]
    policy.normalizer.fit({"state": torch.randn(64, 5), "action": torch.rand(64, 3) * 2 - 1})
    obs = {"state": torch.randn(2, 2, 5), "lang_emb": torch.nn.functional.normalize(torch.randn(2, 384), dim=-1)}
    loss, _ = policy.compute_loss({"obs": obs, "action": torch.rand(2, 8, 3)})
    loss.backward()
    assert policy.encoder.lang.proj[0].weight.grad is not None
    assert policy.eval().predict_chunk(obs).shape == (2, 4, 3)
    # a zero embedding is "no instruction": the null token that lang_dropout trains
    tok = policy.encoder.lang(torch.cat([obs["lang_emb"][:1], torch.zeros(1, 384)]))
    assert torch.equal(tok[1], policy.encoder.lang.null[0]) and not torch.equal(tok[0], policy.encoder.lang.null[0])


def test_edm_guidance_over_language():
    base = {"horizon": 8, "obs_horizon": 2, "action_horizon": 4, "cond_dim": 16, "num_inference_steps": 3}
    den = denoiser_config("unet1d", {"down_dims": [16, 32]})
    torch.manual_seed(0)
    policies = {}
    for g in (1.0, 3.0):
        pol = policy_config("edm", base, {"guidance": g})
        policies[g] = build_policy(pol, den, {"state": [5], "lang_emb": [384], "action": [3]})
    with torch.no_grad():
        policies[1.0].encoder.lang.null.normal_()  # an instruction-free token unlike any instruction
    policies[3.0].load_state_dict(policies[1.0].state_dict())
    obs = {"state": torch.randn(2, 2, 5), "lang_emb": torch.nn.functional.normalize(torch.randn(2, 384), dim=-1)}
    calls = {}
    for g, policy in policies.items():
        policy.normalizer.fit({"state": torch.randn(64, 5), "action": torch.rand(64, 3) * 2 - 1})
        policy.eval()
        n = [0]
        policy.denoiser.register_forward_hook(lambda *_, n=n: n.__setitem__(0, n[0] + 1))
        torch.manual_seed(1)
        calls[g] = (policy.predict_chunk(obs), n)
    assert calls[3.0][1][0] == 2 * calls[1.0][1][0], "guidance adds one instruction-free call per step"
    assert not torch.allclose(calls[1.0][0], calls[3.0][0]), "guidance over language changes the actions"
    uncond = policies[3.0].unconditional(obs)
    assert torch.equal(uncond["lang_emb"], torch.zeros(2, 384)) and torch.equal(uncond["state"], obs["state"])


# ---------------------------------------------------------------------------------------------- env + config
def test_metaworld_camera_observations():
    from rtpolicy.envs import make_env
    from rtpolicy.envs.metaworld import MetaWorldEnv

    cfg = {"name": "reach-v3", "max_episode_steps": 5, "obs_keys": ["state", "rgb_corner", "rgb_topview"], "image_size": 24}
    env = MetaWorldEnv(cfg, seed=0)
    try:
        obs, _ = env.reset(seed=0)
        assert set(obs) == {"state", "rgb_corner", "rgb_topview"}
        for key in ("rgb_corner", "rgb_topview"):
            assert obs[key].shape == (24, 24, 3) and obs[key].dtype == np.uint8
            assert env.observation_space[key].contains(obs[key])
            assert obs[key].std() > 5, f"{key} frame is blank"
        first = obs["rgb_corner"].copy()
        for _ in range(3):
            obs, *_ = env.step(np.array([1.0, 0.0, 0.0, 0.0], np.float32))
        assert not np.array_equal(first, obs["rgb_corner"]), "the arm moved, the frame must change"
    finally:
        env.close()
    env = make_env({"name": "reach-v3", "env": "metaworld"}, seed=0, cameras=["gripperPOV"], image_size=16)
    try:
        assert env.reset(seed=0)[0]["rgb_gripperPOV"].shape == (16, 16, 3)
    finally:
        env.close()
    with pytest.raises(ValueError, match="'rgb_nope' names no Meta-World camera"):
        MetaWorldEnv(cfg | {"obs_keys": ["state", "rgb_nope"]}, seed=0)


def test_metaworld_proprio_is_the_robot_state_only():
    from rtpolicy.envs.metaworld import PROPRIO_DIM, MetaWorldEnv

    env = MetaWorldEnv({"name": "pick-place-v3", "obs_keys": ["proprio", "rgb_corner"], "image_size": 16}, seed=0)
    try:
        obs, _ = env.reset(seed=0)
        assert obs["proprio"].shape == (PROPRIO_DIM,) and env.observation_space["proprio"].contains(obs["proprio"])
        np.testing.assert_array_equal(obs["proprio"], obs["state"][:PROPRIO_DIM])  # hand xyz, gripper
        obs2, _ = env.reset(seed=1)  # another layout moves the puck and goal, not the robot's start
        assert not np.allclose(obs["state"][4:7], obs2["state"][4:7])
        np.testing.assert_allclose(obs["proprio"][:3], obs2["proprio"][:3], atol=0.02)
    finally:
        env.close()
    assert "proprio" not in MetaWorldEnv({"name": "reach-v3"}, seed=0).reset(seed=0)[0]


def test_collect_stores_camera_frames(tmp_path):
    from rtpolicy.datasets.collect import collect_demos

    cfg = TaskConfig(name="reach-v3", max_episode_steps=150, obs_keys=["state", "rgb_corner"], image_size=16)
    info = collect_demos(cfg, tmp_path / "reach.zarr", 1, seed=0, progress=False)
    assert info["obs_keys"] == ["state", "rgb_corner"]
    buf = ReplayBuffer.open(tmp_path / "reach.zarr")
    assert buf["rgb_corner"].dtype == np.uint8 and buf.shape("rgb_corner") == (16, 16, 3)
    assert buf["rgb_corner"].shape[0] == buf["state"].shape[0] == buf.n_steps
    state_only = TaskConfig(name="reach-v3", max_episode_steps=150, obs_keys=["state", "rgb_topview"], image_size=16)
    with pytest.raises(ValueError, match=r"has no \['rgb_topview'\]"):
        collect_demos(state_only, tmp_path / "reach.zarr", 2, seed=0, progress=False)
    resized = TaskConfig(name="reach-v3", max_episode_steps=150, obs_keys=["state", "rgb_corner"], image_size=24)
    with pytest.raises(ValueError, match=r"rgb_corner frames of \(16, 16, 3\), not image_size=24"):
        collect_demos(resized, tmp_path / "reach.zarr", 2, seed=0, progress=False)


def test_train_config_composes_an_image_policy():
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigKeyError

    from rtpolicy.config import register_configs

    register_configs()
    conf = str(CONF_DIR)
    over = ["task.obs_keys=[state,rgb_corner]", "task.image_size=64", "policy.encoder.image_backbone=small_cnn",
            "policy.encoder.shared_backbone=false", "policy=edm"]
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("train", overrides=over)
        assert cfg.policy.encoder.image_backbone == "small_cnn" and cfg.policy.encoder.crop_fraction == 0.9
        assert list(cfg.task.obs_keys) == ["state", "rgb_corner"] and cfg.task.image_size == 64
        with pytest.raises((ConfigCompositionException, ConfigKeyError)):
            compose("train", overrides=["policy.encoder.backbone=resnet18"])
    assert EncoderConfig().image_backbone == "resnet18"
