"""Demonstrations recorded through ROS 2, trained from the bag: reach-v3 end to end (issue 14).

    # 1. record (real time, light CPU): rtpolicy sim (free-running) + rtpolicy teleop (the scripted expert on the
    #    robot's topics) + rtpolicy record (sample_on=action) into a zarr store AND an MCAP bag
    python benchmarks/record_reach.py record --episodes 50 --rate 40
    # 2. convert the bag (timed) and train from the bag itself (task.dataset=<bag>), evaluated on 50 new layouts
    flock /tmp/cpu.lock nice -n 5 python benchmarks/record_reach.py train --steps 2000

Writes benchmarks/runs/record_reach/{demo.zarr, demo_mcap/, record.json, run/} and the JSON row
benchmarks/record_reach.json. Demo layouts are sim seeds 1000.. (the episodes before the recorder hears its
first reset, while the nodes discover each other, are not recorded); evaluation uses train.py's eval seeds (100000..), which no demo used.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "runs" / "record_reach"
CLI = [sys.executable, "-m", "rtpolicy.deploy.cli"]
OBS = {"state": [{"joint_state": {"topic": "/joint_states", "names": ["hand_x", "hand_y", "hand_z", "gripper_opening"]}},
                 {"array": {"topic": "/object_state", "size": 35}}]}
ACT = {"action": [{"array": {"topic": "/rtpolicy/cmd_twist", "size": 3}}, {"array": {"topic": "/rtpolicy/cmd_gripper", "size": 1}}]}
TYPES = {"/rtpolicy/cmd_twist": "geometry_msgs/msg/TwistStamped"}
EPISODE_TOPIC = "/rtpolicy/record/episode"


def read_options(rate: float) -> dict:
    return {"sources": {**OBS, **ACT}, "rate": rate, "split": "topic", "episode_topic": EPISODE_TOPIC,
            "tick_on": ["/rtpolicy/cmd_twist", "/rtpolicy/cmd_gripper"]}


def hydra_value(v) -> str:
    """A JSON-able value in Hydra's override grammar (flow style, strings unquoted: topic names parse as they are)."""
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{hydra_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    return json.dumps(v) if isinstance(v, bool) else str(v)


def record(args) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for p in (OUT / "demo.zarr", OUT / "demo_mcap"):
        if p.exists():
            sys.exit(f"{p} exists; remove it to record again")
    env = dict(os.environ, ROS_DOMAIN_ID=str(args.domain), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", PYTHONUNBUFFERED="1")
    logs = {n: open(OUT / f"{n}.log", "w") for n in ("record", "teleop", "sim")}  # noqa: SIM115
    start = lambda name, argv: subprocess.Popen(argv, env=env, stdout=logs[name], stderr=subprocess.STDOUT,
                                                start_new_session=True)
    kv = {"observation_sources": json.dumps(OBS), "action_sources": json.dumps(ACT), "message_types": json.dumps(TYPES),
          "sample_on": "action", "control_rate_hz": float(args.rate), "output": OUT / "demo.zarr", "bag": OUT / "demo_mcap",
          "bag_storage": "mcap", "max_episodes": args.episodes}
    procs = {"record": start("record", [*CLI, "record", *(f"{k}={v}" for k, v in kv.items())]),
             "teleop": start("teleop", [*CLI, "teleop", "task=reach-v3"])}
    try:
        time.sleep(args.warmup)
        t0 = time.monotonic()
        procs["sim"] = start("sim", [*CLI, "sim", "task=reach-v3", f"seed={args.seed}", "step_on_command=false",
                                     f"control_rate_hz={float(args.rate)}"])  # runs until stopped
        rc = procs["record"].wait(timeout=args.timeout)
        wall = time.monotonic() - t0
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
        for p in procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    sim_eps = [{**json.loads(m.replace("'", '"').replace("True", "true").replace("False", "false")), "time": float(t)}
               for t, m in re.findall(r"\[(\d+\.\d+)\] \[rtpolicy_sim\]: episode (\{.*\})", (OUT / "sim.log").read_text())]
    import numpy as np

    from rtpolicy.datasets.replay_buffer import ReplayBuffer
    from rtpolicy.envs.metaworld import expert_policy

    buf = ReplayBuffer.open(OUT / "demo.zarr")
    matched = [min(sim_eps, key=lambda e: abs(e["time"] - r["end_time"])) for r in buf.attrs["recorded_episodes"]]
    expert = expert_policy("reach-v3")
    data = buf.load()
    paired = float(np.mean(np.abs(np.stack([expert(s) for s in data["state"]]) - data["action"]).max(1) < 1e-5))
    res = {"recorder_rc": rc, "episodes": buf.n_episodes, "steps": buf.n_steps, "rate_hz": args.rate,
           "record_wall_s": round(wall, 1), "sim_steps_of_recorded_episodes": sum(e["length"] for e in matched),
           "expert_success_of_recorded_episodes": sum(e["success"] for e in matched),
           "rows_paired_with_the_state_they_answer": round(paired, 4),
           "sim_seeds": sorted(e["seed"] for e in matched), "gaps": sum(r["gaps"] for r in buf.attrs["recorded_episodes"])}
    (OUT / "record.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


def train(args) -> None:
    from rtpolicy.datasets.formats import convert
    from rtpolicy.datasets.replay_buffer import ReplayBuffer

    rec = json.loads((OUT / "record.json").read_text())
    opts = read_options(rec["rate_hz"])
    conv = OUT / "demo_mcap.zarr"
    t = time.perf_counter()
    convert(OUT / "demo_mcap", conv, read_options=opts, overwrite=True)
    convert_s = time.perf_counter() - t
    a, b = ReplayBuffer.open(conv), ReplayBuffer.open(OUT / "demo.zarr")
    same = a.n_steps == b.n_steps and all((a.load()[k] == b.load()[k]).all() for k in ("action",))
    run_dir = OUT / f"run{args.tag}"
    cmd = [sys.executable, "train.py", "task=reach", f"task.dataset={OUT / 'demo_mcap'}",
           f"task.dataset_options={hydra_value(opts)}", f"task.dataset_cache={OUT / 'cache'}", f"train.steps={args.steps}",
           "train.threads=1", f"eval.episodes={args.eval_episodes}", f"run_dir={run_dir}", *args.overrides]
    t = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    train_s = time.perf_counter() - t
    result = json.loads(next(run_dir.rglob("results.json")).read_text())
    row = {"benchmark": "record_reach", "task": "reach-v3", "source": "rosbag2 MCAP recorded by rtpolicy record",
           "record": rec, "convert_s": round(convert_s, 2), "bag_rows_equal_store_rows": bool(same),
           "train_steps": args.steps, "train_and_eval_wall_s": round(train_s, 1), "seeds": "one training run",
           "eval": {k: result[k] for k in result if k in ("success", "ci95", "episodes", "seed")} or result,
           "command": " ".join(cmd[1:])}
    (REPO / "benchmarks" / f"record_reach{args.tag}.json").write_text(json.dumps(row, indent=1))
    print(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="stage", required=True)
    r = sub.add_parser("record")
    r.add_argument("--episodes", type=int, default=50)
    r.add_argument("--rate", type=float, default=40.0)
    r.add_argument("--seed", type=int, default=1000, help="sim seed of its first episode; episode i: seed + i")
    r.add_argument("--domain", type=int, default=171)
    r.add_argument("--warmup", type=float, default=5.0, help="seconds for the recorder and teleop to start")
    r.add_argument("--timeout", type=float, default=1200.0)
    t = sub.add_parser("train")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--eval-episodes", type=int, default=50)
    t.add_argument("--tag", default="", help="suffix of the run folder and the JSON row (record_reach<tag>.json)")
    t.add_argument("overrides", nargs="*", help="more train.py overrides")
    args = ap.parse_args()
    {"record": record, "train": train}[args.stage](args)


if __name__ == "__main__":
    main()
