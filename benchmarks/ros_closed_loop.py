"""Closed loop through ROS 2 vs the direct simulator runner: the same policy, task and seeds.

    python benchmarks/ros_closed_loop.py --checkpoint benchmarks/runs/metaworld_tasks/reach/checkpoints/last.safetensors
                                         [--episodes 20] [--seed 100000] [--set sampler=ddim num_inference_steps=10]
                                         [--rate 0] [--out benchmarks/ros_closed_loop.json]

The Done criterion "closed-loop through ROS 2 (two processes, real RMW), a trained policy reaches the
same success on a Meta-World task as the direct simulator runner (within the confidence interval),
over >= 20 episodes". With the checkpoint's policy (inference overrides ``--set``, applied to both):

    direct  ``rtpolicy.evaluation.evaluate`` on seeds S .. S+N-1 (``--num-envs`` simulator processes)
    ros     the policy exported as a bundle; ``rtpolicy sim`` in lock-step (``step_on_command=true``: one
            physics step per command, so wall-clock speed does not change the episode) with the same task,
            ``seed=S`` (episode i uses S + i, as the runner) and ``max_episodes=N``, started first, then
            ``rtpolicy deploy``; both on a private ROS domain with rtpolicy/conf/deploy/metaworld.yaml. The sim's
            ``/rtpolicy/episode`` results are collected until N episodes are done (or ``--timeout``).

Both get a Wilson 95% interval (``wilson_interval``); the table says whether the intervals overlap
and whether the ROS success lies inside the direct interval. The control rate (``--rate``; 0: the
bundle's rate, capped so that one period is ``--rate-margin`` times the policy's batch-1 latency p95
measured here) only sets the wall-clock speed in lock-step, but a chunk that takes longer than a
period loses its first rows (the node's ``dropped_actions``) and one that is later than the queue
lasts gives hold steps (``safety_empty_queue``), both reported with the ROS row: on a loaded machine
raise ``--rate-margin``. Through ROS the policy sees each observation one step later than in the
runner (the command of a tick is out before its observation is taken), every episode starts with a
hold step while its first chunk is computed, and episode 0 may start with a few more while the
policy node discovers the sim's topics (``safety_stale_obs``); a hold step is a zero hand delta.
Rows (``--out``): {mode: direct|ros, task, episodes, success, ci95, mean_length, successes, seed,
head, sampler, steps, per_episode, ...; ros: rate_hz, node: {the node's counters}}. The ROS part takes
about N x mean episode length / rate seconds (a DDPM-100 head on one thread runs at ~1-2 Hz, so 20
reach episodes take ~10-15 min; ``--set sampler=ddim num_inference_steps=10`` is ~10x faster); not
part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "osmesa")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ros_rig import Listener, Proc, child_env, head_label, log_dir, parse_sets, pick_domain_id, wait_until  # noqa: E402

from rtpolicy.checkpoint import load_policy  # noqa: E402
from rtpolicy.config import EvalConfig  # noqa: E402
from rtpolicy.factory import task_config  # noqa: E402
from rtpolicy.envs import suite_members, task_fields  # noqa: E402
from rtpolicy.evaluation import evaluate, wilson_interval  # noqa: E402

NODE_STATS = ("ticks", "chunks", "dropped_actions", "late_chunks", "empty_pops", "holds", "safety_stale_obs",
              "safety_empty_queue", "deadline_misses", "invalid_observations", "inference_ms_p50", "inference_ms_p99",
              "inference_errors")


def latency_p95_ms(policy, shapes: dict, num_tasks: int, reps: int = 10, warmup: int = 3) -> float:
    """Batch-1 predict_chunk latency p95 (ms) on zero observations (the cost does not depend on the values)."""
    obs = {k: torch.zeros(1, policy.obs_horizon, *v) for k, v in shapes.items() if k != "action"}
    if num_tasks:
        obs["task_id"] = torch.zeros(1, dtype=torch.long)
    times = []
    policy.reset()
    with torch.inference_mode():
        for i in range(warmup + reps):
            t0 = time.perf_counter()
            policy.predict_chunk(obs)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    policy.reset()
    return float(np.percentile(times, 95))


def number(text: str) -> int | float | str:
    """A diagnostics value (ints as str(n), floats as f"{x:.3f}") back to a number."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def summary(mode: str, task: str, episodes: list[dict], **extra) -> dict:
    n = len(episodes)
    k = sum(bool(e["success"]) for e in episodes)
    lo, hi = wilson_interval(k, n) if n else (float("nan"), float("nan"))
    return {"mode": mode, "task": task, "episodes": n, "success": k / n if n else float("nan"), "ci95": [lo, hi],
            "mean_length": float(np.mean([e["length"] for e in episodes])) if n else float("nan"), "successes": k, **extra,
            "per_episode": [{key: e[key] for key in ("seed", "success", "length")} for e in episodes]}


