"""Policy bundles: self-contained export, verified load, same outputs as the checkpoint."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from rtpolicy import checkpoint as ck
from rtpolicy.deploy.export import BundleError, export_bundle, load_bundle, main, read_bundle
from rtpolicy.factory import build_policy, policy_config

SHAPES = {"state": [39], "action": [4]}


@pytest.fixture
def ckpt(tmp_path, small_cfgs):
    pol, dens = small_cfgs
    policy = build_policy(pol, dens["unet1d"], SHAPES)
    policy.normalizer.fit({"state": torch.randn(50, 39), "action": torch.rand(50, 4) * 2 - 1})
    cfg = {"policy": OmegaConf.to_container(pol), "denoiser": OmegaConf.to_container(dens["unet1d"]),
           "task": {"env": "metaworld", "name": "reach-v3", "tasks": []}}
    return ck.save_checkpoint(tmp_path / "run" / "last.safetensors", ema=policy, step=11, config=cfg, shapes=SHAPES)


def test_bundle_round_trip_matches_checkpoint(tmp_path, ckpt):
    out = export_bundle(ckpt, tmp_path / "bundle", {"num_inference_steps": 2}, joint_names=["j1", "j2"])
    policy, bundle = load_bundle(out)
    ref, _ = ck.load_policy(ckpt, policy_overrides={"num_inference_steps": 2})
    assert bundle["policy"]["num_inference_steps"] == 2 and policy.sampler.num_inference_steps == 2
    assert bundle["action"]["kind"] == "ee_delta" and bundle["action"]["delta_dims"] == [0, 1, 2]
    assert bundle["control_rate_hz"] == 80.0 and bundle["joint_names"] == ["j1", "j2"]
    assert bundle["observation"]["state"]["shape"] == [39] and bundle["horizons"]["action"] == policy.action_horizon
    assert bundle["normalizer"]["action.max"] == policy.normalizer.get_stats("action")["max"].tolist()
    obs = {"state": torch.randn(2, policy.obs_horizon, 39)}
    torch.manual_seed(0)
    a = policy.predict_chunk(obs)
    torch.manual_seed(0)
    b = ref.predict_chunk(obs)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # nothing from training is needed: the source checkpoint can be gone
    ckpt.unlink()
    load_bundle(out)


def test_tampered_or_incomplete_bundles_fail_clearly(tmp_path, ckpt):
    out = export_bundle(ckpt, tmp_path / "b")
    weights = out / "policy.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="SHA-256"):
        load_bundle(out)
    weights.unlink()
    with pytest.raises(BundleError, match="policy.safetensors is missing"):
        read_bundle(out)
    with pytest.raises(BundleError, match="no bundle.json"):
        read_bundle(tmp_path)
    out = export_bundle(ckpt, tmp_path / "c")
    meta = json.loads((out / "bundle.json").read_text())
    (out / "bundle.json").write_text(json.dumps(meta | {"bundle_version": 99}))
    with pytest.raises(BundleError, match="bundle_version 99"):
        read_bundle(out)
    (out / "bundle.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "action"}))
    with pytest.raises(BundleError, match="missing fields \\['action'\\]"):
        read_bundle(out)


def test_export_cli(tmp_path, ckpt, capsys):
    out = main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "cli"), "--set", "num_inference_steps=1", "--control-rate", "50"])
    assert "bundle:" in capsys.readouterr().out
    bundle = read_bundle(out)
    assert bundle["control_rate_hz"] == 50.0 and bundle["policy"]["num_inference_steps"] == 1


@pytest.mark.parametrize("head", ["diffusion", "streaming"])
def test_exported_program_matches_eager_denoiser(tmp_path, small_cfgs, head):
    from rtpolicy.deploy.export import load_program

    pol, dens = small_cfgs
    pol = policy_config(head, {k: v for k, v in pol.items() if k in ("obs_horizon", "horizon", "cond_dim")}
                          | {"action_horizon": 1 if head == "streaming" else 4})
    policy = build_policy(pol, dens["unet1d"], SHAPES)
    policy.normalizer.fit({"state": torch.randn(50, 39), "action": torch.rand(50, 4) * 2 - 1})
    cfg = {"policy": OmegaConf.to_container(pol), "denoiser": OmegaConf.to_container(dens["unet1d"]),
           "task": {"env": "metaworld", "name": "reach-v3", "tasks": []}}
    ckpt = ck.save_checkpoint(tmp_path / "run" / "last.safetensors", ema=policy, step=1, config=cfg, shapes=SHAPES)
    out = export_bundle(ckpt, tmp_path / "bundle", program=True)
    bundle = read_bundle(out)
    assert bundle["program"]["parity_max_abs"] <= 1e-5 and (out / "denoiser.pt2").is_file()
    eager, _ = load_bundle(out)
    program = load_program(out)
    # the whole head, run once with the eager denoiser and once with the exported graph in its place
    obs = {"state": torch.randn(1, eager.obs_horizon, 39)}
    torch.manual_seed(3)
    eager.reset()
    a = eager.predict_chunk(obs)
    eager.denoiser = program
    torch.manual_seed(3)
    eager.reset()
    b = eager.predict_chunk(obs)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # re-exporting without the program removes the stale archive; a tampered archive is refused
    (out / "denoiser.pt2").write_bytes(b"not a program")
    with pytest.raises(BundleError, match="SHA-256"):
        load_program(out)
    export_bundle(ckpt, tmp_path / "bundle")
    assert not (out / "denoiser.pt2").exists()
    with pytest.raises(BundleError, match="no exported program"):
        load_program(out)


def test_calvin_like_bundle_maps_the_yaw_delta_to_angular_z(tmp_path, small_cfgs):
    pytest.importorskip("rclpy")
    from rtpolicy.deploy.node import check_twist_axes

    pol, dens = small_cfgs
    shapes = {"state": [33], "action": [5]}
    policy = build_policy(pol, dens["unet1d"], shapes)
    policy.normalizer.fit({"state": torch.randn(50, 33), "action": torch.rand(50, 5) * 2 - 1})
    cfg = {"policy": OmegaConf.to_container(pol), "denoiser": OmegaConf.to_container(dens["unet1d"]),
           "task": {"env": "calvin_like", "name": "open_drawer", "tasks": []}}
    ckpt = ck.save_checkpoint(tmp_path / "run" / "last.safetensors", ema=policy, step=1, config=cfg, shapes=shapes)
    act = read_bundle(export_bundle(ckpt, tmp_path / "b"))["action"]
    assert act["delta_dims"] == [0, 1, 2, 3] and act["names"][3] == "dyaw" and act["kind"] == "ee_delta"
    assert check_twist_axes(act["twist_axes"], 4) == ["linear.x", "linear.y", "linear.z", "angular.z"]
    assert check_twist_axes(None, 4) == ["linear.x", "linear.y", "linear.z", "angular.x"]  # Meta-World-style default order
    for bad in (["linear.x"], ["linear.x", "linear.x", "linear.y", "angular.z"], ["linear.x", "linear.y", "linear.z", "yaw"]):
        with pytest.raises(ValueError, match="twist_axes"):
            check_twist_axes(bad, 4)


def _rewrite_archive(path, edit):
    """Rewrite the zip at ``path`` member by member through ``edit(name, data) -> data | None`` (None drops it)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members:
            data = edit(name, data)
            if data is not None:
                z.writestr(name, data)


