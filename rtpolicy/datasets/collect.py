"""Scripted-expert demonstrations into a zarr replay buffer.

    python -m rtpolicy.datasets.collect --task pick-place-v3 --episodes 50 --out data/metaworld/pick-place-v3.zarr

Envs with instructions (the CALVIN-style family) also get ``attrs["instructions"]``: the instruction
text of each stored episode (and ``data/instruction_id`` per step). Per step the store holds ``data/state`` (T, 39) float32 (the observation the action was chosen from)
and ``data/action`` (T, 4) float32 (the expert's clipped action; with noise, its clean label: DART), plus ``data/task_id`` (T,) int64 for
multi-task configs, plus ``data/rgb_<camera>`` (T, S, S, 3) uint8 frames (chunked a few steps at a time)
for every ``rgb_<camera>`` key in the task's ``obs_keys`` (S = ``image_size``).
Only successful episodes are kept; an episode ends at its first success step.
Episode ``k`` of a store (counting failed attempts) uses layout seed ``seed + k``, and its action
noise comes from an RNG seeded by that layout seed, so the same arguments give identical stores.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from rtpolicy.errors import run_cli
from rtpolicy.datasets.replay_buffer import ReplayBuffer, ReplayBufferError
from rtpolicy.envs import make_env, suite_members, task_fields

MAX_ATTEMPTS_FACTOR = 3  # give up after this many attempts per missing success


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def run_expert_episode(env, expert, seed: int, action_noise: float = 0.0,
                       post_success_steps: int = 0) -> tuple[dict[str, np.ndarray], bool]:
    """One expert episode on the layout of ``seed`` -> ({"state": (T, Ds), "action": (T, Da), ...}, success).

    With ``action_noise`` the env executes the expert's action plus Gaussian noise while the stored
    ``action`` is the expert's clean action from the observation it saw (DART: the demos then hold the
    expert's corrections from the states the noise led to, not the noise). An env whose action dims are not
    in comparable units gives ``action_noise_scale`` (Da,): the per-dim std of noise 1.0 (e.g. robosuite's
    absolute targets: metres and rotation columns scaled so that the noise means what it does for deltas).

    ``post_success_steps`` > 0 (envs with ``resume_after_success``, e.g. calvin_like): a solved episode goes on
    for up to that many more expert steps. A chunked head's windows never condition on an episode's last
    H - Ha - To + 1 steps (the streaming head's pad to every step), so without them the state in which the expert
    lets go of a block (the last step or two of a rotate or place demo) is never a chunked head's training input."""
    rng = np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high  # the env's action bounds (most: [-1, 1])
    scale = np.broadcast_to(np.asarray(getattr(env, "action_noise_scale", 1.0), np.float64), low.shape)
    obs, _ = env.reset(seed=seed)
    steps: dict[str, list[np.ndarray]] = {key: [] for key in obs}
    steps["action"] = []
    terminated = truncated = False
    solved, extra = False, int(post_success_steps)
    if extra and not hasattr(env, "resume_after_success"):
        raise ValueError(f"post_success_steps={extra}: {type(env).__name__} cannot go on after a success (no resume_after_success)")
    while True:
        if terminated and extra > 0 and not truncated:
            solved = True  # keep going (the post-success steps are counted from the first success on)
            env.resume_after_success()
            terminated = False
        if solved:
            if extra == 0:
                break
            extra -= 1
        if terminated or truncated:
            break
        label = np.clip(expert(obs), low, high).astype(np.float32)
        action = label
        if action_noise > 0:
            action = np.clip(label + scale * rng.normal(0.0, action_noise, size=label.shape), low, high).astype(np.float32)
        for key, value in obs.items():
            steps[key].append(value)
        steps["action"].append(label)
        obs, _, terminated, truncated, _ = env.step(action)
    episode = {key: np.stack(values) for key, values in steps.items()}
    return episode, bool(terminated or solved)


def collect_demos(
    task_cfg: Any,
    path: str | Path,
    episodes: int,
    seed: int,
    action_noise: float = 0.0,
    progress: bool = True,
    max_episode_steps: int | None = None,
    post_success_steps: int = 0,
) -> dict[str, Any]:
    """Collect ``episodes`` successful scripted-expert episodes of ``task_cfg`` into the replay buffer at ``path``.

    An existing store with >= ``episodes`` episodes is left as is; one with fewer gets the remainder,
    from the next unused seeds (its recorded ``next_seed``), with its own recorded action noise.
    Raises RuntimeError when fewer than ``episodes`` succeed within 3x as many attempts (the
    episodes collected so far stay in the store). ``post_success_steps``: each episode goes on for that many
    expert steps after its first success (:func:`run_expert_episode`); a store is only extended with its own.
    Returns the store's attrs plus ``path``, ``episodes``, ``steps`` and ``new_episodes``.
    """
    fields = task_fields(task_cfg)
    episodes = _check_int("episodes", episodes, 1)
    seed = _check_int("seed", seed, 0)
    action_noise = float(action_noise)
    if not math.isfinite(action_noise) or action_noise < 0:
        raise ValueError(f"action_noise must be a finite float >= 0, got {action_noise!r}")
    steps_limit = _check_int("max_episode_steps", max_episode_steps or fields["max_episode_steps"], 1)
    post = _check_int("post_success_steps", post_success_steps, 0)

    # validates the task before touching the store; the env renders the cameras its obs_keys name
    env = make_env(fields, seed=seed, max_episode_steps=steps_limit)
    if post and not hasattr(env, "resume_after_success"):
        env.close()
        raise ValueError(f"post_success_steps={post}: {fields['env']} episodes cannot go on after a success")
    try:
        return _collect(env, fields, Path(path), episodes, seed, action_noise, steps_limit, progress, post)
    finally:
        env.close()


def _store_info(buf: ReplayBuffer, path: Path, new: int) -> dict[str, Any]:
    """The store's attrs plus ``path``, ``episodes``, ``steps`` and ``new_episodes`` (added by this call)."""
    return dict(buf.attrs) | {"path": str(path), "episodes": buf.n_episodes, "steps": buf.n_steps, "new_episodes": new}


def _reconcile(attrs: dict[str, Any], n_episodes: int, path: Path) -> dict[str, Any]:
    """The bookkeeping of a store whose writer may have been killed between an episode's attrs and its
    commit (attrs list one seed more than the store holds: that episode was never committed, so its seed is
    collected again) or, in stores written before attrs and episode committed together, between the commit
    and the attrs (one seed fewer: the committed episode used ``next_seed``). Anything else is refused."""
    seeds = list(attrs.get("seeds", []))
    per_episode = [k for k in ("seeds", "instructions") if k in attrs]
    if len(seeds) == n_episodes + 1:
        lost = seeds[-1]
        attrs = attrs | {k: list(attrs[k])[:n_episodes] for k in per_episode}
        attrs |= {"next_seed": lost, "successes": n_episodes, "attempts": max(0, int(attrs.get("attempts", 1)) - 1)}
        print(f"[rtpolicy] {path}: the episode of seed {lost} was not committed (an interrupted write); collecting it again")
    elif len(seeds) == n_episodes - 1 and "instructions" not in attrs:
        used = int(attrs["next_seed"])
        attrs = attrs | {"seeds": seeds + [used], "next_seed": used + 1, "successes": n_episodes,
                         "attempts": int(attrs.get("attempts", 0)) + 1}
        print(f"[rtpolicy] {path}: the last committed episode (seed {used}) was missing from the attrs; recorded it")
    elif len(seeds) != n_episodes:
        raise ReplayBufferError(f"{path}: attrs list {len(seeds)} seeds for {n_episodes} episodes; "
                         "cannot tell which seeds are used; choose another path")
    return attrs


def _collect(env, fields, path, episodes, seed, action_noise, steps_limit, progress, post=0) -> dict[str, Any]:
    buf = ReplayBuffer.open_or_create(path)
    attrs = json.loads(json.dumps(dict(buf.attrs)))  # a deep copy: never shares lists with zarr's cached metadata
    frames = {k: tuple(s.shape) for k, s in env.observation_space.spaces.items() if len(s.shape) == 3}  # camera keys
    if buf.n_episodes > 0:
        if missing := [k for k in frames if k not in buf.keys]:
            raise ReplayBufferError(f"{path} has no {missing} (its keys: {buf.keys}); collect camera frames into another task.dataset")
        if wrong := [k for k, shape in frames.items() if buf.shape(k) != shape]:
            raise ReplayBufferError(f"{path} holds {wrong[0]} frames of {buf.shape(wrong[0])}, not image_size={frames[wrong[0]][0]}")
        if attrs.get("collector") != "rtpolicy.collect_demos":
            raise ReplayBufferError(
                f"{path} holds {buf.n_episodes} episodes not written by collect_demos (no collector attrs); "
                "refusing to append expert demos of unknown seeds to it; choose another path"
            )
        stored = (attrs.get("env"), attrs.get("task"))
        if stored != (fields["env"], fields["name"]):
            raise ReplayBufferError(f"{path} holds demos of {stored[0]}/{stored[1]}, not {fields['env']}/{fields['name']}")
        if float(attrs.get("action_noise", 0.0)) != action_noise:
            raise ReplayBufferError(
                f"{path} was collected with action_noise={attrs.get('action_noise')}, not {action_noise}; "
                "use the same noise to extend it, or another path"
            )
        if int(attrs.get("post_success_steps", 0)) != post:
            raise ReplayBufferError(
                f"{path} was collected with post_success_steps={attrs.get('post_success_steps', 0)}, not {post}; "
                "use the same value to extend it, or another path"
            )
        attrs = _reconcile(attrs, buf.n_episodes, path)
    else:
        attrs = {
            "collector": "rtpolicy.collect_demos",
            "env": fields["env"],
            "task": fields["name"],
            "num_tasks": fields["num_tasks"],
            "seed": seed,
            "next_seed": seed,
            "action_noise": action_noise,
            "max_episode_steps": steps_limit,
            "post_success_steps": post,
            "env_kwargs": fields["env_kwargs"],  # e.g. robosuite's action_mode (what the actions mean)
            "obs_keys": ["state"] + [k for k in env.observation_space.spaces if k not in ("state", "task_id")]
            + (["task_id"] if fields["num_tasks"] > 0 else []),
            "action_key": "action",
            "seeds": [],
            "failed_seeds": [],
            "attempts": 0,
            "successes": 0,
        }
        attrs |= json.loads(json.dumps(getattr(env, "store_attrs", {})))  # env metadata, e.g. robosuite's fps and env_args
        buf.put_attrs(attrs)

    missing = episodes - buf.n_episodes
    if missing <= 0:
        return _store_info(buf, path, 0)

    expert = env.expert()
    cap = MAX_ATTEMPTS_FACTOR * missing
    added = attempts = 0
    bar = tqdm(total=episodes, initial=buf.n_episodes, desc=f"collect {fields['name']}", unit="ep", disable=not progress)
    try:
        while added < missing:
            if attempts >= cap:
                raise RuntimeError(
                    f"the scripted expert succeeded in only {added} of {attempts} attempts on {fields['name']} "
                    f"(action_noise={action_noise}, max_episode_steps={steps_limit}); {buf.n_episodes} of {episodes} "
                    f"episodes are in {path}. Lower the action noise or raise max_episode_steps."
                )
            ep_seed = int(attrs["next_seed"])
            episode, success = run_expert_episode(env, expert, ep_seed, action_noise, post)
            attempts += 1
            attrs["next_seed"] = ep_seed + 1
            attrs["attempts"] += 1
            if success:
                attrs["seeds"].append(ep_seed)
                if hasattr(env, "instruction"):  # language-annotated envs: the episode's instruction text
                    attrs.setdefault("instructions", []).append(str(env.instruction))
                attrs["successes"] += 1
                buf.add_episode(episode, attrs=attrs)  # the episode and its bookkeeping commit together
                added += 1
                bar.update(1)
            else:
                attrs["failed_seeds"].append(ep_seed)
                buf.put_attrs(attrs)
            bar.set_postfix(success_rate=f"{attrs['successes'] / max(1, attrs['attempts']):.2f}")
    finally:
        bar.close()
    return _store_info(buf, path, added)


def collect_suite(task_cfg: Any, path: str | Path, episodes: int, seed: int, action_noise: float = 0.0,
                  progress: bool = True, post_success_steps: int = 0) -> dict[str, Any]:
    """Demos of every member of a suite (``task_cfg.tasks``, e.g. MT10) into one store at ``path``.

    Each member is collected (``episodes`` each, resumable) into its own store under
    ``<path>.parts/<task>.zarr`` with ``data/task_id`` = its index; the suite store is then written
    from them into a temporary folder and moved into place, so ``path`` is either complete or absent.
    """
    members = suite_members(task_cfg)
    if not members:
        raise ValueError("collect_suite needs a task config with a non-empty 'tasks' list")
    path = Path(path)
    names = [m["name"] for m in members]
    if path.exists():
        buf = ReplayBuffer.open(path)
        if (buf.attrs.get("tasks") == names and buf.n_episodes >= episodes * len(names)
                and int(buf.attrs.get("post_success_steps", 0)) == post_success_steps):
            return _store_info(buf, path, 0)
        raise ValueError(f"{path} exists but is not a complete suite store of {names} with {episodes} episodes each "
                         f"and post_success_steps={post_success_steps}; move it away or choose another task.dataset")
    parts = path.with_name(path.name + ".parts")
    sources = [collect_demos(m, parts / f"{m['name']}.zarr", episodes, seed, action_noise, progress,
                             post_success_steps=post_success_steps) for m in members]
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    out = ReplayBuffer.create(tmp)
    instructions: list[str] = []
    for src in sources:
        buf = ReplayBuffer.open(src["path"])
        for i in range(episodes):
            out.add_episode(buf.get_episode(i))
        instructions += list(buf.attrs.get("instructions", []))[:episodes]
    out.attrs.update({"collector": "rtpolicy.collect_suite", "env": members[0]["env"], "task": task_fields(task_cfg)["name"],
                      "tasks": names, "num_tasks": len(names), "episodes_per_task": episodes, "seed": seed,
                      "action_noise": float(action_noise), "post_success_steps": int(post_success_steps), "action_key": "action",
                      "obs_keys": list(dict.fromkeys([*sources[0]["obs_keys"], "task_id"]))}
                     | ({"instructions": instructions} if len(instructions) == out.n_episodes else {}))
    tmp.rename(path)
    buf = ReplayBuffer.open(path)
    return _store_info(buf, path, buf.n_episodes)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from rtpolicy.config import TaskConfig

    parser = argparse.ArgumentParser(prog="python -m rtpolicy.datasets.collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, help="task name, e.g. pick-place-v3")
    parser.add_argument("--env", default="metaworld", help="environment family (default: metaworld)")
    parser.add_argument("--episodes", type=int, default=50, help="successful episodes to have in the store")
    parser.add_argument("--out", default=None, help="zarr store path (default: data/<env>/<task>.zarr)")
    parser.add_argument("--seed", type=int, default=0, help="first layout seed")
    parser.add_argument("--noise", type=float, default=0.0, help="std of Gaussian noise added to expert actions")
    parser.add_argument("--max-steps", type=int, default=200, help="episode step limit")
    parser.add_argument("--post-success", type=int, default=0, help="expert steps kept after each episode's first success")
    parser.add_argument("--cameras", nargs="*", default=[], help="also store rgb_<camera> frames, e.g. corner topview")
    parser.add_argument("--image-size", type=int, default=84, help="side of the stored camera frames")
    parser.add_argument("--env-kwarg", action="append", default=[], metavar="KEY=VALUE",
                        help="an env constructor argument (task.env_kwargs), e.g. action_mode=absolute (robosuite)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    out = args.out or f"data/{args.env}/{args.task}.zarr"
    env_kwargs = {}
    for item in args.env_kwarg:
        key, eq, value = item.partition("=")
        if not key or not eq:
            parser.exit(2, f"error: --env-kwarg {item!r}: expected KEY=VALUE\n")
        try:
            env_kwargs[key] = json.loads(value)  # numbers, true/false, lists; anything else is a string
        except json.JSONDecodeError:
            env_kwargs[key] = value
    task = TaskConfig(env=args.env, name=args.task, max_episode_steps=args.max_steps, env_kwargs=env_kwargs,
                      obs_keys=["state", *(f"rgb_{c}" for c in args.cameras)], image_size=args.image_size)
    try:
        result = collect_demos(task, out, args.episodes, args.seed, action_noise=args.noise, progress=not args.no_progress,
                               post_success_steps=args.post_success)
    except (ValueError, RuntimeError) as e:
        parser.exit(2, f"error: {e}\n")
    print(
        f"{result['episodes']} episodes ({result['steps']} steps) of {result['task']} in {out}; "
        f"added {result['new_episodes']}; expert success {result['successes']}/{result['attempts']} attempts"
    )
    return result


def cli() -> None:
    """Console-script entry point: expected errors are one line and exit 2 (``--traceback`` keeps it)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
