"""Chain-aware CALVIN-like demonstrations: single-task starts plus expert chains cut per subtask, DART labels.

    python -m rtpolicy.envs.calvin_like.demos --out data/calvin_like/calvin_like_rel.zarr \
        --obs-keys state state_rel objects_rel target_rel --task-demos 50 --chains 300 --noise 0.2 --workers 2

One store for the 27-task policy (``task_id`` = index in :data:`TASKS`):

* ``--task-demos`` successful single-task episodes per task (starts from :func:`chains.init_for_task`,
  seeds ``seed, seed + 1, ...`` per task, as ``collect_suite`` draws them);
* ``--chains`` expert 5-chains (seeds ``seed + 1_000_000 + i``), each cut at its subtask switches into
  one episode per completed subtask, labelled with that subtask's id, so later subtasks start where
  the previous ones left the scene (hand height, grip, block yaw) as in the chain evaluation.

Every episode is run by :func:`rtpolicy.datasets.collect.run_expert_episode`: with ``--noise`` the env
executes the expert's action plus Gaussian noise and the store holds the expert's clean action (DART).
Per step the store holds every ``--obs-keys`` key (``rgb_static`` / ``rgb_gripper`` frames of ``--image-size``
included), ``task_id``, ``instruction_id`` and ``action`` (T, 5);
``attrs`` hold the settings and per-task episode counts. Workers split the seeds; the store is written in
job order, so the same arguments give the same store.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from rtpolicy.envs.calvin_like.tasks import TASKS

CHAIN_SEED_OFFSET = 1_000_000
MAX_ATTEMPTS_FACTOR = 3


def _env(name: str, obs_keys: list[str], scene: str, image_size: int = 84):
    from rtpolicy.envs.calvin_like.env import CalvinLikeEnv

    cfg = {"name": name, "obs_keys": obs_keys, "num_tasks": len(TASKS), "image_size": image_size,
           "task_id": TASKS.index(name) if name in TASKS else 0}
    env = CalvinLikeEnv(cfg, seed=0, scene=scene, max_episode_steps=None if name.startswith("chain") else 150)
    return env, env.expert()


def split_subtasks(episode: dict[str, np.ndarray], completed: int) -> list[dict[str, np.ndarray]]:
    """A chain episode {key: (T, ...)} with per-step ``task_id`` -> its first ``completed`` subtasks, one
    episode each (the steps from the subtask's start to its success)."""
    tid = episode["task_id"]
    cuts = [0, *(np.flatnonzero(tid[1:] != tid[:-1]) + 1).tolist(), len(tid)]
    return [{k: v[a:b] for k, v in episode.items()} for a, b in zip(cuts[:completed], cuts[1:completed + 1])]


def _job(args: tuple) -> list[dict[str, np.ndarray]]:
    """(kind, name, seeds, needed, obs_keys, noise, scene) -> successful (sub)task episodes, in seed order."""
    from rtpolicy.datasets.collect import run_expert_episode

    kind, name, seeds, needed, obs_keys, noise, scene, post, image_size = args
    env, expert = _env(name, obs_keys, scene, image_size)
    keep = [*obs_keys, "task_id", "instruction_id", "action"]
    out: list[dict[str, np.ndarray]] = []
    try:
        for seed in seeds:
            if needed is not None and len(out) >= needed:
                break
            episode, success = run_expert_episode(env, expert, int(seed), noise, post if kind == "task" else 0)
            episode = {k: episode[k] for k in keep}
            if kind == "task":
                if success:
                    out.append(episode)
            else:
                out += split_subtasks(episode, int(env.completed))
    finally:
        env.close()
    return out


def collect(path: str | Path, obs_keys: list[str], task_demos: int = 50, chains: int = 0, noise: float = 0.0,
            seed: int = 0, scene: str = "A", workers: int = 1, chain_length: int = 5,
            post_success_steps: int = 0, image_size: int = 84) -> dict[str, Any]:
    """Write the store at ``path`` (replaced if present); returns its attrs plus episodes and steps.
    ``post_success_steps``: each single-task demo goes on for that many expert steps after its success
    (:func:`rtpolicy.datasets.collect.run_expert_episode`); chain subtasks end at their success."""
    from rtpolicy.datasets.replay_buffer import ReplayBuffer

    obs_keys = list(dict.fromkeys(obs_keys))
    if not obs_keys or any(k in ("task_id", "instruction_id") for k in obs_keys):
        raise ValueError(f"--obs-keys must be observation keys of the env (state, state_rel, rgb_static, ...), got {obs_keys}")
    if made := [k for k in obs_keys if k in ("lang_emb", "lang_tokens")]:
        raise ValueError(f"--obs-keys {made[0]!r} is made by a language policy's processor from instruction_id, which every "
                         "store holds; leave it out")
    if task_demos < 0 or chains < 0 or task_demos + chains == 0:
        raise ValueError(f"need task_demos >= 0, chains >= 0 and one of them > 0, got {task_demos}, {chains}")
    if isinstance(post_success_steps, bool) or not isinstance(post_success_steps, int) or post_success_steps < 0:
        raise ValueError(f"post_success_steps must be an int >= 0, got {post_success_steps!r}")
    if not (np.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite float >= 0, got {noise!r}")
    jobs = []
    for t in TASKS if task_demos else []:
        jobs.append(("task", t, list(range(seed, seed + MAX_ATTEMPTS_FACTOR * task_demos)), task_demos, obs_keys, noise, scene,
                     post_success_steps, image_size))
    per_job = 25
    for a in range(0, chains, per_job):
        seeds = list(range(seed + CHAIN_SEED_OFFSET + a, seed + CHAIN_SEED_OFFSET + min(chains, a + per_job)))
        jobs.append(("chain", f"chain{chain_length}", seeds, None, obs_keys, noise, scene, 0, image_size))
    if workers > 1:
        with multiprocessing.get_context("forkserver").Pool(workers) as pool:
            results = pool.map(_job, jobs, chunksize=1)
    else:
        results = [_job(j) for j in jobs]
    for (kind, name, *_), eps in zip(jobs, results):
        if kind == "task" and len(eps) < task_demos:
            raise RuntimeError(f"the expert solved {name} only {len(eps)} times in {MAX_ATTEMPTS_FACTOR * task_demos} attempts")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    buf = ReplayBuffer.create(tmp)
    counts = {t: [0, 0] for t in TASKS}  # [single-task episodes, chain subtasks]
    for (kind, *_), eps in zip(jobs, results):
        for ep in eps:
            buf.add_episode(ep)
            counts[TASKS[int(ep["task_id"][0])]][kind == "chain"] += 1
    attrs = {"collector": "rtpolicy.calvin_like.demos", "env": "calvin_like", "task": "calvin_like", "tasks": list(TASKS),
             "num_tasks": len(TASKS), "obs_keys": [*obs_keys, "task_id"], "action_key": "action",
             "task_demos": task_demos, "chains": chains, "chain_length": chain_length, "action_noise": float(noise),
             "labels": "clean expert actions (DART)", "seed": seed, "scene": scene, "post_success_steps": post_success_steps,
             "image_size": image_size,
             "episodes_per_task": {t: {"single": a, "chain": b} for t, (a, b) in counts.items()}}
    buf.put_attrs(attrs)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    buf = ReplayBuffer.open(path)
    return attrs | {"path": str(path), "episodes": buf.n_episodes, "steps": buf.n_steps}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m rtpolicy.envs.calvin_like.demos", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="zarr store path (replaced)")
    p.add_argument("--obs-keys", nargs="+", default=["state", "state_rel"])
    p.add_argument("--task-demos", type=int, default=50, help="successful single-task episodes per task")
    p.add_argument("--chains", type=int, default=0, help="expert chains, cut into one episode per completed subtask")
    p.add_argument("--chain-length", type=int, default=5)
    p.add_argument("--noise", type=float, default=0.0, help="std of the executed action noise (labels stay clean)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scene", default="A")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--post-success", type=int, default=0, help="expert steps kept after each single-task demo's success")
    p.add_argument("--image-size", type=int, default=84, help="side of the rgb_* frames, when --obs-keys names cameras")
    a = p.parse_args(argv)
    try:
        info = collect(a.out, a.obs_keys, a.task_demos, a.chains, a.noise, a.seed, a.scene, a.workers, a.chain_length,
                       a.post_success, a.image_size)
    except (ValueError, RuntimeError) as e:
        p.exit(2, f"error: {e}\n")
    print(f"{info['episodes']} episodes ({info['steps']} steps) in {info['path']}")
    return info


if __name__ == "__main__":
    main()
