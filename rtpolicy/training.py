"""The training loop: AdamW + warmup/cosine LR, EMA weights for evaluation, gradient clipping,
periodic validation loss, rollout evaluation and atomic checkpoints; ``resume=true`` continues.
Under ``torchrun`` the same loop runs data-parallel (rtpolicy.distributed: what each rank does)."""

from __future__ import annotations

import copy
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.optimization import get_cosine_schedule_with_warmup
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from rtpolicy import distributed
from rtpolicy.checkpoint import read_checkpoint, restore_training, save_checkpoint
from rtpolicy.config import default_dataset
from rtpolicy.datasets.replay_buffer import ReplayBuffer
from rtpolicy.datasets.sampler import SequenceDataset, split_episodes
from rtpolicy.factory import ConfigError, build_policy
from rtpolicy.processors import ObservationProcessor, rotation_key

#: config keys a resumed run may change (how long, how often, where, how fast); any other change is refused
RESUMABLE = ("resume", "run_dir", "device", "eval", "task.collect", "task.demos", "train.steps", "train.log_every", "train.val_every",
             "train.eval_every", "train.ckpt_every", "train.num_workers", "train.threads", "train.grad_accum",
             "train.precision", "train.dist_timeout_s")


class EMA:
    """Exponential moving average of a model's weights, decay warmed up as (1+n)/(10+n)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_p = list(self.model.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1 - d)
        for eb, b in zip(self.model.buffers(), model.buffers()):
            eb.copy_(b)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_run_dir(cfg) -> Path:
    base = Path("runs") / cfg.task.name / f"{cfg.policy.name}-{cfg.denoiser.name}"
    if cfg.run_dir is not None:
        return Path(cfg.run_dir)
    if cfg.resume:
        runs = sorted(p.parent.parent for p in base.glob("*/checkpoints/last.safetensors"))
        if not runs:
            raise FileNotFoundError(f"resume=true but no run with a checkpoint under {base}; pass run_dir=...")
        return runs[-1]
    return base / datetime.now().strftime("%Y%m%d-%H%M%S-%f")


def ensure_dataset(task_cfg) -> ReplayBuffer:
    """The task's demonstration store, opened (validated); a missing store is collected first when it is
    the task's default path or ``task.collect=true``, and is an error otherwise (a mistyped path)."""
    path = Path(task_cfg.dataset)
    if not path.exists():
        if not task_cfg.collect and path != Path(default_dataset(task_cfg)):
            raise FileNotFoundError(
                f"task.dataset={path} does not exist (the default for {task_cfg.name} is {default_dataset(task_cfg)}); "
                "fix the path, or pass task.collect=true to collect scripted demos there")
        from rtpolicy.datasets.collect import collect_demos, collect_suite

        suite = list(task_cfg.tasks)
        what = f"{len(suite)} tasks of {task_cfg.name}" if suite else task_cfg.name
        print(f"[rtpolicy] no dataset at {path}: collecting {task_cfg.demos} scripted demos of {what}")
        collect = collect_suite if suite else collect_demos
        collect(task_cfg, path, task_cfg.demos, task_cfg.demo_seed, action_noise=task_cfg.action_noise,
                post_success_steps=task_cfg.post_success_steps)
    from rtpolicy.datasets.formats import open_dataset  # zarr opens as is; LeRobot, robomimic, bags via a zarr cache

    return open_dataset(task_cfg)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        return {k: v for key, sub in d.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: d}


def check_resumable(stored: dict[str, Any], new: dict[str, Any], ckpt: Path) -> None:
    """Raise ConfigError naming every key (outside RESUMABLE) whose value differs between the run's
    checkpoint config and the config of this launch."""
    a, b = _flat(stored), _flat(new)
    free = lambda k: any(k == r or k.startswith(r + ".") for r in RESUMABLE)  # noqa: E731
    diff = [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in sorted(set(a) | set(b))
            if not free(k) and a.get(k, "<unset>") != b.get(k, "<unset>")]
    if diff:
        shown = "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
        raise ConfigError(f"resume=true: {ckpt} was trained with another config ({shown}); nothing was changed. "
                          "Resume with the run's own config, or start a new run (another run_dir)")


