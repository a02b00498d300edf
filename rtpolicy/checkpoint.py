"""Checkpoints: one safetensors file per checkpoint, JSON metadata in its header.

Tensors:   ``ema/<param>`` (weights used for evaluation and deployment), ``model/<param>``,
           ``optim/<param index>/<state name>``, ``rng/torch``.
Metadata:  ``rtpolicy`` -> JSON {schema_version, step, config (resolved), shapes, num_tasks,
           optim_groups, lr_scheduler, metrics}. Normalizer stats are buffers inside ``ema/`` and
           ``model/``, so a checkpoint evaluates without its dataset.
Writes go to a temporary file in the same folder and are moved into place with ``os.replace``
(:func:`atomic_path`), so a killed writer never leaves a half-written checkpoint under the final name,
and its leftover temporary file is removed by the next write. ``python -m rtpolicy.checkpoint PATH``
prints the metadata.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rtpolicy.errors import UserError

SCHEMA_VERSION = 1
_META_KEY = "rtpolicy"


class CheckpointError(UserError):
    pass


def _migrate(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """Bring older metadata up to SCHEMA_VERSION; each step is one small function."""
    version = meta.get("schema_version")
    if version is None:
        raise CheckpointError(f"{path}: metadata has no schema_version; not an rtpolicy checkpoint")
    if version > SCHEMA_VERSION:
        raise CheckpointError(
            f"{path}: schema_version {version} is newer than this rtpolicy understands ({SCHEMA_VERSION}); upgrade rtpolicy"
        )
    while version < SCHEMA_VERSION:
        meta = _MIGRATIONS[version](meta)
        version = meta["schema_version"]
    return meta


def _v0_to_v1(meta: dict[str, Any]) -> dict[str, Any]:
    # v0 (pre-release) stored no task count; single-task policies are the v0 default.
    return {**meta, "num_tasks": meta.get("num_tasks", 0), "schema_version": 1}


_MIGRATIONS = {0: _v0_to_v1}


def _flat_optim(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    tensors = {}
    for idx, st in state["state"].items():
        for name, val in st.items():
            tensors[f"optim/{idx}/{name}"] = torch.as_tensor(val)
    return tensors, state["param_groups"]


def _unflat_optim(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, val in tensors.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = val
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    path: str | Path,
    *,
    ema: torch.nn.Module,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any = None,
    step: int,
    config: dict[str, Any],
    shapes: dict[str, list[int]],
    num_tasks: int = 0,
    metrics: dict[str, Any] | None = None,
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"ema/{k}": v.detach().cpu().contiguous().clone() for k, v in ema.state_dict().items()}
    meta: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "step": step,
        "config": config,
        "shapes": shapes,
        "num_tasks": num_tasks,
        "metrics": metrics or {},
    }
    if getattr(ema, "processor", None) is not None:  # raw observation -> network input (rtpolicy.processors)
        meta["processor"] = ema.processor.config()
    if model is not None:
        tensors |= {f"model/{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if optimizer is not None:
        opt_tensors, meta["optim_groups"] = _flat_optim(optimizer.state_dict())
        tensors |= {k: v.cpu().contiguous() for k, v in opt_tensors.items()}
    if lr_scheduler is not None:
        meta["lr_scheduler"] = {k: v for k, v in lr_scheduler.state_dict().items() if k != "lr_lambdas"}
    tensors["rng/torch"] = torch.get_rng_state()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary name beside ``path`` to write to; on success it gets the mode a plain new file
    would (0666 minus the umask: safetensors writes 0600, which the robot's user could not read) and is
    moved onto ``path`` in one ``os.replace``; on failure it is removed. Temporary files left by writers
    that were killed (their pid is gone) are removed first."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.stem}.tmp-*{path.suffix}"):
        pid = stale.name[len(f".{path.stem}.tmp-"): len(stale.name) - len(path.suffix)]
        if pid.isdigit() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")  # keeps the suffix (torch.export wants .pt2)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """-> (metadata, tensors); raises CheckpointError naming the file for anything unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({e})") from e
    if _META_KEY not in header:
        raise CheckpointError(f"{path}: safetensors file has no '{_META_KEY}' metadata; not an rtpolicy checkpoint")
    try:
        meta = json.loads(header[_META_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata is not valid JSON ({e})") from e
    return _migrate(meta, path), tensors


def _sub(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + "/")}


def restore_training(path, model, ema, optimizer, lr_scheduler) -> dict[str, Any]:
    """Load model, EMA, optimizer, LR schedule and RNG state in place; returns the metadata."""
    meta, tensors = read_checkpoint(path)
    model.load_state_dict(_sub(tensors, "model"))
    ema.load_state_dict(_sub(tensors, "ema"))
    optimizer.load_state_dict(_unflat_optim(tensors, meta["optim_groups"]))
    # The schedule's lambdas are code, not state: rebuilt by the caller, never stored (no pickle).
    lr_scheduler.load_state_dict({**meta["lr_scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    torch.set_rng_state(tensors["rng/torch"])
    return meta


def load_policy(path: str | Path, device: str | torch.device = "cpu", policy_overrides: dict[str, Any] | None = None):
    """Build the policy from a checkpoint's own config and load its EMA weights.

    ``policy_overrides`` changes inference-only fields (e.g. ``num_inference_steps``, ``sampler``).
    Returns (policy in eval mode, metadata).
    """
    from rtpolicy.factory import policy_from_stored

    meta, tensors = read_checkpoint(path)
    stored = {"policy": meta["config"].get("policy"), "denoiser": meta["config"].get("denoiser"),
              "shapes": meta.get("shapes"), "num_tasks": meta.get("num_tasks", 0), "processor": meta.get("processor")}
    policy = policy_from_stored(stored, _sub(tensors, "ema"), source=str(path), overrides=policy_overrides,
                                error=CheckpointError)
    return policy.to(device), meta


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m rtpolicy.checkpoint", description="Print a checkpoint's metadata as JSON.")
    ap.add_argument("checkpoint")
    meta, _ = read_checkpoint(ap.parse_args(argv).checkpoint)
    print(json.dumps({k: v for k, v in meta.items() if k != "optim_groups"}, indent=2))


if __name__ == "__main__":
    from rtpolicy.errors import run_cli

    run_cli(main)
