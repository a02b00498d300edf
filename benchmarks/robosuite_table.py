"""Chi et al.-shaped success table on our robosuite tasks: rows = heads, columns = Lift / Can / Square from
state and Lift / Can from images (agentview + eye-in-hand 84x84, no object state), 50 scripted demos each.

    python benchmarks/robosuite_table.py commands [--seed 0] [--steps 2000] [--action-mode absolute]   # every cell's commands
    python benchmarks/robosuite_table.py table --out benchmarks/robosuite_table.json [--action-mode absolute] \
        [--result state/Lift/truncated1=benchmarks/runs/robosuite/lift_truncated_v2/results.json ...]

``--action-mode absolute`` is Chi et al.'s position control (``task.env_kwargs.action_mode=absolute``, its own
stores ``data/robosuite/<Task>[_img84]_abs.zarr`` and run folders ``<column>_abs_<head>``); delta (the default)
is robomimic's OSC_POSE delta.

``commands`` prints, per column, one ``train.py`` per trained head (DDPM-100 and DDIM-10 share the diffusion
training; ``train.py`` evaluates the head's default setting) and one ``eval.py`` per further inference
setting of a trained checkpoint. Run each under the machine's CPU lock. ``table`` reads the results JSON of
every cell that exists (default path ``<runs>/<column run name>_<head run>[_s<seed>]/results.json`` or the
``eval.out`` of its ``eval.py``; ``--result CELL=PATH`` points a cell elsewhere), recomputes the Wilson 95%
interval from the per-episode results, prints the markdown table (missing cells: "not run") and writes
the rows as JSON. A cell is one training seed; ``--result`` given more than once for a cell (one file per training
seed) makes it the mean +- std over those seeds, with the Wilson interval of all their episodes pooled.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

RUNS = Path("benchmarks/runs/robosuite")
IMAGE_KEYS = "[robot0_eef_pos,robot0_eef_quat,robot0_gripper_qpos,rgb_agentview,rgb_robot0_eye_in_hand]"

# the image recipe that trains on a CPU (issue 7's Meta-World one): a small CNN shared by the two cameras (GroupNorm,
# spatial-softmax keypoints, random crops) instead of Chi et al.'s ResNet-18s, one observation step, batch 64
IMAGE_RECIPE = ["policy.encoder.image_backbone=small_cnn", "policy.obs_horizon=1", "train.batch_size=64", "optim.lr=3e-4"]
# column -> (robosuite task, task config, extra task overrides, run-name stem)
COLUMNS = {
    "state/Lift": ("Lift", "robosuite_lift", [], "lift"),
    "state/Can": ("PickPlaceCan", "robosuite_can", [], "can"),
    "state/Square": ("NutAssemblySquare", "robosuite_square", [], "square"),
    "image/Lift": ("Lift", "robosuite_lift", [f"task.obs_keys={IMAGE_KEYS}", "task.dataset=data/robosuite/Lift_img84.zarr",
                                              "task.collect=true", *IMAGE_RECIPE], "lift_img"),
    "image/Can": ("PickPlaceCan", "robosuite_can", [f"task.obs_keys={IMAGE_KEYS}", "task.dataset=data/robosuite/PickPlaceCan_img84.zarr",
                                                    "task.collect=true", *IMAGE_RECIPE], "can_img"),
}
# row -> (trained policy, its run name, eval.py overrides or None when train.py's own evaluation is the cell, label)
HEADS = {
    "ddpm100": ("diffusion", "diffusion", ["+policy.sampler=ddpm", "+policy.num_inference_steps=100"], "DDPM-100"),
    "ddim10": ("diffusion", "diffusion", None, "DDIM-10"),
    "edm4": ("edm", "edm", None, "EDM, DPM-Solver++ 2M, 4 steps"),
    "truncated1": ("truncated", "truncated", None, "truncated, 1 step"),
    "streaming1": ("streaming", "streaming", None, "streaming, 1 step per tick"),
}
# Chi et al. 2023 (arXiv 2303.04137), proficient-human (ph) data, 200 demos per task: max / mean of the last 10
# checkpoints, each averaged over 3 training seeds x 50 starts. State: Table I (IJRR: Table 1); images: Table II (Table 3).
CHI = {
    "DiffusionPolicy-C (Chi et al., ph)": {"state/Lift": "1.00 / 0.98", "state/Can": "1.00 / 0.96", "state/Square": "1.00 / 0.93",
                                           "image/Lift": "1.00 / 1.00", "image/Can": "1.00 / 0.97"},
    "DiffusionPolicy-T (Chi et al., ph)": {"state/Lift": "1.00 / 1.00", "state/Can": "1.00 / 1.00", "state/Square": "1.00 / 0.89",
                                           "image/Lift": "1.00 / 1.00", "image/Can": "1.00 / 0.98"},
}


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p, d = k / n, 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def run_dir(column: str, head: str, seed: int, mode: str = "delta") -> Path:
    stem = COLUMNS[column][3] + ("_abs" if mode == "absolute" else "")
    return RUNS / (f"{stem}_{HEADS[head][1]}" + (f"_s{seed}" if seed else ""))


def cell_path(column: str, head: str, seed: int, mode: str = "delta") -> Path:
    d = run_dir(column, head, seed, mode)
    return d / "results.json" if HEADS[head][2] is None else d / f"eval_{head}.json"


def task_overrides(column: str, mode: str) -> list[str]:
    """The column's task overrides; absolute: the env's action mode and its own store (collected on first use)."""
    extra = list(COLUMNS[column][2])
    if mode == "absolute":
        name, image = COLUMNS[column][0], column.startswith("image/")
        extra = [e for e in extra if not e.startswith(("task.dataset=", "task.collect="))]
        extra += ["task.env_kwargs.action_mode=absolute", f"task.dataset=data/robosuite/{name}{'_img84' if image else ''}_abs.zarr",
                  "task.collect=true"]
    return extra


def commands(seed: int, steps: int, episodes: int, mode: str = "delta") -> list[str]:
    lock = "flock /tmp/cpu.lock nice -n 5 "
    out = []
    for column, (_, task, _, _) in COLUMNS.items():
        trained = set()
        extra = task_overrides(column, mode)
        for head, (policy, _, overrides, _) in HEADS.items():
            d = run_dir(column, head, seed, mode)
            if policy not in trained:
                trained.add(policy)
                out.append(" ".join([lock + "python train.py", f"task={task}", *extra, f"policy={policy}", "train.threads=1",
                                     f"train.steps={steps}", f"train.seed={seed}", f"eval.episodes={episodes}",
                                     "eval.num_envs=2", f"run_dir={d}"]))
            if overrides is not None:
                out.append(" ".join([lock + "python eval.py", f"checkpoint={d}/checkpoints/last.safetensors", *overrides,
                                     f"eval.episodes={episodes}", "eval.num_envs=2", f"eval.out={cell_path(column, head, seed, mode)}"]))
    return out


def table(results: dict[str, list[str]], seed: int, mode: str = "delta") -> dict[str, Any]:
    rows = []
    for head in HEADS:
        for column in COLUMNS:
            cell = f"{column}/{head}"
            paths = [Path(p) for p in results.get(cell, [cell_path(column, head, seed, mode)])]
            row: dict[str, Any] = {"head": head, "label": HEADS[head][3], "column": column, "task": COLUMNS[column][0],
                                   "path": str(paths[0]) if len(paths) == 1 else [str(p) for p in paths]}
            runs = [json.loads(p.read_text()) for p in paths if p.exists()]
            if len(runs) < len(paths) and len(paths) > 1:
                raise SystemExit(f"{cell}: missing result files {[str(p) for p in paths if not p.exists()]}")
            if runs:
                per_seed = [(sum(bool(e["success"]) for e in r["per_episode"]), len(r["per_episode"])) for r in runs]
                k, n = sum(a for a, _ in per_seed), sum(b for _, b in per_seed)
                rates = [a / b for a, b in per_seed]
                mean = sum(rates) / len(rates)
                row |= {"episodes": n, "successes": k, "success": mean, "wilson95": list(wilson(k, n)),
                        "eval_seeds": [runs[0]["per_episode"][0]["seed"], runs[0]["per_episode"][-1]["seed"]],
                        "mean_length": sum(r.get("mean_length") or 0.0 for r in runs) / len(runs),
                        "chunk_ms_p50": runs[0].get("chunk_ms_p50"), "train_steps": runs[0].get("step"),
                        "train_seconds": runs[0].get("train_seconds"), "training_seeds": len(runs)}
                if len(runs) > 1:
                    row |= {"success_per_seed": rates,
                            "success_std": math.sqrt(sum((x - mean) ** 2 for x in rates) / (len(rates) - 1))}
            rows.append(row)
    return {"demos_per_task": 50, "action_mode": mode, "rows": rows, "chi_et_al": CHI}


def markdown(result: dict[str, Any]) -> str:
    cols = list(COLUMNS)
    lines = ["| head | " + " | ".join(c.replace("/", ", ") for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for head in HEADS:
        cells = []
        for c in cols:
            row = next(r for r in result["rows"] if r["head"] == head and r["column"] == c)
            if "success" not in row:
                cells.append("not run")
                continue
            several = row["training_seeds"] > 1  # a mean of several seeds' rates: three decimals, then its spread
            mean = f"{row['success']:.3f} +- {row['success_std']:.2f} over {row['training_seeds']} seeds" if several else f"{row['success']:.2f}"
            cells.append(f"{mean} [{row['wilson95'][0]:.2f}, {row['wilson95'][1]:.2f}] "
                         f"({row['successes']}/{row['episodes']})")
        lines.append(f"| {HEADS[head][3]} | " + " | ".join(cells) + " |")
    for name, ref in result["chi_et_al"].items():
        lines.append(f"| {name} | " + " | ".join(ref[c] for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("commands")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--steps", type=int, default=2000)
    c.add_argument("--episodes", type=int, default=50)
    t = sub.add_parser("table")
    t.add_argument("--seed", type=int, default=0)
    for q in (c, t):
        q.add_argument("--action-mode", choices=["delta", "absolute"], default="delta")
    t.add_argument("--result", action="append", default=[], metavar="COLUMN/HEAD=PATH",
                   help="a cell's results JSON; repeat a cell for its further training seeds")
    t.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.cmd == "commands":
        print("\n".join(commands(args.seed, args.steps, args.episodes, args.action_mode)))
        return
    results = {}
    for item in args.result:
        cell, _, path = item.partition("=")
        column, _, head = cell.rpartition("/")
        if column not in COLUMNS or head not in HEADS or not path:
            p.error(f"--result {item!r}: expected COLUMN/HEAD=PATH with COLUMN in {list(COLUMNS)} and HEAD in {list(HEADS)}")
        results.setdefault(cell, []).append(path)
    result = table(results, args.seed, args.action_mode)
    print(markdown(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