class _Rows:
    """Rows ``lo:hi`` of a stored array, read lazily (a zarr array stays on disk)."""

    def __init__(self, arr, rows: slice):
        self.arr, self.lo, self.shape = arr, rows.start, (rows.stop - rows.start, *arr.shape[1:])

    def __getitem__(self, s: slice):
        return self.arr[self.lo + s.start: self.lo + min(s.stop, self.shape[0])]


def cached_keypoints(policy, buffer: ReplayBuffer, device: torch.device,
                     dist: distributed.Dist = distributed.SINGLE) -> dict[str, np.ndarray]:
    """The keypoints of every stored frame for a policy with a frozen image encoder ({} otherwise):
    training then reads (T, 2K) floats instead of decoding (T, H, W, 3) frames and running the backbone.
    Under torchrun each rank encodes 1/W of the frames and the parts are all-gathered."""
    if not getattr(policy, "keypoint_shapes", None):
        return {}
    from rtpolicy.policies.encoders.image import cache_keypoints, find_image_encoder

    t0 = time.perf_counter()
    encoder = find_image_encoder(policy).to(device)
    rows = dist.rows(buffer.n_steps)
    feats = cache_keypoints(encoder, {k: _Rows(buffer[k], rows) for k in policy.keypoint_shapes}, device=device)
    feats = {k: dist.gather_rows(v, buffer.n_steps) for k, v in feats.items()}
    if dist.main:
        print(f"[rtpolicy] frozen image encoder: cached keypoints of {buffer.n_steps} steps x {len(feats)} cameras "
              f"in {time.perf_counter() - t0:.1f} s" + (f" ({dist.world} ranks)" if dist.active else ""))
    return feats


def _loop(loader: DataLoader, epoch: int = 0):
    while True:
        if hasattr(loader.sampler, "set_epoch"):  # a DistributedSampler: this epoch's permutation
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


def prepared(batch: dict[str, Any], policy, device: torch.device) -> dict[str, Any]:
    """A loader batch on ``device`` with its observation run through the policy's processor (raw -> network input)."""
    batch = _to(batch, device)
    return batch | {"obs": policy.processor(batch["obs"])}


@torch.no_grad()
def validation_loss(policy, loader: DataLoader, device, max_batches: int = 20) -> float:
    losses = [policy.compute_loss(prepared(b, policy, device))[0].item() for _, b in zip(range(max_batches), loader)]
    return float(np.mean(losses))


def train(cfg) -> dict[str, Any]:
    """Train the configured policy; returns the final evaluation results (plus checkpoint path). Started by
    torchrun, this process is one rank of a data-parallel job (rank 0 returns the results, the others
    their step, time and the checkpoint path)."""
    dist, device = distributed.init(resolve_device(cfg.device), cfg.train.dist_timeout_s)
    results = _train(cfg, dist, device)
    dist.close()  # not on an error: that process exits and torchrun stops the other ranks
    return results


