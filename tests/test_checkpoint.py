"""Checkpoints: safetensors + JSON metadata, schema versions, clear errors for bad files."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from rtpolicy import checkpoint as ck
from rtpolicy.factory import build_policy

SHAPES = {"state": [5], "action": [3]}


def _save(tmp_path, pol, den, **meta_over):
    policy = build_policy(pol, den, SHAPES)
    policy.normalizer.fit({"state": torch.randn(50, 5), "action": torch.rand(50, 3)})
    cfg = {"policy": OmegaConf.to_container(pol), "denoiser": OmegaConf.to_container(den)}
    path = ck.save_checkpoint(tmp_path / "c" / "last.safetensors", ema=policy, step=7, config=cfg, shapes=SHAPES)
    return policy, path


def test_round_trip_builds_policy_from_checkpoint_alone(tmp_path, small_cfgs):
    pol, dens = small_cfgs
    policy, path = _save(tmp_path, pol, dens["transformer"])
    loaded, meta = ck.load_policy(path, policy_overrides={"num_inference_steps": 2})
    assert meta["step"] == 7 and meta["schema_version"] == ck.SCHEMA_VERSION
    assert loaded.sampler.num_inference_steps == 2
    for (k, a), (_, b) in zip(policy.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert not path.with_suffix(".json").exists(), "no sidecar: the metadata lives in the safetensors header"
    assert not list(path.parent.glob(".*tmp*")), "temporary file left behind"


def test_checkpoint_mode_follows_umask_and_orphan_temporaries_are_removed(tmp_path, small_cfgs):
    import os
    import subprocess
    import sys

    pol, dens = small_cfgs
    (tmp_path / "c").mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / "c" / f".last.tmp-{int(dead.stdout)}.safetensors"  # a writer killed mid-write
    orphan.write_bytes(b"half a checkpoint")
    old = os.umask(0o022)
    try:
        _, path = _save(tmp_path, pol, dens["unet1d"])
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644, oct(path.stat().st_mode)  # safetensors alone writes 0600
    assert not orphan.exists()


def test_resume_state_round_trip(tmp_path, small_cfgs):
    from diffusers.optimization import get_cosine_schedule_with_warmup

    pol, dens = small_cfgs
    policy = build_policy(pol, dens["unet1d"], SHAPES)
    policy.normalizer.fit({"state": torch.randn(50, 5), "action": torch.rand(50, 3)})
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    sched = get_cosine_schedule_with_warmup(opt, 2, 10)
    for _ in range(3):
        loss, _ = policy.compute_loss({"obs": {"state": torch.randn(2, 2, 5)}, "action": torch.randn(2, pol.horizon, 3)})
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    path = ck.save_checkpoint(tmp_path / "l.safetensors", ema=policy, model=policy, optimizer=opt, lr_scheduler=sched,
                              step=3, config={}, shapes=SHAPES)
    p2 = build_policy(pol, dens["unet1d"], SHAPES)
    opt2 = torch.optim.AdamW(p2.parameters(), lr=1e-3)
    sched2 = get_cosine_schedule_with_warmup(opt2, 2, 10)
    ema2 = build_policy(pol, dens["unet1d"], SHAPES)
    assert ck.restore_training(path, p2, ema2, opt2, sched2)["step"] == 3
    assert sched2.get_last_lr() == sched.get_last_lr()
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1)


def test_corrupt_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ck.CheckpointError, match="bad.safetensors"):
        ck.read_checkpoint(bad)


def test_truncated_file(tmp_path, small_cfgs):
    pol, dens = small_cfgs
    _, path = _save(tmp_path, pol, dens["unet1d"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match="not a readable safetensors checkpoint"):
        ck.read_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.read_checkpoint(tmp_path / "nope.safetensors")


def test_not_an_rtpolicy_checkpoint(tmp_path):
    p = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(2)}, str(p))
    with pytest.raises(ck.CheckpointError, match="no 'rtpolicy' metadata"):
        ck.read_checkpoint(p)


def _write_meta(tmp_path, meta):
    p = tmp_path / "m.safetensors"
    save_file({"ema/x": torch.zeros(1)}, str(p), metadata={"rtpolicy": json.dumps(meta)})
    return p


def test_newer_schema_refused(tmp_path):
    p = _write_meta(tmp_path, {"schema_version": ck.SCHEMA_VERSION + 1})
    with pytest.raises(ck.CheckpointError, match="newer than this rtpolicy"):
        ck.read_checkpoint(p)


def test_v0_is_migrated(tmp_path):
    meta, _ = ck.read_checkpoint(_write_meta(tmp_path, {"schema_version": 0, "step": 1}))
    assert meta["schema_version"] == ck.SCHEMA_VERSION and meta["num_tasks"] == 0


def test_weights_mismatch(tmp_path, small_cfgs):
    pol, dens = small_cfgs
    policy, path = _save(tmp_path, pol, dens["unet1d"])
    meta, tensors = ck.read_checkpoint(path)
    meta["denoiser"] = None
    meta["config"]["denoiser"]["down_dims"] = [8, 16]
    save_file(tensors, str(path), metadata={"rtpolicy": json.dumps(meta)})
    with pytest.raises(ck.CheckpointError, match="weights do not match"):
        ck.load_policy(path)
