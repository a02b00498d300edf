"""Training throughput (samples/s) of image policies on a CPU, side by side in one run (issue 7).

    python benchmarks/train_throughput.py [--steps 8] [--rounds 5] [--batch 64] [--threads 1] \
        [--out benchmarks/train_throughput.json]

Settings, all on the same Meta-World drawer-open-v3 camera store (10 scripted demos with
``proprio`` + ``rgb_corner`` at 84x84, collected on first use into ``data/bench/``), the truncated head,
one obs step:

    state          the 39-d privileged state, no camera (the floor of the head itself)
    small_cnn      camera frames through a trained small CNN (random crop)
    resnet18       camera frames through a trained ResNet-18 (GroupNorm)
    resnet18_frozen  a frozen ResNet-18 (policy.encoder.freeze_image=true): every stored frame is
                   encoded once before training and the loop reads cached keypoints
    small_cnn_frozen the same with the small CNN

A training step here is what ``train.py`` does per step: draw a batch from the DataLoader (zarr
frame decoding included), compute the loss, backward, AdamW. The settings take turns in ``--rounds``
rounds of ``--steps`` steps, so a slow spell of the shared machine hits them all; each setting's
figure is its median round. The one-off cost of a frozen encoder's cache is reported apart
(``cache_s``). Ratios are against the trained ResNet-18.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "osmesa")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from rtpolicy.config import register_configs  # noqa: E402
from rtpolicy.datasets.sampler import SequenceDataset  # noqa: E402
from rtpolicy.factory import compose, build_policy  # noqa: E402
from rtpolicy.training import cached_keypoints, ensure_dataset  # noqa: E402

CAMERA = ["task.obs_keys=[proprio,rgb_corner]"]
SETTINGS = {
    "state": ["task.obs_keys=[state]"],
    "small_cnn": CAMERA + ["policy.encoder.image_backbone=small_cnn"],
    "resnet18": CAMERA + ["policy.encoder.image_backbone=resnet18"],
    "resnet18_frozen": CAMERA + ["policy.encoder.image_backbone=resnet18", "policy.encoder.freeze_image=true"],
    "small_cnn_frozen": CAMERA + ["policy.encoder.image_backbone=small_cnn", "policy.encoder.freeze_image=true"],
}


def compose_train(overrides: list[str]):
    return compose(["task=drawer_open", "task.demos=10", "task.image_size=84",
                    "task.dataset=data/bench/drawer-open-v3-corner84.zarr", "task.collect=true", "policy=truncated",
                    "policy.obs_horizon=1", *overrides])


class Setting:
    """One policy with its optimizer and an endless batch iterator over the shared store."""

    def __init__(self, overrides: list[str], batch: int):
        self.cfg = cfg = compose_train(overrides)
        buffer = ensure_dataset(cfg.task)
        shapes = {k: list(buffer.shape(k)) for k in cfg.task.obs_keys} | {"action": list(buffer.shape("action"))}
        self.policy = policy = build_policy(cfg.policy, cfg.denoiser, shapes, 0)
        fit = [k for k in cfg.task.obs_keys if k in policy.normalizer.shapes]
        data = buffer.load([*fit, "action"])
        policy.normalizer.fit({k: data[k] for k in fit} | {"action": data["action"]})
        t0 = time.perf_counter()
        arrays = cached_keypoints(policy, buffer, torch.device("cpu"))
        self.cache_s = time.perf_counter() - t0 if arrays else 0.0
        ds = SequenceDataset(buffer, list(cfg.task.obs_keys), "action", policy.obs_horizon, policy.data_horizon,
                             policy.action_horizon, arrays=arrays, pad_after=policy.pad_after)
        policy.prepare(policy.normalizer.normalize("action", ds.action_windows()))
        self.loader = DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True)
        self.batches = iter(())
        self.opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)
        self.params = sum(p.numel() for p in policy.parameters())
        self.trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        self.samples = buffer.n_steps

    def step(self) -> None:
        batch = next(self.batches, None)
        if batch is None:
            self.batches = iter(self.loader)
            batch = next(self.batches)
        loss, _ = self.policy.train().compute_loss(batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="training steps per setting per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "train_throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    register_configs()
    ensure_dataset(compose_train(CAMERA).task)  # the store every setting reads (its state and its frames)
    settings = {name: Setting(SETTINGS[name], args.batch) for name in args.settings}
    for s in settings.values():  # warm-up: first-call allocations, zarr caches
        s.step()
    rounds: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, s in settings.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                s.step()
            rounds[name].append(args.steps * args.batch / (time.perf_counter() - t0))
    ref = statistics.median(rounds["resnet18"]) if "resnet18" in rounds else None
    rows = []
    print(f"{'setting':18s} {'params':>8s} {'trainable':>9s} {'samples/s':>10s} {'vs resnet18':>11s} {'cache_s':>8s}")
    for name, s in settings.items():
        sps = statistics.median(rounds[name])
        row = {"setting": name, "params": s.params, "trainable": s.trainable, "samples_per_s": round(sps, 1),
               "rounds": [round(r, 1) for r in rounds[name]], "vs_resnet18": round(sps / ref, 2) if ref else None,
               "cache_s": round(s.cache_s, 2), "store_steps": s.samples}
        rows.append(row)
        print(f"{name:18s} {s.params / 1e6:7.2f}M {s.trainable / 1e6:8.2f}M {sps:10.1f} "
              f"{row['vs_resnet18'] if ref else float('nan'):>10.2f}x {s.cache_s:8.2f}")
    meta = {"batch": args.batch, "steps_per_round": args.steps, "rounds": args.rounds, "threads": args.threads,
            "torch": torch.__version__}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