def run_ros(args, bundle_dir: Path, fields: dict, rate: float, logs: Path) -> tuple[list[dict], dict, dict]:
    """(episode results in episode order, the node's last diagnostics, extras) of the two-process run."""
    n = args.episodes
    domain = pick_domain_id(args.domain_id)
    env = child_env(domain, args.threads)
    timeout = args.timeout or n * fields["max_episode_steps"] / rate * 1.2 + args.startup_timeout
    print(f"[ros_closed_loop] ros: {fields['name']} seeds {args.seed}..{args.seed + n - 1} in lock-step at {rate:.2f} Hz "
          f"(ROS_DOMAIN_ID={domain}, timeout {timeout:.0f} s); logs: {logs}", flush=True)
    listener = Listener(domain, state_topic="/joint_states")
    procs: list[Proc] = []
    t_start = time.monotonic()
    try:
        # the sim first: the policy node then has the first state before its first tick, so episode 0 starts like the others
        procs.append(Proc("sim", "sim", {"task": fields["name"], "seed": args.seed, "max_episode_steps": fields["max_episode_steps"],
                                         "max_episodes": n, "step_on_command": True, "control_rate_hz": max(rate, 20.0)}, env, logs))
        wait_until(lambda: listener.states > 0, args.startup_timeout, procs, "the sim's first state")
        node = {"bundle": str(bundle_dir.resolve()), "control_rate_hz": rate, "device": args.device,
                "stale_obs_s": max(0.5, 3.0 / rate), "diagnostics_rate_hz": 1.0}
        if fields["num_tasks"]:
            node["task_id"] = fields["task_id"]
        procs.append(Proc("deploy", "deploy", node, env, logs))

        def progress() -> bool:
            done = len(listener.episodes)
            if done != progress.last:
                progress.last = done
                e = listener.episodes[-1]
                print(f"[ros_closed_loop] ros episode {done}/{n}: seed {e['seed']} success {e['success']} length {e['length']}", flush=True)
            return done >= n
        progress.last = 0
        wait_until(progress, timeout, procs, f"{n} episodes")
        time.sleep(1.5)  # one more diagnostics message after the last episode
    finally:
        rcs = {p.name: p.stop() for p in reversed(procs)}
        listener.close()
    diag = listener.last_diag()
    kv = diag[2] if diag else {}
    episodes = sorted(listener.episodes, key=lambda e: e["episode"])[:n]
    seeds = [e["seed"] for e in episodes]
    if seeds != list(range(args.seed, args.seed + n)):
        print(f"warning: the sim ran seeds {seeds}, expected {args.seed}..{args.seed + n - 1}")
    return episodes, kv, {"wall_s": time.monotonic() - t_start, "exit_codes": rcs, "domain_id": domain}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a trained single-task checkpoint (or a suite's with --task)")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--seed", type=int, default=EvalConfig.seed, help="layout seed of the first episode (the runner's eval.seed)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="inference overrides for both modes (JSON values)")
    ap.add_argument("--task", default=None, help="a member task of a suite checkpoint (e.g. reach-v3 of MT10)")
    ap.add_argument("--max-episode-steps", type=int, default=None, help="default: the task's")
    ap.add_argument("--modes", nargs="+", default=["direct", "ros"], choices=["direct", "ros"])
    ap.add_argument("--rate", type=float, default=0.0, help="ROS control rate (Hz); 0: from the latency (see above)")
    ap.add_argument("--rate-margin", type=float, default=3.0, help="rate 0: one period = this x latency p95")
    ap.add_argument("--num-envs", type=int, default=1, help="direct: simulator processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, here and in the policy process; 0: torch's default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timeout", type=float, default=0.0, help="s for the ROS episodes; 0: N x max steps / rate x 1.2 + --startup-timeout")
    ap.add_argument("--startup-timeout", type=float, default=180.0)
    ap.add_argument("--domain-id", type=int, default=None)
    ap.add_argument("--bundle-out", default=None, help="where to write the bundle (default: a temporary folder)")
    ap.add_argument("--log-dir", default=None, help="keep the two processes' logs here (default: temporary)")
    ap.add_argument("--out", default="benchmarks/ros_closed_loop.json")
    args = ap.parse_args()
    if args.episodes < 1:
        ap.error("--episodes must be >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    over = parse_sets(args.set)

    policy, meta = load_policy(args.checkpoint, args.device, over)
    task_cfg = task_config(meta["config"]["task"])
    members = suite_members(task_cfg)
    if members:
        by_name = {m["name"]: m for m in members}
        if args.task not in by_name:
            ap.error(f"{args.checkpoint} is a suite checkpoint: pick one task with --task, one of {list(by_name)}")
        fields = by_name[args.task]
    else:
        fields = task_fields(task_cfg)
        if args.task and args.task != fields["name"]:
            ap.error(f"the checkpoint is for {fields['name']}, not {args.task}")
    if args.max_episode_steps:
        fields["max_episode_steps"] = args.max_episode_steps
    head, sampler, steps = head_label(dict(meta["config"]["policy"]) | over)
    common = {"head": head, "sampler": sampler, "steps": steps, "seed": args.seed, "overrides": over, "checkpoint": args.checkpoint}
    print(f"[ros_closed_loop] {args.checkpoint}: {head} {sampler}-{steps} on {fields['name']}, {args.episodes} episodes "
          f"from seed {args.seed}, {args.threads} torch thread(s)", flush=True)

    rows = []
    if "direct" in args.modes:
        ecfg = EvalConfig(episodes=args.episodes, num_envs=args.num_envs, seed=args.seed,
                          max_episode_steps=fields["max_episode_steps"], latency_reps=10)
        res = evaluate(policy, fields, ecfg, device=args.device, progress=False)
        rows.append(summary("direct", fields["name"], res["per_episode"], **common, chunk_ms_p50=res["chunk_ms_p50"],
                            chunk_ms_p95=res["chunk_ms_p95"], wall_s=res["wall_s"]))
        print(f"[ros_closed_loop] direct: {rows[-1]['successes']}/{args.episodes} in {res['wall_s']:.0f} s", flush=True)
    if "ros" in args.modes:
        from rtpolicy.deploy.export import export_bundle

        logs, logs_tmp = log_dir(args.log_dir)
        p95 = latency_p95_ms(policy, meta["shapes"], fields["num_tasks"])
        bundle_dir = export_bundle(args.checkpoint, Path(args.bundle_out) if args.bundle_out else logs / "bundle", over)
        bundle_rate = float(json.loads((bundle_dir / "bundle.json").read_text())["control_rate_hz"])
        rate = args.rate or min(bundle_rate, 1000.0 / (args.rate_margin * p95))
        del policy  # the policy process has its own copy
        episodes, kv, extra = run_ros(args, bundle_dir, fields, rate, logs)
        node = {k: number(kv[k]) for k in NODE_STATS if k in kv}
        rows.append(summary("ros", fields["name"], episodes, **common, rate_hz=rate, latency_p95_ms_here=p95, node=node, **extra))
        if logs_tmp is not None:
            logs_tmp.cleanup()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))

    print(f"\n{'mode':7s} {'task':18s} {'head':20s} {'episodes':>8s} {'success':>8s} {'ci95':>14s} {'mean_len':>8s}  notes")
    for r in rows:
        notes = "" if r["mode"] == "direct" else (
            f"{r['rate_hz']:.2f} Hz; node: dropped actions {r['node'].get('dropped_actions', '?')}, late chunks "
            f"{r['node'].get('late_chunks', '?')}, holds {r['node'].get('holds', '?')} (empty queue "
            f"{r['node'].get('safety_empty_queue', '?')}, no/stale obs {r['node'].get('safety_stale_obs', '?')})")
        name = f"{r['head']}/{r['sampler']}-{r['steps']}"
        ci = f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"
        print(f"{r['mode']:7s} {r['task']:18s} {name:20s} {r['episodes']:8d} {r['success']:8.2f} {ci:>14s} "
              f"{r['mean_length']:8.1f}  {notes}")
    if len(rows) == 2 and rows[1]["episodes"]:
        (d_lo, d_hi), (r_lo, r_hi) = rows[0]["ci95"], rows[1]["ci95"]
        overlap = d_lo <= r_hi and r_lo <= d_hi
        inside = d_lo <= rows[1]["success"] <= d_hi
        same = sum(a["success"] == b["success"] for a, b in zip(rows[0]["per_episode"], rows[1]["per_episode"]) if a["seed"] == b["seed"])
        print(f"95% intervals overlap: {'yes' if overlap else 'NO'}; ROS success inside the direct interval: {'yes' if inside else 'NO'}; "
              f"same outcome on {same}/{min(len(rows[0]['per_episode']), len(rows[1]['per_episode']))} seeds")
        empty = rows[1]["node"].get("safety_empty_queue", 0)
        if isinstance(empty, int) and empty > rows[1]["episodes"] + 2:  # one hold per episode start is by design
            print(f"warning: {empty} empty-queue hold steps in {rows[1]['episodes']} ROS episodes (one per episode start is expected): "
                  f"chunks came later than the queue lasted at {rows[1]['rate_hz']:.2f} Hz on this machine; lower --rate or raise "
                  f"--rate-margin for a like-for-like comparison")
        if rows[1]["episodes"] < args.episodes:
            print(f"warning: only {rows[1]['episodes']}/{args.episodes} ROS episodes finished")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
