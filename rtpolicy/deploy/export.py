"""Policy bundles: everything a robot needs to run a policy, nothing from training.

    python -m rtpolicy.deploy.export --checkpoint runs/.../last.safetensors --out bundles/pick-place
        [--set num_inference_steps=1] [--joint-names a b c] [--control-rate 50]

A bundle is a folder with
- ``policy.safetensors``: the EMA weights (normalizer stats and e.g. truncated anchors are buffers
  in them), with the bundle JSON in the safetensors header as well;
- ``bundle.json``: ``bundle_version``, the policy/denoiser config (inference overrides applied: this
  is the sampler schedule that runs), observation spec (key -> shape, description), action spec
  (kind, names, limits, which dims are deltas), joint names, control rate, task (name, task ids),
  normalizer stats (readable copies of the buffers), the source checkpoint and the SHA-256 of
  ``policy.safetensors``, which ``load_bundle`` verifies before building anything.
It loads with :func:`load_bundle` alone: no Hydra config, dataset or training code is read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rtpolicy.checkpoint import load_policy
from rtpolicy.deploy.rosparams import parse_key_values

BUNDLE_VERSION = 1
ACTION_KINDS = ("ee_delta", "joint_position", "joint_velocity")


class BundleError(ValueError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _env_spec(env: str) -> dict[str, Any]:
    from rtpolicy.envs import ENVS

    try:
        return dict(getattr(ENVS.get(env).cls, "DEPLOY_SPEC", {}))
    except KeyError:
        return {}


def export_bundle(
    checkpoint: str | Path,
    out_dir: str | Path,
    policy_overrides: dict[str, Any] | None = None,
    joint_names: list[str] | None = None,
    control_rate_hz: float | None = None,
) -> Path:
    """Write a bundle for ``checkpoint`` into ``out_dir`` (created; an existing bundle is replaced
    atomically file by file). Action/observation specs default to the env family's ``DEPLOY_SPEC``."""
    policy, meta = load_policy(checkpoint, "cpu", policy_overrides)
    cfg = meta["config"]
    task = cfg.get("task", {})
    spec = _env_spec(task.get("env", ""))
    shapes = meta["shapes"]
    action_dim = int(shapes["action"][0])
    names = spec.get("action_names") or [f"a{i}" for i in range(action_dim)]
    if len(names) != action_dim:
        raise BundleError(f"env spec names {len(names)} action dims, the policy has {action_dim}")
    rate = float(control_rate_hz or spec.get("control_rate_hz") or 0)
    if rate <= 0:
        raise BundleError("no control rate known for this env family: pass control_rate_hz")
    bundle = {
        "bundle_version": BUNDLE_VERSION,
        "policy": {k: v for k, v in cfg["policy"].items()} | dict(policy_overrides or {}),
        "denoiser": cfg["denoiser"],
        "shapes": shapes,
        "num_tasks": meta.get("num_tasks", 0),
        "task": {"env": task.get("env"), "name": task.get("name"), "tasks": list(task.get("tasks") or [])},
        "observation": {k: {"shape": list(v), "description": spec.get("obs_names", {}).get(k, "")}
                        for k, v in shapes.items() if k != "action"},
        "action": {
            "kind": spec.get("action_kind", "joint_position"),
            "names": names,
            "low": spec.get("action_low", [float("-inf")] * action_dim),
            "high": spec.get("action_high", [float("inf")] * action_dim),
            "delta_dims": spec.get("delta_dims", []),
        },
        "joint_names": list(joint_names or []),
        "control_rate_hz": rate,
        "horizons": {"obs": policy.obs_horizon, "action": policy.action_horizon, "chunk": policy.horizon},
        "normalizer": {k[len("normalizer.stats."):]: v.tolist() for k, v in policy.state_dict().items()
                       if k.startswith("normalizer.stats.")},
        "source": {"checkpoint": str(checkpoint), "step": meta.get("step"), "schema_version": meta.get("schema_version")},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "policy.safetensors"
    tmp = out / f".policy.safetensors.tmp-{os.getpid()}"
    state = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    save_file(state, str(tmp), metadata={"rtpolicy_bundle": json.dumps(bundle)})
    os.replace(tmp, weights)
    bundle["weights_sha256"] = _sha256(weights)
    tmp_json = out / f".bundle.json.tmp-{os.getpid()}"
    tmp_json.write_text(json.dumps(bundle, indent=2))
    os.replace(tmp_json, out / "bundle.json")
    return out


def read_bundle(bundle_dir: str | Path) -> dict[str, Any]:
    """bundle.json, checked: version, required fields, and the weights' SHA-256."""
    d = Path(bundle_dir)
    path = d / "bundle.json"
    if not path.is_file():
        raise BundleError(f"{d} is not a policy bundle: no bundle.json")
    try:
        bundle = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from e
    version = bundle.get("bundle_version")
    if version != BUNDLE_VERSION:
        raise BundleError(f"{path}: bundle_version {version!r}, this rtpolicy reads version {BUNDLE_VERSION}")
    missing = [k for k in ("policy", "denoiser", "shapes", "action", "control_rate_hz", "weights_sha256") if k not in bundle]
    if missing:
        raise BundleError(f"{path}: missing fields {missing}")
    if bundle["action"].get("kind") not in ACTION_KINDS:
        raise BundleError(f"{path}: action.kind must be one of {list(ACTION_KINDS)}, got {bundle['action'].get('kind')!r}")
    weights = d / "policy.safetensors"
    if not weights.is_file():
        raise BundleError(f"{d}: policy.safetensors is missing")
    digest = _sha256(weights)
    if digest != bundle["weights_sha256"]:
        raise BundleError(f"{weights}: SHA-256 {digest[:12]}... does not match bundle.json ({bundle['weights_sha256'][:12]}...); "
                          "the weights were changed or truncated")
    return bundle


def load_bundle(bundle_dir: str | Path, device: str | torch.device = "cpu"):
    """-> (policy in eval mode, bundle dict); verifies the bundle first (see :func:`read_bundle`)."""
    from omegaconf import OmegaConf

    from rtpolicy.policies import build_policy, load_all
    from rtpolicy.policies.base import POLICIES
    from rtpolicy.policies.denoisers.base import DENOISERS

    bundle = read_bundle(bundle_dir)
    load_all()
    try:
        pol = OmegaConf.merge(OmegaConf.structured(POLICIES.get(bundle["policy"]["name"]).config), bundle["policy"])
        den = OmegaConf.merge(OmegaConf.structured(DENOISERS.get(bundle["denoiser"]["name"]).config), bundle["denoiser"])
    except Exception as e:  # unknown head/denoiser or a field this version lacks: name the bundle
        raise BundleError(f"{bundle_dir}: config does not match this rtpolicy ({e})") from e
    policy = build_policy(pol, den, bundle["shapes"], bundle.get("num_tasks", 0))
    try:
        policy.load_state_dict(load_file(str(Path(bundle_dir) / "policy.safetensors")))
    except RuntimeError as e:
        raise BundleError(f"{bundle_dir}: weights do not match the policy its config builds: {e}") from e
    return policy.to(device).eval(), bundle


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m rtpolicy.deploy.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True, help="bundle folder")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="inference overrides baked into the bundle, e.g. num_inference_steps=1 (values parsed as JSON)")
    ap.add_argument("--joint-names", nargs="*", default=None)
    ap.add_argument("--control-rate", type=float, default=None, help="Hz (default: the env family's)")
    args = ap.parse_args(argv)
    try:
        over, _ = parse_key_values(args.set)
    except ValueError as e:
        ap.error(f"--set: {e}")
    out = export_bundle(args.checkpoint, args.out, over, args.joint_names, args.control_rate)
    print(f"bundle: {out} ({json.loads((out / 'bundle.json').read_text())['weights_sha256'][:12]}...)")
    return out


def cli() -> None:
    """Console-script entry point (``sys.exit`` would treat main()'s return value as an error)."""
    main()


if __name__ == "__main__":
    cli()
