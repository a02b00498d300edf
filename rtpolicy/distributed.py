"""Data-parallel training under the standard launcher, and the optimizer step every run takes.

    torchrun --nproc_per_node=N train.py ...                          one machine, N processes
    torchrun --nnodes=M --nproc_per_node=N --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT train.py ...

A process started by torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in its environment) joins a
process group: ``nccl`` with one GPU per process (``cuda:LOCAL_RANK``) when the device is CUDA,
``gloo`` on the CPU. Without those variables nothing here starts and a run is one plain process.

What rank r of W does, for a global batch B = ``train.batch_size`` and A = ``train.grad_accum``:

    data       the same store and windows; DistributedSampler(seed=train.seed) gives rank r every W-th
               window of the epoch's permutation, reshuffled per epoch (``set_epoch``); an optimizer step
               takes A micro-batches of B / (W * A) windows on every rank, so the step sees B windows
    model      normalizer fit and ``prepare()`` run on every rank on the same data; wrapping in DDP then
               broadcasts rank 0's parameters and buffers (normalizer stats, anchors), so all ranks agree
    gradients  (loss / A).backward() per micro-batch; DDP averages over ranks on the last one (no_sync before)
    noise      the training noise is seeded per rank (train.seed, rank, step): ranks draw different noise
    rank 0     EMA, validation, rollout evaluation, checkpoints (atomic), tensorboard and the progress bar;
               the others wait at a barrier (``train.dist_timeout_s``) while it evaluates
    keypoints  a frozen image encoder's keypoint cache is computed 1/W per rank and all-gathered

A rank that dies ends the job: torchrun stops the other workers and exits non-zero naming the failed
rank (gloo peers also fail at once on the closed connection; nccl ones at the timeout at the latest).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler

from rtpolicy.factory import ConfigError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank of world; ``active`` once a process group is joined."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs, evaluates and writes."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the body first (e.g. collects the demo store); the others run it once it is done."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    def _tensor(self, x: torch.Tensor) -> torch.Tensor:
        return x.cuda() if self.active and tdist.get_backend() == "nccl" else x

    def broadcast_json(self, value: Any) -> Any:
        """Rank 0's ``value`` (anything JSON can hold) on every rank; sent as UTF-8 bytes, never pickled."""
        if not self.active:
            return value
        data = json.dumps(value).encode() if self.main else b""
        size = self._tensor(torch.tensor([len(data)], dtype=torch.long))
        tdist.broadcast(size, 0)
        buf = self._tensor(torch.zeros(int(size.item()), dtype=torch.uint8))
        if self.main:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        tdist.broadcast(buf, 0)
        return json.loads(bytes(buf.cpu().numpy()).decode())

    def mean(self, value: float) -> float:
        """The mean of ``value`` over ranks (every rank must call it at the same point)."""
        if not self.active:
            return value
        t = self._tensor(torch.tensor([float(value)], dtype=torch.float64))
        tdist.all_reduce(t)
        return float(t.item()) / self.world

    def rows(self, n: int) -> slice:
        """This rank's share of ``n`` rows: contiguous, sizes differing by at most one."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def gather_rows(self, part: np.ndarray, n: int) -> np.ndarray:
        """Every rank's ``part`` (its :meth:`rows` of n, shape (rows, *F)) -> the full (n, *F) array on every rank."""
        if not self.active:
            return part
        sizes = [(r + 1) * n // self.world - r * n // self.world for r in range(self.world)]
        padded = np.zeros((max(sizes), *part.shape[1:]), part.dtype)
        padded[: len(part)] = part
        local = self._tensor(torch.from_numpy(padded))
        parts = [torch.empty_like(local) for _ in range(self.world)]
        tdist.all_gather(parts, local)
        return np.concatenate([p[:s].cpu().numpy() for p, s in zip(parts, sizes)])

    def sampler(self, dataset: Dataset, seed: int) -> DistributedSampler | None:
        """This rank's share of each epoch's shuffled windows; None in one process (the loader shuffles)."""
        if not self.active:
            return None
        return DistributedSampler(dataset, num_replicas=self.world, rank=self.rank, shuffle=True, seed=seed)

    def seed(self, seed: int, step: int) -> None:
        """Under torchrun, seed torch and numpy per (seed, rank, step): ranks draw different training noise,
        and a resumed job draws reproducibly. One process keeps its RNG as it is."""
        if self.active:
            s = int(np.random.SeedSequence([seed, self.rank, step]).generate_state(1)[0])
            torch.manual_seed(s)
            np.random.seed(s)

    def close(self) -> None:
        if self.active and tdist.is_initialized():
            tdist.destroy_process_group()


SINGLE = Dist()


def init(device: torch.device, timeout_s: int = 1800) -> tuple[Dist, torch.device]:
    """Join torchrun's process group when this process was started by torchrun; -> (Dist, device).

    Under torchrun a CUDA device becomes ``cuda:LOCAL_RANK`` (backend nccl); a CPU device stays (gloo).
    Started any other way: (SINGLE, device) and nothing is initialised.
    """
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return SINGLE, device
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} GPUs; "
                              "start at most one process per GPU (torchrun --nproc_per_node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                 device_id=device if device.type == "cuda" else None)
    return Dist(rank=rank, world=world, local_rank=local, active=True), device