class _Payload:  # what an attacker pickles: loading it creates a file
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.mark.parametrize("attack", ["use_pickle_without_space", "extra_member", "sample_inputs"])
def test_program_archive_that_could_run_code_is_refused(tmp_path, small_cfgs, attack):
    """The archive's own metadata is parsed (not matched as text) and only the members the bundle format
    names are accepted, so no spelling of a pickled payload reaches torch.export.load."""
    import hashlib
    import pickle

    from rtpolicy.deploy.export import load_program

    pol, dens = small_cfgs
    policy = build_policy(pol, dens["unet1d"], SHAPES)
    policy.normalizer.fit({"state": torch.randn(50, 39), "action": torch.rand(50, 4) * 2 - 1})
    cfg = {"policy": OmegaConf.to_container(pol), "denoiser": OmegaConf.to_container(dens["unet1d"]),
           "task": {"env": "metaworld", "name": "reach-v3", "tasks": []}}
    ckpt = ck.save_checkpoint(tmp_path / "run" / "last.safetensors", ema=policy, step=1, config=cfg, shapes=SHAPES)
    out = export_bundle(ckpt, tmp_path / "bundle", program=True)
    load_program(out)  # the archive as exported loads
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Payload(marker))

    def edit(name, data):
        if attack == "use_pickle_without_space" and name.endswith("model_weights_config.json"):
            doc = json.loads(data)
            first = next(iter(doc["config"]))
            doc["config"][first]["use_pickle"] = True
            return json.dumps(doc, separators=(",", ":")).encode()  # "use_pickle":true, no space
        if attack == "use_pickle_without_space" and name.endswith("data/weights/weight_0"):
            return evil
        if attack == "sample_inputs" and name.endswith("data/sample_inputs/model.pt"):
            return evil
        return data

    _rewrite_archive(out / "denoiser.pt2", edit)
    if attack == "extra_member":
        import zipfile

        with zipfile.ZipFile(out / "denoiser.pt2", "a") as z:
            top = z.namelist()[0].split("/")[0]
            z.writestr(f"{top}/extra/payload.pkl", evil)
    meta = json.loads((out / "bundle.json").read_text())  # the attacker controls bundle.json too
    meta["program"]["sha256"] = hashlib.sha256((out / "denoiser.pt2").read_bytes()).hexdigest()
    (out / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="refusing to load"):
        load_program(out)
    assert not marker.exists()
