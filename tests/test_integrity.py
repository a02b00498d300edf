"""What a test from outside found, each reproduced here: interrupted collection, a mistyped dataset path,
a resume with another config, expected errors as one line from every CLI, and no run directory before
the dataset is known to be good."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rtpolicy.datasets.replay_buffer import ReplayBuffer
from rtpolicy.factory import compose

ROOT = Path(__file__).resolve().parents[1]
TINY = ["denoiser.down_dims=[16,32]", "policy.cond_dim=16", "policy.horizon=8", "policy.action_horizon=4",
        "policy.num_inference_steps=2", "train.batch_size=8", "train.val_every=1000", "eval.episodes=0"]


def run(args, cwd, timeout=600):
    env = dict(os.environ, MUJOCO_GL="osmesa", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def one_line_error(proc, *names):
    """A non-zero exit with one 'error: ...' line on stderr naming each of ``names``, and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1500:], proc.stderr[-1500:])
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for name in names:
        assert str(name) in errors[0], errors[0]
    return errors[0]


# ------------------------------------------------------------------------------------------- collect
KILLER = textwrap.dedent("""
    import os, sys
    from rtpolicy.datasets import replay_buffer
    from rtpolicy.datasets.collect import collect_demos
    from rtpolicy.factory import compose

    real = replay_buffer.ReplayBuffer.add_episode
    def add_episode(self, data, chunk_steps=None, attrs=None):
        if self.n_episodes == 1:  # the second episode: its rows and attrs are written, then the writer dies
            real_put = self.put_attrs
            self.put_attrs = lambda a: (real_put(a), os._exit(9))
        return real(self, data, chunk_steps, attrs)
    replay_buffer.ReplayBuffer.add_episode = add_episode
    collect_demos(compose(["task=reach"]).task, sys.argv[1], 3, 0, progress=False)
""")


def test_collect_killed_between_episode_and_commit_resumes_without_duplicates(tmp_path):
    from rtpolicy.datasets.collect import collect_demos

    store = tmp_path / "reach.zarr"
    (tmp_path / "killer.py").write_text(KILLER)
    killed = run([str(tmp_path / "killer.py"), str(store)], cwd=tmp_path, timeout=300)
    assert killed.returncode == 9, killed.stderr[-2000:]
    buf = ReplayBuffer.open(store)
    assert buf.n_episodes == 1 and len(buf.attrs["seeds"]) == 2  # the attrs ran one episode ahead of the commit
    info = collect_demos(compose(["task=reach"]).task, store, 3, 0, progress=False)
    buf = ReplayBuffer.open(store)
    assert buf.n_episodes == 3 and info["new_episodes"] == 2
    seeds = list(buf.attrs["seeds"])
    assert len(seeds) == len(set(seeds)) == 3, seeds
    # and the store equals one collected without the interruption
    clean = tmp_path / "clean.zarr"
    collect_demos(compose(["task=reach"]).task, clean, 3, 0, progress=False)
    assert list(ReplayBuffer.open(clean).attrs["seeds"]) == seeds
    assert (ReplayBuffer.open(clean).episode_ends == buf.episode_ends).all()


def test_attrs_behind_the_commit_are_derived_not_refused(tmp_path):
    """A store from a writer that committed the episode before its attrs (the old order) and died between."""
    from rtpolicy.datasets.collect import collect_demos

    store = tmp_path / "reach.zarr"
    collect_demos(compose(["task=reach"]).task, store, 2, 0, progress=False)
    buf = ReplayBuffer.open(store, mode="a")
    attrs = dict(buf.attrs)
    used = attrs["seeds"][-1]
    buf.put_attrs(attrs | {"seeds": attrs["seeds"][:-1], "next_seed": used})
    collect_demos(compose(["task=reach"]).task, store, 3, 0, progress=False)
    seeds = list(ReplayBuffer.open(store).attrs["seeds"])
    assert len(seeds) == len(set(seeds)) == 3 and seeds[1] == used


# ------------------------------------------------------------------------------------------- train.py
def test_mistyped_dataset_path_fails_naming_it_and_collects_nothing(tmp_path):
    typo = tmp_path / "data" / "metaworld" / "pick-plcae-v3.zarr"
    proc = run([str(ROOT / "train.py"), f"task.dataset={typo}", *TINY], cwd=tmp_path)
    one_line_error(proc, typo, "task.collect=true")
    assert not typo.exists() and not (tmp_path / "runs").exists()


