"""The deployed control loop over ROS 2: rate, jitter, inference latency and misses of the policy node.

    python benchmarks/control_loop.py --checkpoint benchmarks/runs/metaworld_tasks/reach/checkpoints/last.safetensors
                                      [--set num_inference_steps=1 ...] [--rate 50] [--seconds 60] [--out benchmarks/control_loop.json]
    python benchmarks/control_loop.py --bundle bundles/reach [--rate 50] [--seconds 60] [--append]
    python benchmarks/control_loop.py --bundle bundles/reach --sensor-rate 2000 [--seconds 30]   # flood, side by side

Two processes over the real RMW on a private ROS domain (``ROS_DOMAIN_ID``, random unless
``--domain-id``), both with rtpolicy/conf/deploy/metaworld.yaml: ``rtpolicy sim`` free-running
(``step_on_command=false``: physics on its own timer at ``--rate``, the latest command held) and
``rtpolicy deploy`` at ``control_rate_hz = --rate``. With ``--checkpoint`` the bundle is exported
first (into a temporary folder, or ``--bundle-out``) with the inference overrides of ``--set``; without
``--set``, the head's fastest setting (``FASTEST``: truncated 1 step, streaming 1 step per tick,
DDIM-10, DPM-Solver++(2M)-3); ``--set`` with no values keeps the checkpoint's own. A listener node in
this process records the command arrival times and ``/diagnostics``.

Measured over a window of ``--seconds`` that starts ``--warmup`` s after the first chunk, between two
diagnostics messages (``--diagnostics-rate`` Hz): counters (ticks, deadline misses, dropped actions,
late chunks, empty pops, holds, safety interventions) are the differences across the window and the
achieved rate is ticks / node-clock time. The node's own figures at the window's end (over its last
2000 ticks / chunk calls): ``jitter_ms_*`` = |tick-to-tick interval - 1/rate| (diagnostics
``tick_period_jitter_ms_*``), ``lateness_ms_*`` = tick time - its slot t0 + k/rate (``tick_jitter_ms_*``;
after a tick late by more than half a period the node's k runs ahead of the clock, and this drops by
one period), inference latency p50/p95/p99. At the listener: ``cmd_jitter_ms_*`` = |inter-arrival -
1/rate| of the twist (or joint command) messages, which adds the transport and this process's
scheduling; ``stamp_jitter_ms_*`` the same from the twists' header stamps (the node's publish times),
exactly over the window.
The machine's load average is recorded with each row: on a shared machine the jitter is the machine's.

``--sensor-rate HZ``: the same run then measures a second window of ``--seconds`` right after the first,
with a third process republishing the sim's latest JointState on /joint_states at HZ (a sensor flood;
its achieved rate is in the row). Both rows carry ``sensor_rate_hz`` and the figures that compare them:
``empty_queue_share`` (empty-queue holds / ticks over the window) and ``window_inference_ms_*`` (every
inference latency of the window, from the diagnostics' ``inference_ms_recent``; the node's own
``inference_ms_*`` cover its last 2000 calls, which may reach back into the other window).
``--backend ort`` runs the bundle's ONNX graphs in ONNX Runtime in the node (``backend: ort``,
``--ort-threads`` intra-op threads, ``--ort-spinning`` lets its worker threads spin between calls; a
``--checkpoint`` is then exported with ``--onnx``). ``--beside-train`` starts one training process
(``train.py task=mt10 policy=truncated train.threads=1``, 1 OMP thread, its own process group, killed
after the run) ``--warmup`` s before the window, to show what a busy robot computer does to the loop.
``--task-id`` picks the task of a multi-task bundle (the node's ``task_id``; e.g. 0 = reach-v3 of MT10).
Rows (``--out``; ``--append`` adds to the file): rate_hz_target, rate_hz_achieved, cmd_rate_hz,
jitter_ms_p50/p99, lateness_ms_p50/p99, cmd_jitter_ms_p50/p99, stamp_jitter_ms_p50/p99,
inference_ms_p50/p95/p99, deadline_misses, dropped_actions, late_chunks, empty_pops, chunks, holds,
safety ({kind: count}), safety_interventions, episodes, successes, seconds, head, sampler, steps, ...
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "osmesa")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
from ros_rig import Listener, Proc, child_env, head_label, log_dir, parse_sets, pick_domain_id, wait_until  # noqa: E402

# head -> its fastest inference setting (as in benchmarks/latency.py)
FASTEST = {
    "truncated": {"num_inference_steps": 1},
    "streaming": {"steps_per_tick": 1},
    "diffusion": {"sampler": "ddim", "num_inference_steps": 10},
    "edm": {"sampler": "dpmpp_2m", "num_inference_steps": 3},
}
COUNTERS = ("ticks", "deadline_misses", "chunks", "dropped_actions", "late_chunks", "empty_pops", "holds",
            "inference_calls", "inference_errors", "invalid_observations", "tick_errors", "sensor_msgs")


def flood_main(rate: float, topic: str) -> None:
    """Child process (``--flood-child``): republish the latest JointState heard on ``topic`` at ``rate`` Hz, in
    batches every 5 ms, until SIGINT; prints ``flood: N messages in S s``."""
    import threading

    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import qos_profile_sensor_data
    from rclpy.signals import SignalHandlerOptions
    from sensor_msgs.msg import JointState

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node("rtpolicy_benchmark_flood")
    latest: dict[str, JointState] = {}
    node.create_subscription(JointState, topic, lambda m: latest.__setitem__("msg", m), qos_profile_sensor_data)
    pub = node.create_publisher(JointState, topic, qos_profile_sensor_data)
    executor = SingleThreadedExecutor()
    executor.add_node(node)

    def spin() -> None:
        while not stop.is_set():
            executor.spin_once(timeout_sec=0.05)

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    sent, t0 = 0, None
    while not stop.is_set():
        msg = latest.get("msg")
        if msg is not None:
            t0 = time.monotonic() if t0 is None else t0
            due = int((time.monotonic() - t0) * rate)
            for _ in range(due - sent):
                pub.publish(msg)
            sent = max(sent, due)
        stop.wait(0.005)
    took = time.monotonic() - t0 if t0 is not None else 0.0
    print(f"flood: {sent} messages in {took:.2f} s", flush=True)
    thread.join(2)
    executor.shutdown()
    node.destroy_node()
    rclpy.try_shutdown()


def export(checkpoint: str, sets: list[str] | None, out: Path, onnx: bool = False) -> Path:
    from rtpolicy.checkpoint import read_checkpoint
    from rtpolicy.deploy.export import export_bundle

    head = read_checkpoint(checkpoint)[0]["config"]["policy"]["name"]
    over = FASTEST.get(head, {}) if sets is None else parse_sets(sets)
    print(f"[control_loop] exporting {checkpoint} ({head}, overrides {over}) -> {out}", flush=True)
    return export_bundle(checkpoint, out, over, onnx=onnx)


def num(kv: dict[str, str], key: str) -> float:
    v = kv.get(key)
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def pct(xs, q) -> float:
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def make_row(listener, args, period, bundle_dir, head, sampler, steps, task, rcs, load_before, load_after,
             sensor_rate, d0, d1, flood_out) -> dict:
    """One window (between diagnostics d0 and d1) as a row."""
    (a0, s0, kv0), (a1, s1, kv1) = d0, d1
    cmd_key = "twist" if listener.commands["twist"] else "command"
    arrivals = np.array([t for t in listener.commands[cmd_key] if a0 <= t <= a1])
    intervals = np.diff(arrivals)
    cmd_jitter = np.abs(intervals - period) * 1e3
    stamps = np.array([s for t, s in zip(listener.commands[cmd_key], listener.stamps[cmd_key]) if a0 <= t <= a1])
    stamp_jitter = np.abs(np.diff(stamps) - period) * 1e3  # the node's tick-to-tick period jitter, as stamped at publish
    delta = {k: int(d) if np.isfinite(d := num(kv1, k) - num(kv0, k)) else -1 for k in COUNTERS}  # -1: not reported
    safety = {k[len("safety_"):]: int(num(kv1, k) - num(kv0, k)) for k in kv1 if k.startswith("safety_")}
    episodes = [e for e in listener.episodes if a0 <= e["arrival"] <= a1]
    with listener.lock:  # every inference latency reported after d0, up to d1
        lat = [float(x) for t, _, kv in listener.diagnostics if a0 < t <= a1
               for x in kv.get("inference_ms_recent", "").split(",") if x]
    flood = next((line.split() for line in flood_out.splitlines() if line.startswith("flood: ")), [])
    window = s1 - s0
    return {
        "head": head, "sampler": sampler, "steps": steps, "task": task, "bundle": str(bundle_dir),
        "sensor_rate_hz": sensor_rate,
        "flood_rate_hz": int(flood[1]) / float(flood[4]) if len(flood) >= 5 and float(flood[4]) > 0 else float("nan"),
        "rate_hz_target": args.rate,
        "rate_hz_achieved": delta["ticks"] / window if window > 0 else float("nan"),
        "cmd_rate_hz": len(intervals) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else float("nan"),
        "jitter_ms_p50": num(kv1, "tick_period_jitter_ms_p50"), "jitter_ms_p99": num(kv1, "tick_period_jitter_ms_p99"),
        "lateness_ms_p50": num(kv1, "tick_jitter_ms_p50"), "lateness_ms_p99": num(kv1, "tick_jitter_ms_p99"),
        "cmd_jitter_ms_p50": pct(cmd_jitter, 50), "cmd_jitter_ms_p99": pct(cmd_jitter, 99),
        "stamp_jitter_ms_p50": pct(stamp_jitter, 50), "stamp_jitter_ms_p99": pct(stamp_jitter, 99),
        "cmd_interval_ms_max": float(intervals.max() * 1e3) if len(intervals) else float("nan"),
        "tick_ms_p99": num(kv1, "tick_ms_p99"),
        "inference_ms_p50": num(kv1, "inference_ms_p50"), "inference_ms_p95": num(kv1, "inference_ms_p95"),
        "inference_ms_p99": num(kv1, "inference_ms_p99"),
        "window_inference_ms_p50": pct(lat, 50), "window_inference_ms_p99": pct(lat, 99), "window_inference_calls": len(lat),
        "empty_queue_share": safety.get("empty_queue", 0) / delta["ticks"] if delta["ticks"] > 0 else float("nan"),
        **delta,
        "safety": safety, "safety_interventions": sum(safety.values()),
        "episodes": len(episodes), "successes": sum(bool(e["success"]) for e in episodes),
        "seconds": window, "commands": int(len(arrivals)),
        "threads": args.threads, "device": args.device, "blend": args.blend, "cpus": os.cpu_count(),
        "backend": args.backend, **({"ort_threads": args.ort_threads, "ort_spinning": args.ort_spinning} if args.backend == "ort" else {}),
        "beside": "train.py 1 thread" if args.beside_train else "none",
        "loadavg_1min": [round(load_before[0], 2), round(load_after[0], 2)], "exit_codes": rcs,
    }


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--flood-child":  # the flooding process of --sensor-rate
        return flood_main(float(sys.argv[2]), sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", help="a policy bundle folder (rtpolicy.deploy.export)")
    src.add_argument("--checkpoint", help="a training checkpoint: exported to a bundle first")
    ap.add_argument("--set", nargs="*", default=None, metavar="KEY=VALUE",
                    help="--checkpoint: inference overrides (JSON values); default: the head's fastest; no values: none")
    ap.add_argument("--bundle-out", default=None, help="--checkpoint: where to write the bundle (default: a temporary folder)")
    ap.add_argument("--rate", type=float, default=50.0, help="control rate of the node and of the free-running sim (Hz)")
    ap.add_argument("--seconds", type=float, default=60.0, help="measured window (s)")
    ap.add_argument("--warmup", type=float, default=5.0, help="s after the first chunk before the window starts")
    ap.add_argument("--task", default=None, help="sim task (default: the bundle's)")
    ap.add_argument("--seed", type=int, default=0, help="sim layout seed of the first episode")
    ap.add_argument("--max-episode-steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the policy process (OMP_NUM_THREADS); 0: torch's default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--blend", default="latest", help="latest | ensemble | rtc")
    ap.add_argument("--diagnostics-rate", type=float, default=2.0, help="Hz")
    ap.add_argument("--startup-timeout", type=float, default=180.0, help="s to wait for the first chunk")
    ap.add_argument("--domain-id", type=int, default=None)
    ap.add_argument("--log-dir", default=None, help="keep the two processes' logs here (default: temporary)")
    ap.add_argument("--out", default="benchmarks/control_loop.json")
    ap.add_argument("--append", action="store_true", help="add the row to the rows already in --out")
    ap.add_argument("--backend", default="torch", choices=["torch", "ort"], help="the node's inference runtime")
    ap.add_argument("--ort-threads", type=int, default=1, help="--backend ort: ONNX Runtime intra-op threads")
    ap.add_argument("--ort-spinning", action="store_true", help="--backend ort: worker threads spin between calls")
    ap.add_argument("--task-id", type=int, default=-1, help="task id of a multi-task bundle (-1: none)")
    ap.add_argument("--beside-train", action="store_true", help="one 1-thread training process runs beside the loop")
    ap.add_argument("--sensor-rate", type=float, default=0.0,
                    help="> 0: a second window right after the first, with /joint_states flooded at this rate (Hz)")
    args = ap.parse_args()
    if not args.rate > 0 or not args.seconds > 0:
        ap.error("--rate and --seconds must be > 0")

    logs, logs_tmp = log_dir(args.log_dir)
    if args.checkpoint:
        bundle_dir = export(args.checkpoint, args.set, Path(args.bundle_out) if args.bundle_out else logs / "bundle",
                            onnx=args.backend == "ort")
    else:
        bundle_dir = Path(args.bundle)
    bundle = json.loads((bundle_dir / "bundle.json").read_text())
    head, sampler, steps = head_label(bundle["policy"])
    task = args.task or bundle["task"]["name"]
    domain = pick_domain_id(args.domain_id)
    env = child_env(domain, args.threads)
    period = 1.0 / args.rate
    load_before = os.getloadavg()
    print(f"[control_loop] {head} {sampler}-{steps} ({args.backend}) on {task} at {args.rate:g} Hz for {args.seconds:g} s "
          f"(ROS_DOMAIN_ID={domain}, {args.threads} torch thread(s), load average {load_before[0]:.2f}); logs: {logs}", flush=True)

    listener = Listener(domain)
    procs: list[Proc] = []
    trainer = None
    windows = []  # (sensor rate, first diagnostics, last diagnostics, flood output)
    try:
        procs.append(Proc("sim", "sim", {"task": task, "seed": args.seed, "max_episode_steps": args.max_episode_steps,
                                         "max_episodes": 0, "step_on_command": False, "control_rate_hz": args.rate}, env, logs))
        deploy = {"bundle": str(bundle_dir.resolve()), "control_rate_hz": args.rate, "device": args.device,
                  "blend": args.blend, "diagnostics_rate_hz": args.diagnostics_rate, "backend": args.backend,
                  "intra_op_threads": args.ort_threads, "ort_spinning": args.ort_spinning}
        if args.task_id >= 0:
            deploy["task_id"] = args.task_id
        procs.append(Proc("deploy", "deploy", deploy, env, logs))

        def running() -> bool:
            d = listener.last_diag()
            return d is not None and num(d[2], "chunks") >= 1 and bool(listener.commands["twist"] or listener.commands["command"])

        t0 = time.monotonic()
        wait_until(running, args.startup_timeout, procs, "the policy node's first chunk")
        t_ready = time.monotonic()
        print(f"[control_loop] running after {t_ready - t0:.1f} s; warm-up {args.warmup:g} s, then {args.seconds:g} s measured", flush=True)
        diag_period = 1.0 / args.diagnostics_rate

        def diag_after(t: float):
            with listener.lock:
                return next((d for d in listener.diagnostics if d[0] >= t), None)

        start = t_ready + args.warmup
        if args.beside_train:  # a training process on the same CPUs, through the whole window
            trainer = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "task=mt10", "policy=truncated", "train.threads=1",
                                        "train.steps=1000000", "eval.episodes=0", f"run_dir={logs / 'beside_train'}"],
                                       env=child_env(domain, 1) | {"ROS_DOMAIN_ID": "0"}, cwd=ROOT, start_new_session=True,
                                       stdout=open(logs / "beside_train.log", "w"), stderr=subprocess.STDOUT)
            print(f"[control_loop] training process {trainer.pid} beside the loop (1 thread)", flush=True)
            start = time.monotonic() + max(args.warmup, 20.0)  # past its start-up (imports, dataset) into steady training
        for sensor_rate in [0.0] + ([args.sensor_rate] if args.sensor_rate > 0 else []):
            flood = None
            if sensor_rate > 0:
                print(f"[control_loop] flooding /joint_states at {sensor_rate:g} Hz; warm-up {args.warmup:g} s, "
                      f"then {args.seconds:g} s measured", flush=True)
                flood = subprocess.Popen([sys.executable, __file__, "--flood-child", str(sensor_rate), "/joint_states"], env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                start = time.monotonic() + args.warmup
            try:
                wait_until(lambda: diag_after(start) is not None, args.warmup + 10 * diag_period + 30, procs, "diagnostics")
                d0 = diag_after(start)
                wait_until(lambda: diag_after(d0[0] + args.seconds) is not None, args.seconds + 10 * diag_period + 30, procs,
                           "diagnostics")
                d1 = diag_after(d0[0] + args.seconds)
            finally:
                flood_out = ""
                if flood is not None:
                    flood.send_signal(signal.SIGINT)
                    try:
                        flood_out = flood.communicate(timeout=10)[0]
                    except subprocess.TimeoutExpired:
                        flood.kill()
                        flood_out = flood.communicate()[0]
            windows.append((sensor_rate, d0, d1, flood_out))
            start = time.monotonic()
        if trainer is not None and trainer.poll() is not None:
            raise RuntimeError(f"the training process beside the loop exited early (rc {trainer.returncode}); see {logs}/beside_train.log")
    finally:
        if trainer is not None and trainer.poll() is None:
            os.killpg(trainer.pid, signal.SIGKILL)
            trainer.wait(10)
        rcs = {p.name: p.stop() for p in reversed(procs)}  # the policy first: it publishes a hold on shutdown
        listener.close()
    load_after = os.getloadavg()
    rows = [make_row(listener, args, period, bundle_dir, head, sampler, steps, task, rcs, load_before, load_after, *w)
            for w in windows]

    out = Path(args.out)
    rows = (json.loads(out.read_text()) if args.append and out.exists() else []) + rows
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))

    print(f"\n{'head':22s} {'flood':>6s} {'Hz tgt':>6s} {'Hz node':>7s} {'Hz cmd':>7s} {'jit p50':>7s} {'jit p99':>7s} {'cmdj p50':>8s} "
          f"{'cmdj p99':>8s} {'inf p50':>7s} {'inf p95':>7s} {'inf p99':>7s} {'misses':>6s} {'dropped':>7s} {'late':>5s} "
          f"{'empty':>5s} {'empty%':>6s} {'winf p50':>8s} {'winf p99':>8s} {'holds':>5s} {'safety':>6s} {'eps':>4s} {'s':>5s}")
    for r in rows:
        name = f"{r['head']}/{r['sampler']}-{r['steps']}" + ("@ort" if r.get('backend') == 'ort' else "") + ("+train" if r.get('beside', 'none') != 'none' else "")
        print(f"{name:22s} {r.get('flood_rate_hz', float('nan')):6.0f} {r['rate_hz_target']:6.1f} {r['rate_hz_achieved']:7.2f} "
              f"{r['cmd_rate_hz']:7.2f} {r['jitter_ms_p50']:7.2f} "
              f"{r['jitter_ms_p99']:7.2f} {r['cmd_jitter_ms_p50']:8.2f} {r['cmd_jitter_ms_p99']:8.2f} {r['inference_ms_p50']:7.1f} "
              f"{r['inference_ms_p95']:7.1f} {r['inference_ms_p99']:7.1f} {r['deadline_misses']:6d} {r['dropped_actions']:7d} "
              f"{r['late_chunks']:5d} {r['empty_pops']:5d} {100 * r.get('empty_queue_share', float('nan')):6.2f} "
              f"{r.get('window_inference_ms_p50', float('nan')):8.1f} {r.get('window_inference_ms_p99', float('nan')):8.1f} "
              f"{r['holds']:5d} {r['safety_interventions']:6d} {r['episodes']:4d} "
              f"{r['seconds']:5.1f}")
    print(f"(jitter ms: node = |tick interval - {period * 1e3:.1f} ms| over its last 2000 ticks, cmd = |inter-arrival - "
          f"{period * 1e3:.1f} ms| at the listener; inference ms: the node's last 2000 calls, winf: every call of the window; "
          f"flood: achieved /joint_states flood rate (Hz); empty%: empty-queue holds per tick; counts over the window; "
          f"safety by kind: {[r['safety'] for r in rows[-len(windows):]]}; "
          f"load average {load_before[0]:.2f} -> {load_after[0]:.2f} on {os.cpu_count()} CPUs)")
    if any(rc != 0 for rc in rcs.values()):
        print(f"warning: exit codes {rcs}; see the logs" + ("" if args.log_dir else " (pass --log-dir to keep them)"))
    print(f"wrote {out}")
    if logs_tmp is not None:
        logs_tmp.cleanup()


if __name__ == "__main__":
    main()