def _train(cfg, dist: distributed.Dist, device: torch.device) -> dict[str, Any]:
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    micro = distributed.micro_batch(cfg.train.batch_size, dist.world, cfg.train.grad_accum)
    distributed.autocast(cfg.train.precision, device)  # bf16 off CUDA is refused before anything is written
    run_dir = Path(dist.broadcast_json(str(resolve_run_dir(cfg))))  # rank 0's timestamp names the run
    ckpt_path = run_dir / "checkpoints" / "last.safetensors"
    if ckpt_path.exists() and not cfg.resume:
        raise FileExistsError(f"{run_dir} already holds a checkpoint; pass resume=true to continue it or another run_dir")
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    resolved["run_dir"] = str(run_dir)
    if cfg.resume and ckpt_path.exists():  # before anything is written: a refused resume changes nothing
        check_resumable(read_checkpoint(ckpt_path)[0]["config"], resolved, ckpt_path)
    with dist.main_first():  # rank 0 collects a missing store, the others then open it
        buffer = ensure_dataset(cfg.task)  # validated (or collected) before the run directory exists
    if cfg.eval.episodes > 0 and not cfg.task.tasks:  # the evaluation's env takes the store's actions
        from rtpolicy.envs import check_store_actions

        check_store_actions(cfg.task, buffer.shape(cfg.task.action_key), f"task.dataset={cfg.task.dataset}")
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))

    from rtpolicy.envs import env_instructions, env_rotations

    # the processor makes the features the store does not hold (instruction_id -> lang_emb / lang_tokens) and
    # names the quaternions the network reads as rotation-matrix columns
    processor = ObservationProcessor.for_policy(cfg.policy, list(cfg.task.obs_keys), env_instructions(cfg.task.env),
                                                env_rotations(cfg.task))
    made = processor.output_shapes()
    shapes = ({k: made.get(k) or list(buffer.shape(k)) for k in cfg.task.obs_keys}
              | {"action": list(buffer.shape(cfg.task.action_key))})
    num_tasks = cfg.task.num_tasks if cfg.task.condition_on_task_id else 0  # 0: the policy sees no task id
    policy = build_policy(cfg.policy, cfg.denoiser, shapes, num_tasks, processor)
    train_mask, val_mask = split_episodes(buffer.n_episodes, cfg.train.val_fraction, cfg.train.seed)
    ds_kw = dict(obs_keys=processor.raw_keys(cfg.task.obs_keys), action_key=cfg.task.action_key, obs_horizon=policy.obs_horizon,
                 horizon=policy.data_horizon, action_horizon=policy.action_horizon, pad_after=policy.pad_after,
                 arrays=cached_keypoints(policy, buffer, device, dist))
    train_ds = SequenceDataset(buffer, episode_mask=train_mask, **ds_kw)
    sampler = dist.sampler(train_ds, cfg.train.seed)  # None in one process: the loader shuffles
    loader = DataLoader(train_ds, batch_size=micro, shuffle=sampler is None, sampler=sampler,
                        drop_last=len(sampler or train_ds) > micro,
                        num_workers=cfg.train.num_workers, persistent_workers=cfg.train.num_workers > 0)
    val_loader = None
    if val_mask.any() and dist.main:
        val_loader = DataLoader(SequenceDataset(buffer, episode_mask=val_mask, **ds_kw), batch_size=cfg.train.batch_size)

    fit_keys = [k for k in cfg.task.obs_keys if k in policy.normalizer.shapes]  # images, embeddings: no stats
    data = buffer.load([*fit_keys, cfg.task.action_key])
    rotated = {rotation_key(k): processor.rotation_features(k, torch.as_tensor(np.asarray(data[k])).float())
               for k in fit_keys if k in processor.rotations}  # a key's quaternions, as the network reads them
    policy.normalizer.fit({k: data[k] for k in fit_keys} | rotated | {"action": data[cfg.task.action_key]})
    for key, starts in processor.rotations.items():  # unit quaternions, either sign: their range is [-1, 1]
        policy.normalizer.set_range(key, [i for s in starts for i in range(s, s + 4)], -1.0, 1.0)
    policy.prepare(policy.normalizer.normalize("action", train_ds.action_windows()))  # data-dependent state, e.g. anchors
    policy.to(device)
    ema = EMA(policy, cfg.train.ema_decay)
    o = cfg.optim
    optimizer = torch.optim.AdamW(policy.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    lr_sched = get_cosine_schedule_with_warmup(optimizer, o.warmup_steps, cfg.train.steps)
    step, prior_s = 0, 0.0  # prior_s: training seconds of the runs this one resumes
    if cfg.resume and ckpt_path.exists():
        meta = restore_training(ckpt_path, policy, ema.model, optimizer, lr_sched)
        step, prior_s = meta["step"], float(meta.get("metrics", {}).get("train_seconds", 0.0))
        ema.updates = step
        if dist.main:
            print(f"[rtpolicy] resumed {run_dir} at step {step}")
    dist.seed(cfg.train.seed, step)
    accum = cfg.train.grad_accum
    stepper = distributed.GradientStep(policy, optimizer, dist, device, o.grad_clip, cfg.train.precision)

    n_params = sum(q.numel() for q in policy.parameters())
    if dist.main:
        print(f"[rtpolicy] run_dir={run_dir} device={device} params={n_params / 1e6:.2f}M "
              f"episodes={buffer.n_episodes} (val {int(val_mask.sum())}) windows={len(train_ds)}"
              + (f" ranks={dist.world} x batch {micro} x accum {accum}" if dist.active else ""))
    writer = SummaryWriter(str(run_dir / "tb")) if dist.main else distributed.NullWriter()

    def checkpoint(metrics=None):
        metrics = {"train_seconds": round(prior_s + time.perf_counter() - t0, 1)} | (metrics or {})
        return save_checkpoint(ckpt_path, ema=ema.model, model=policy, optimizer=optimizer, lr_scheduler=lr_sched,
                               step=step, config=resolved, shapes=shapes, num_tasks=num_tasks, metrics=metrics)

    batches = _loop(loader, epoch=step * accum // len(loader))
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.train.steps, initial=step, desc="train", dynamic_ncols=True, disable=not dist.main)
    stepper.train()
    while step < cfg.train.steps:
        metrics, grad_norm = stepper.step([prepared(next(batches), policy, device) for _ in range(accum)])
        lr_sched.step()
        if dist.main:
            ema.update(policy)
        step += 1
        bar.update(1)
        if step % cfg.train.log_every == 0:
            loss = dist.mean(metrics["loss"])  # over ranks
            bar.set_postfix(loss=f"{loss:.4f}")
            writer.add_scalar("train/loss", loss, step)
            writer.add_scalar("train/grad_norm", float(grad_norm), step)
            writer.add_scalar("train/lr", lr_sched.get_last_lr()[0], step)
        if val_loader is not None and step % cfg.train.val_every == 0:
            writer.add_scalar("val/loss", validation_loss(ema.model, val_loader, device), step)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
            if dist.main:
                for k, v in _evaluate(ema.model, cfg, device, run_dir / f"eval_{step}").items():
                    if isinstance(v, (int, float)):
                        writer.add_scalar(f"eval/{k}", v, step)
            dist.barrier()  # the other ranks wait for rank 0's rollouts
        if step % cfg.train.ckpt_every == 0 and dist.main:
            checkpoint()
    bar.close()
    train_s = prior_s + time.perf_counter() - t0
    if not dist.main:
        dist.barrier()  # until rank 0 has evaluated and written the last checkpoint
        return {"rank": dist.rank, "step": step, "train_seconds": round(train_s, 1), "checkpoint": str(ckpt_path)}
    val = validation_loss(ema.model, val_loader, device) if val_loader is not None else None
    results = _evaluate(ema.model, cfg, device, run_dir / "eval") if cfg.eval.episodes > 0 else {}
    results |= {"head": f"{cfg.policy.name}/{cfg.denoiser.name}", "train_seconds": round(train_s, 1), "val_loss": val, "step": step}
    path = checkpoint(results)
    results["checkpoint"] = str(path)
    for k in ("success", "chunk_ms_p50", "chunk_ms_p95"):
        if k in results:
            writer.add_scalar(f"eval/{k}", results[k], step)
    writer.close()
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    dist.barrier()
    return results


def _evaluate(policy, cfg, device, out_dir: Path) -> dict[str, Any]:
    from rtpolicy.evaluation import evaluate

    policy.eval()
    eval_cfg = OmegaConf.merge(cfg.eval, {"out": str(out_dir / "results.json")})
    return evaluate(policy, cfg.task, eval_cfg, device=device, video_dir=out_dir / "videos")