def test_bad_store_fails_before_a_run_directory_exists(tmp_path):
    bad = tmp_path / "bad.zarr"
    bad.mkdir()
    (bad / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    proc = run([str(ROOT / "train.py"), f"task.dataset={bad}", f"run_dir={tmp_path / 'run'}", *TINY], cwd=tmp_path)
    one_line_error(proc, bad)
    assert not (tmp_path / "run").exists()


def test_resume_with_another_config_changes_nothing_and_names_the_keys(tmp_path):
    store = tmp_path / "reach.zarr"
    args = ["task=reach", f"task.dataset={store}", "task.collect=true", "task.demos=2", f"run_dir={tmp_path / 'run'}",
            "train.steps=2", *TINY]
    assert run([str(ROOT / "train.py"), *args], cwd=tmp_path).returncode == 0
    config = (tmp_path / "run" / "config.yaml").read_text()
    ckpt = (tmp_path / "run" / "checkpoints" / "last.safetensors").read_bytes()
    proc = run([str(ROOT / "train.py"), *args, "resume=true", "train.steps=4", "policy.horizon=16", "optim.lr=0.01"], cwd=tmp_path)
    line = one_line_error(proc, "policy.horizon", "optim.lr", "nothing was changed")
    assert "train.steps" not in line  # steps may change on resume
    assert (tmp_path / "run" / "config.yaml").read_text() == config
    assert (tmp_path / "run" / "checkpoints" / "last.safetensors").read_bytes() == ckpt
    # and with its own config (more steps) it resumes
    assert run([str(ROOT / "train.py"), *args, "resume=true", "train.steps=3"], cwd=tmp_path).returncode == 0


# ------------------------------------------------------------------------------------------- other CLIs
@pytest.fixture
def not_a_checkpoint(tmp_path):
    path = tmp_path / "last.safetensors"
    path.write_bytes(b"\x00" * 64)
    return path


def test_eval_py_bad_checkpoint_is_one_line(tmp_path, not_a_checkpoint):
    one_line_error(run([str(ROOT / "eval.py"), f"checkpoint={not_a_checkpoint}"], cwd=tmp_path), not_a_checkpoint)
    traced = run([str(ROOT / "eval.py"), f"checkpoint={not_a_checkpoint}", "--traceback"], cwd=tmp_path)
    assert traced.returncode != 0 and "Traceback" in traced.stderr  # kept for a bug report


def test_export_and_collect_clis_bad_input_is_one_line(tmp_path, not_a_checkpoint):
    one_line_error(run(["-m", "rtpolicy.deploy.export", "--checkpoint", str(not_a_checkpoint), "--out", str(tmp_path / "b")],
                       cwd=tmp_path), not_a_checkpoint)
    assert not (tmp_path / "b").exists()
    other = tmp_path / "other.zarr"  # a store of another task: collect refuses to append to it
    from rtpolicy.datasets.collect import collect_demos

    collect_demos(compose(["task=reach"]).task, other, 1, 0, progress=False)
    proc = run(["-m", "rtpolicy.datasets.collect", "--task", "push-v3", "--episodes", "2", "--out", str(other)], cwd=tmp_path)
    one_line_error(proc, other, "reach-v3")
    assert ReplayBuffer.open(other).n_episodes == 1  # nothing written is lost


@pytest.mark.parametrize("override, key", [("policy.sampler=ddmp", "sampler"), ("policy.normalizer=minmaxx", "normalizer"),
                                           ("policy=truncated", None), ("policy.encoder.vla_tuning=lorra", "vla_tuning")])
def test_choices_are_checked_when_the_config_is_composed(override, key):
    from hydra.errors import ConfigCompositionException

    if key is None:  # every head's config carries the encoder (the field every consumer reads)
        assert compose([override]).policy.encoder.image_backbone == "resnet18"
        return
    with pytest.raises(ConfigCompositionException) as e:
        compose([override])
    assert key in str(e.value.__cause__ or e.value)


def test_a_stored_config_with_an_unknown_key_names_it():
    from rtpolicy.factory import ConfigError, policy_config

    with pytest.raises(ConfigError, match="num_inferense_steps"):
        policy_config({"name": "diffusion", "num_inferense_steps": 3}, source="bundle.json")