def micro_batch(batch_size: int, world: int, grad_accum: int) -> int:
    """The windows per rank per micro-batch: ``batch_size / (world * grad_accum)``; ConfigError naming the
    values when they do not divide (the global batch stays ``train.batch_size``)."""
    if grad_accum < 1:
        raise ConfigError(f"train.grad_accum must be >= 1, got {grad_accum}")
    parts = world * grad_accum
    if batch_size < parts or batch_size % parts:
        raise ConfigError(f"train.batch_size={batch_size} does not split into {world} processes x train.grad_accum="
                          f"{grad_accum} equal micro-batches; use a multiple of {parts}")
    return batch_size // parts


def autocast(precision: Any, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward passes' autocast: bf16 on CUDA, nothing for fp32; bf16 elsewhere is a ConfigError."""
    if str(precision) == "fp32":
        return contextlib.nullcontext()
    if str(precision) != "bf16":
        raise ConfigError(f"train.precision={precision!r}: expected fp32 or bf16")
    if device.type != "cuda":
        raise ConfigError(f"train.precision=bf16 autocasts on a CUDA device only; this run's device is {device}: "
                          "use train.precision=fp32")
    return torch.autocast("cuda", dtype=torch.bfloat16)


class LossModule(nn.Module):
    """``policy.compute_loss(batch)`` as ``forward(batch)``: DDP synchronises gradients of the passes that go
    through a wrapped module's forward. ``loss_fn(policy, batch) -> (loss, metrics)`` replaces compute_loss."""

    def __init__(self, policy: nn.Module, loss_fn: Callable | None = None):
        super().__init__()
        self.policy, self.loss_fn = policy, loss_fn

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss_fn(self.policy, batch) if self.loss_fn is not None else self.policy.compute_loss(batch)


class GradientStep:
    """One optimizer step from A micro-batches: each ``(loss / A).backward()`` (in ``precision``), gradients
    averaged over ranks by DDP on the last micro-batch, clipped to ``grad_clip``, then ``optimizer.step()``.

    ``step(micro_batches)`` -> (metrics averaged over the micro-batches, gradient norm before clipping).
    """

    def __init__(self, policy: nn.Module, optimizer: torch.optim.Optimizer, dist: Dist, device: torch.device,
                 grad_clip: float, precision: Any = "fp32", loss_fn: Callable | None = None):
        self.policy, self.optimizer, self.grad_clip = policy, optimizer, grad_clip
        autocast(precision, device)  # a bad precision is refused now, not at the first step
        self.autocast = lambda: autocast(precision, device)
        module = LossModule(policy, loss_fn)
        # find_unused_parameters: a step may leave parameters out (a null language token when none is dropped)
        self.model = (DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                              find_unused_parameters=True) if dist.active else module)

    def train(self) -> None:
        self.model.train()

    def step(self, micro_batches: Sequence[dict[str, Any]]) -> tuple[dict[str, float], torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        n, totals = len(micro_batches), {}
        for i, batch in enumerate(micro_batches):
            ddp = isinstance(self.model, DistributedDataParallel)
            with self.model.no_sync() if ddp and i < n - 1 else contextlib.nullcontext():
                with self.autocast():
                    loss, metrics = self.model(batch)
                (loss / n if n > 1 else loss).backward()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v) / n
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.grad_clip)
        self.optimizer.step()
        return totals, grad_norm


class NullWriter:
    """A SummaryWriter stand-in for ranks other than 0: every call does nothing."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None
