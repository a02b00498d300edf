"""End to end through the real entry points: collect scripted demos in Meta-World, train a tiny
policy for a few steps, save, resume, reload the checkpoint in eval.py and roll it out."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from rtpolicy.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "denoiser.down_dims=[16,32]", "policy.cond_dim=16", "policy.num_inference_steps=3",
    "train.batch_size=16", "train.val_every=5", "train.log_every=5", "train.ckpt_every=5",
    "eval.episodes=2", "eval.num_envs=2", "eval.max_episode_steps=24", "eval.latency_reps=3",
]


def _run(script, *args, cwd):
    env = dict(os.environ, MUJOCO_GL="osmesa", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_collect_train_resume_eval(tmp_path):
    data = tmp_path / "demos.zarr"
    out = _run("train.py", f"task.dataset={data}", "task.collect=true", "task.demos=3", "train.steps=10", f"run_dir={tmp_path}/run", *TINY, cwd=tmp_path)
    assert "success" in out and "checkpoint:" in out
    ckpt = tmp_path / "run" / "checkpoints" / "last.safetensors"
    meta = read_checkpoint(ckpt)[0]
    assert meta["step"] == 10 and meta["config"]["task"]["name"] == "pick-place-v3"
    assert (tmp_path / "run" / "config.yaml").exists() and list((tmp_path / "run" / "tb").iterdir())
    report = json.loads([ln for ln in out.splitlines() if ln.startswith('{"success"')][-1])
    assert report["episodes"] == 2 and 0.0 <= report["success"] <= 1.0

    # a second run into the same folder is refused rather than overwriting it
    env = dict(os.environ, MUJOCO_GL="osmesa")
    again = subprocess.run([sys.executable, str(ROOT / "train.py"), f"task.dataset={data}", f"run_dir={tmp_path}/run", *TINY],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "resume=true" in again.stdout + again.stderr

    first_s = json.loads((tmp_path / "run" / "results.json").read_text())["train_seconds"]
    out = _run("train.py", f"task.dataset={data}", "train.steps=15", f"run_dir={tmp_path}/run", "resume=true", *TINY, cwd=tmp_path)
    assert "resumed" in out and "at step 10" in out
    assert read_checkpoint(ckpt)[0]["step"] == 15
    assert json.loads((tmp_path / "run" / "results.json").read_text())["train_seconds"] > first_s  # time accumulates

    res_path = tmp_path / "eval" / "results.json"
    _run("eval.py", f"checkpoint={ckpt}", "eval.episodes=2", "eval.num_envs=1", "eval.max_episode_steps=16",
         "eval.latency_reps=3", f"eval.out={res_path}", "+policy.num_inference_steps=2", cwd=tmp_path)
    res = json.loads(res_path.read_text())
    for key in ("success", "ci95", "episodes", "chunk_ms_p50", "chunk_ms_p95"):
        assert key in res, key
    assert res["episodes"] == 2 and res["chunk_ms_p95"] >= res["chunk_ms_p50"] > 0


@pytest.mark.slow
def test_foreign_diffusion_policy_store_trains(tmp_path):
    """A zarr v2 store in diffusion_policy's layout, written with the raw zarr API (as another tool
    would), trains without conversion."""
    root = zarr.open_group(str(tmp_path / "pusht.zarr"), mode="w", zarr_format=2)
    rng = np.random.default_rng(0)
    lengths = [30, 25, 40]
    n = sum(lengths)
    root.create_array("data/state", data=rng.normal(size=(n, 5)).astype(np.float32), chunks=(17, 5))
    root.create_array("data/action", data=rng.uniform(0, 512, size=(n, 2)).astype(np.float32), chunks=(100, 2))
    root.create_array("meta/episode_ends", data=np.cumsum(lengths).astype(np.int64))
    out = _run("train.py", f"task.dataset={tmp_path}/pusht.zarr", "task.name=pusht", "train.steps=6", "eval.episodes=0",
               f"run_dir={tmp_path}/run", *[o for o in TINY if not o.startswith("eval.")], cwd=tmp_path)
    assert "checkpoint:" in out
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")[0]["shapes"] == {"state": [5], "action": [2]}


def test_unknown_config_key_fails_at_launch(tmp_path):
    env = dict(os.environ, MUJOCO_GL="osmesa")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "train.stesp=3"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "stesp" in proc.stderr
    assert not (tmp_path / "runs").exists(), "a failed launch must not create a run"
