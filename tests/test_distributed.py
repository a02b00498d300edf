"""Data-parallel training under torchrun (gloo, CPU) and evaluation on Ray workers (issue 16)."""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["task=reach", "denoiser.down_dims=[16,32]", "policy.cond_dim=16", "policy.horizon=8", "policy.action_horizon=4",
        "train.batch_size=8", "eval.episodes=0", "train.threads=1", "train.log_every=2", "train.ckpt_every=2"]


def _torchrun(*args: str, cwd: Path, nproc: int = 2) -> str:
    env = dict(os.environ, MUJOCO_GL="osmesa", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"torchrun failed:\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """torchrun x2 from a clean folder: collect 2 reach demos, train 4 steps (checkpoints at 2 and 4), then
    resume under torchrun to step 6 with 2 accumulated micro-batches. -> (run_dir, first output, resumed output)."""
    tmp = tmp_path_factory.mktemp("ddp")
    args = [str(ROOT / "train.py"), *TINY, f"task.dataset={tmp}/reach.zarr", f"run_dir={tmp}/run"]
    first = _torchrun(*args, "task.collect=true", "task.demos=2", "train.steps=4", cwd=tmp)
    resumed = _torchrun(*args, "train.steps=6", "resume=true", "train.grad_accum=2", cwd=tmp)  # how fast may change
    return tmp / "run", first, resumed


def test_torchrun_trains_checkpoints_resumes(ddp_run):
    from rtpolicy.checkpoint import load_policy, read_checkpoint

    run_dir, first, resumed = ddp_run
    assert "ranks=2 x batch 4 x accum 1" in first  # the global batch 8 split over 2 ranks
    assert first.count("[rtpolicy] run_dir=") == 1 and first.count("no dataset at") == 1  # rank 0 logs and collects
    assert first.count("trained in") == 1 and resumed.count("trained in") == 1  # the end-of-run line: rank 0's only
    assert "resumed" in resumed and "at step 4" in resumed and "ranks=2 x batch 2 x accum 2" in resumed
    ckpt = run_dir / "checkpoints" / "last.safetensors"
    meta, tensors = read_checkpoint(ckpt)
    assert meta["step"] == 6 and meta["config"]["train"]["batch_size"] == 8
    assert len(list((run_dir / "tb").iterdir())) == 2  # one event file per launch: rank 0's
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last.safetensors"]  # no temporary file left

    policy, _ = load_policy(ckpt)  # a single process loads what the ranks trained
    assert not policy.training
    assert all(torch.equal(v, tensors[f"ema/{k}"]) for k, v in policy.state_dict().items())
    obs = {"state": torch.zeros(1, policy.obs_horizon, *meta["shapes"]["state"])}
    assert policy.predict_chunk(obs).shape == (1, 4, meta["shapes"]["action"][0])


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the worker of local rank ``rank`` among the descendants of torchrun's ``parent`` (None yet),
    read from /proc (each worker's environment holds its LOCAL_RANK)."""
    ppid = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    family, grew = {parent}, True
    while grew:
        grew = False
        for pid, pp in ppid.items():
            if pp in family and pid not in family:
                family.add(pid)
                grew = True
    for pid in sorted(family - {parent}):
        with contextlib.suppress(OSError):
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"LOCAL_RANK={rank}".encode() in env and b"train.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
    return None


def test_killed_rank_fails_the_job(ddp_run, tmp_path):
    """kill -9 of rank 1 while both ranks train: torchrun exits non-zero within seconds naming rank 1 and its
    signal, rank 0 does not wait on its peer (a hung job would meet the 90 s limit here)."""
    import signal
    import time

    reach = ddp_run[0].parent / "reach.zarr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           *TINY, f"task.dataset={reach}", f"run_dir={tmp_path}/run", "train.steps=100000", "train.ckpt_every=100000"]
    env = dict(os.environ, MUJOCO_GL="osmesa", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        lines = []
        for line in proc.stdout:  # rank 0 prints its run line once DDP has wrapped the model: both ranks train
            lines.append(line)
            if "[rtpolicy] run_dir=" in line:
                break
        assert proc.poll() is None, "".join(lines)
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None
        time.sleep(1.0)  # a few steps in
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        out = "".join(lines) + proc.communicate(timeout=90)[0]
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert "ChildFailedError" in out and "train.py FAILED" in out, out[-3000:]
    root = out[out.index("Root Cause"):]
    assert "rank      : 1 (local_rank: 1)" in root and "exitcode  : -9" in root and "SIGKILL" in root, root
    assert took < 60, took
    assert not (tmp_path / "run" / "checkpoints" / "last.safetensors").exists()


def test_batch_split_and_precision_refusals():
    from rtpolicy.distributed import autocast, micro_batch
    from rtpolicy.factory import ConfigError

    assert micro_batch(8, 2, 1) == 4 and micro_batch(8, 2, 2) == 2 and micro_batch(8, 1, 1) == 8
    with pytest.raises(ConfigError, match=r"train.batch_size=9 does not split into 2 processes .* multiple of 2"):
        micro_batch(9, 2, 1)
    with pytest.raises(ConfigError, match=r"train.batch_size=4 .* 2 processes x train.grad_accum=4 .* multiple of 8"):
        micro_batch(4, 2, 4)
    with pytest.raises(ConfigError, match="train.grad_accum must be >= 1"):
        micro_batch(8, 1, 0)
    with pytest.raises(ConfigError, match="train.precision=bf16 autocasts on a CUDA device only"):
        autocast("bf16", torch.device("cpu"))


# -- equivalence: 2 ranks x B/2 == 1 process x B (== 1 process x 2 accumulated micro-batches of B/2) ----------------

B, STEPS, N_WINDOWS = 8, 3, 40


def _windows() -> list[dict]:
    """N_WINDOWS fixed training windows of a 5-D state / 3-D action task, item i drawn from seed i."""
    items = []
    for i in range(N_WINDOWS):
        rng = np.random.default_rng(i)
        items.append({"obs": {"state": torch.from_numpy(rng.normal(size=(2, 5)).astype(np.float32))},
                      "action": torch.from_numpy(rng.uniform(-1, 1, size=(8, 3)).astype(np.float32)),
                      "index": torch.tensor(i)})
    return items


def _train_tiny(dist, world: int, rank: int, accum: int) -> dict[str, torch.Tensor]:
    """STEPS optimizer steps of a tiny diffusion head on the fixed windows; the batches are the ones
    DistributedSampler(seed 0) gives this rank, and each window's diffusion noise is seeded by (step, window),
    so the loss of a batch does not depend on how the global batch is split."""
    from torch.utils.data import DistributedSampler, default_collate

    from rtpolicy.distributed import GradientStep, micro_batch
    from rtpolicy.factory import build_policy, denoiser_config, policy_config

    torch.manual_seed(0)
    pol = policy_config("diffusion", {"horizon": 8, "obs_horizon": 2, "action_horizon": 4, "cond_dim": 16})
    policy = build_policy(pol, denoiser_config("unet1d", {"down_dims": [16, 32]}), {"state": [5], "action": [3]})
    items = _windows()
    policy.normalizer.fit({"state": torch.cat([it["obs"]["state"] for it in items]).numpy(),
                           "action": torch.cat([it["action"] for it in items]).numpy()})
    # SGD: the update is linear in the gradient, so float noise in the all-reduce stays float noise (Adam divides
    # by sqrt(v) and turns a 1e-9 difference of a near-zero gradient into a visible one)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5, momentum=0.9)
    step = [0]

    def seeded_loss(p, batch):
        losses = []
        for j, idx in enumerate(batch["index"].tolist()):
            torch.manual_seed(1000 * step[0] + idx)
            losses.append(p.compute_loss({"obs": {"state": batch["obs"]["state"][j:j + 1]}, "action": batch["action"][j:j + 1]})[0])
        loss = torch.stack(losses).mean()
        return loss, {"loss": loss.item()}

    stepper = GradientStep(policy, optimizer, dist, torch.device("cpu"), grad_clip=1.0, loss_fn=seeded_loss)
    stepper.train()
    micro = micro_batch(B, world, accum)
    order = list(DistributedSampler(items, num_replicas=world, rank=rank, shuffle=True, seed=0))
    for k in range(STEPS):
        step[0] = k
        batches = [default_collate([items[i] for i in order[(k * accum + m) * micro:(k * accum + m + 1) * micro]])
                   for m in range(accum)]
        stepper.step(batches)
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


def _equivalence_rank(rank: int, world: int, port: int, out: Path) -> None:
    """One rank, started as torchrun starts one: its place in the job in the environment."""
    from safetensors.torch import save_file

    from rtpolicy import distributed

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist, _ = distributed.init(torch.device("cpu"), timeout_s=120)
    assert dist.active and dist.world == 2
    params = _train_tiny(dist, dist.world, dist.rank, accum=1)
    if dist.main:
        save_file(params, str(out / "ddp.safetensors"))
        save_file(_train_tiny(distributed.SINGLE, 1, 0, accum=1), str(out / "single.safetensors"))
        save_file(_train_tiny(distributed.SINGLE, 1, 0, accum=2), str(out / "accum.safetensors"))
    else:
        save_file(params, str(out / "ddp_rank1.safetensors"))
    dist.close()


def test_two_ranks_equal_one_process(tmp_path):
    from safetensors.torch import load_file

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # spawned, not forked: a fork of a process whose earlier tests left threads running (OpenMP pools, DDS) can
    # segfault in the child (CI saw both ranks die with SIGSEGV)
    ranks = [multiprocessing.get_context("spawn").Process(target=_equivalence_rank, args=(r, 2, port, tmp_path))
             for r in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=180)
    assert [p.exitcode for p in ranks] == [0, 0]
    ddp, rank1 = load_file(tmp_path / "ddp.safetensors"), load_file(tmp_path / "ddp_rank1.safetensors")
    single, accum = load_file(tmp_path / "single.safetensors"), load_file(tmp_path / "accum.safetensors")
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
        torch.testing.assert_close(accum[k], single[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
        assert torch.equal(rank1[k], ddp[k]), k  # the ranks stay identical
    # the steps moved the weights well beyond the tolerance, so a rank that skipped the gradient average would show
    from rtpolicy.factory import build_policy, denoiser_config, policy_config

    torch.manual_seed(0)
    pol = policy_config("diffusion", {"horizon": 8, "obs_horizon": 2, "action_horizon": 4, "cond_dim": 16})
    init = build_policy(pol, denoiser_config("unet1d", {"down_dims": [16, 32]}), {"state": [5], "action": [3]}).state_dict()
    moved = max(float((single[k] - init[k]).abs().max()) for k in single if not k.startswith("normalizer"))
    assert moved > 1e-3


# -- evaluation on Ray ------------------------------------------------------------------------------------------------


def test_shards_cover_rounds():
    from rtpolicy.evaluation import RolloutPlan
    from rtpolicy.evaluation.ray import _shards

    jobs = [{"name": name, "fields": {"name": name}, "video_dir": None,
             "s": RolloutPlan(episodes=eps, n=n, base_seed=100, max_steps=10, reps=5, n_video=video, To=1, Ha=1)}
            for name, eps, n, video in [("a", 10, 4, 6), ("b", 3, 4, 0)]]
    shards = _shards(jobs, workers=4)
    for name, eps, n in [("a", 10, 4), ("b", 3, 4)]:
        mine = [s for s in shards if s["job"] == name]
        assert [s["first"] for s in mine] == sorted(s["first"] for s in mine) and mine[0]["first"] == 0
        assert sum(s["episodes"] for s in mine) == eps and all(s["first"] % n == 0 and s["plan"]["n"] == n for s in mine)
        assert all(a["first"] + a["episodes"] == b["first"] for a, b in itertools.pairwise(mine))  # contiguous
        assert [s["reps"] for s in mine] == [5] + [1] * (len(mine) - 1)  # latency measured on the first shard
    a = [s for s in shards if s["job"] == "a"]
    assert len(a) == 3 and sum(s["n_video"] for s in a) == 6  # one shard per round, the first 6 episodes filmed


def _frames(path: str) -> np.ndarray:
    import imageio.v2 as imageio

    return np.stack(imageio.mimread(path))


def test_ray_eval_equals_local_runner(ddp_run, tmp_path):
    ray = pytest.importorskip("ray")
    from types import SimpleNamespace

    from rtpolicy.checkpoint import load_policy
    from rtpolicy.evaluation import evaluate
    from rtpolicy.factory import task_config

    run_dir, _, _ = ddp_run
    policy, meta = load_policy(run_dir / "checkpoints" / "last.safetensors")
    task = task_config(meta["config"]["task"])
    base = {"episodes": 2, "num_envs": 1, "seed": 100_000, "max_episode_steps": 8, "video": 2, "latency_reps": 1}
    local = evaluate(policy, task, SimpleNamespace(**base, out=None), video_dir=tmp_path / "local", progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = SimpleNamespace(**base, out=str(tmp_path / "ray.json"), backend="ray", ray_workers=2, ray_address=None,
                              ray_gpus=0.0)
        remote = evaluate(policy, task, cfg, video_dir=tmp_path / "ray", progress=False)
    finally:
        ray.shutdown()
    assert remote["shards"] == 2 and remote["backend"] == "ray"  # one round per worker
    # per episode: same seed, outcome, length and return (the summed dense reward, which moves with every action:
    # another noise seed for the second round gives another return), the second episode played on another worker
    assert remote["per_episode"] == local["per_episode"]
    assert local["per_episode"][0]["return"] != local["per_episode"][1]["return"]
    for key in ("success", "episodes", "successes", "mean_length", "ci95", "seed", "num_envs", "max_episode_steps"):
        assert remote[key] == local[key], key
    # videos: the same names, written by the workers; the first round's frames are equal (later rounds are not
    # compared: a Meta-World renderer's frames depend on what it rendered before, the state does not)
    assert [Path(v).name for v in remote["videos"]] == [Path(v).name for v in local["videos"]] == \
        ["episode_000_seed_100000.mp4", "episode_001_seed_100001.mp4"]
    assert np.array_equal(_frames(remote["videos"][0]), _frames(local["videos"][0]))
    assert len(_frames(remote["videos"][1])) == len(_frames(local["videos"][1])) == 9  # reset + 8 steps
    assert (tmp_path / "ray.json").exists()

