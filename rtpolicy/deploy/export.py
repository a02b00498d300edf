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
  ``policy.safetensors``, which ``load_bundle`` verifies before building anything;
- optionally (``--program``) ``denoiser.pt2``: the denoiser as a ``torch.export`` program (graph as
  JSON, raw tensor payloads), for runtimes that run the graph without our Python classes. Export
  checks that the program's output equals the eager denoiser's on the head's own inputs (captured
  from a real ``predict_chunk`` call) to ``PROGRAM_ATOL``, and :func:`load_program` refuses archives
  with pickled payloads before ``torch.export.load`` reads them.
It loads with :func:`load_bundle` alone: no Hydra config, dataset or training code is read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from omegaconf import OmegaConf

from rtpolicy.checkpoint import atomic_path, load_policy
from rtpolicy.deploy.rosparams import parse_key_values
from rtpolicy.errors import UserError, run_cli

BUNDLE_VERSION = 1
PROGRAM_FILE = "denoiser.pt2"
PROGRAM_ATOL = 1e-5
ACTION_KINDS = ("ee_delta", "joint_position", "joint_velocity")


class BundleError(UserError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _env_spec(task: dict[str, Any]) -> dict[str, Any]:
    """The env family's ``DEPLOY_SPEC``, or its ``deploy_spec(env_kwargs)`` where the spec depends on them
    (which may refuse: a UserError naming what the node cannot command)."""
    from rtpolicy.envs import ENVS

    try:
        cls = ENVS.get(task.get("env", "")).cls
    except KeyError:
        return {}
    if hasattr(cls, "deploy_spec"):
        return dict(cls.deploy_spec(dict(task.get("env_kwargs") or {})))
    return dict(getattr(cls, "DEPLOY_SPEC", {}))


def export_bundle(
    checkpoint: str | Path,
    out_dir: str | Path,
    policy_overrides: dict[str, Any] | None = None,
    joint_names: list[str] | None = None,
    control_rate_hz: float | None = None,
    program: bool = False,
    onnx: bool = False,
) -> Path:
    """Write a bundle for ``checkpoint`` into ``out_dir`` (created; an existing bundle is replaced
    atomically file by file). Action/observation specs default to the env family's ``DEPLOY_SPEC``.
    ``program=True`` also writes the parity-checked ``torch.export`` denoiser (:func:`export_program`);
    ``onnx=True`` the whole chunk as ONNX graphs for ONNX Runtime (:mod:`rtpolicy.deploy.onnx`)."""
    if onnx:  # checked before anything is written
        import importlib.util

        missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise BundleError(f"--onnx needs {' and '.join(missing)}: pip install 'rtpolicy[ort]'")
    policy, meta = load_policy(checkpoint, "cpu", policy_overrides)
    cfg = meta["config"]
    task = cfg.get("task", {})
    spec = _env_spec(task)
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
        "policy": OmegaConf.to_container(policy.cfg, enum_to_str=True),  # inference overrides applied
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
            "twist_axes": spec.get("twist_axes"),  # ee_delta: Twist component per delta dim (None: linear xyz, angular xyz)
        },
        "joint_names": list(joint_names or []),
        "control_rate_hz": rate,
        "horizons": {"obs": policy.obs_horizon, "action": policy.action_horizon, "chunk": policy.horizon},
        "processor": policy.processor.config(),  # raw observation -> network input; its language step turns instruction text into the policy's language key
        "normalizer": {k[len("normalizer.stats."):]: v.tolist() for k, v in policy.state_dict().items()
                       if k.startswith("normalizer.stats.")},
        "source": {"checkpoint": str(checkpoint), "step": meta.get("step"), "schema_version": meta.get("schema_version")},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "policy.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"rtpolicy_bundle": json.dumps(bundle)})
    bundle["weights_sha256"] = _sha256(weights)
    if program:
        bundle["program"] = export_program(policy, out / PROGRAM_FILE)
    else:
        (out / PROGRAM_FILE).unlink(missing_ok=True)  # a replaced bundle must not keep a stale program
    from rtpolicy.deploy import onnx as ort_backend

    for stale in (ort_backend.ONNX_FILE, ort_backend.WARM_FILE):
        (out / stale).unlink(missing_ok=True)
    if onnx:
        try:
            graphs = ort_backend.export_onnx(policy, out)
        except ort_backend.OnnxExportError as e:
            raise BundleError(str(e)) from e
        bundle["onnx"] = {kind: g | {"sha256": _sha256(out / g["file"])} for kind, g in graphs.items()}
    with atomic_path(out / "bundle.json") as tmp:
        tmp.write_text(json.dumps(bundle, indent=2))
    return out


def _denoiser_inputs(policy) -> tuple[torch.Tensor, ...]:
    """The (x, t, cond) of the denoiser's first call in a batch-1 ``predict_chunk`` on a zero observation."""
    from rtpolicy.policies.head import denoiser_calls

    obs = {k: torch.zeros(1, policy.obs_horizon, *v, dtype=torch.long if k == "lang_tokens" else torch.float32)
           for k, v in policy.obs_shapes.items()}
    if getattr(policy, "num_tasks", 0):
        obs["task_id"] = torch.zeros(1, dtype=torch.long)
    captured = denoiser_calls(policy, obs)
    if not captured:
        raise BundleError("predict_chunk never called the denoiser; nothing to export")
    return captured[0]


def export_program(policy, path: Path) -> dict[str, Any]:
    """``policy.denoiser`` as a ``torch.export`` program at ``path`` (batch 1, the head's input shapes).

    The program is run on the captured inputs and on fresh random ones of the same shapes and must
    match the eager denoiser to ``PROGRAM_ATOL``; otherwise (or if export fails) -> BundleError and no
    file. Returns the bundle entry: file, SHA-256, input shapes/dtypes, max abs difference.
    """
    denoiser = policy.denoiser.eval()
    args = _denoiser_inputs(policy)
    try:
        ep = torch.export.export(denoiser, args)
    except Exception as e:  # torch.export names the unsupported construct; keep its message
        raise BundleError(f"torch.export could not trace the {type(denoiser).__name__} denoiser: {e}") from e
    ep._example_inputs = None  # torch.export.save would pickle them; the bundle records their shapes instead
    gen = torch.Generator().manual_seed(0)
    probes = [args, tuple(torch.randn(a.shape, generator=gen) if a.is_floating_point() else a for a in args)]
    with torch.no_grad():
        diff = max(float((ep.module()(*p) - denoiser(*p)).abs().max()) for p in probes)
    if not diff <= PROGRAM_ATOL:
        raise BundleError(f"exported denoiser differs from the eager one by {diff:.3g} > {PROGRAM_ATOL}")
    with atomic_path(path) as tmp:
        torch.export.save(ep, str(tmp))
    check_program_archive(path)  # what we write must pass what we read
    return {"file": path.name, "sha256": _sha256(path), "parity_max_abs": diff,
            "inputs": [{"name": n, "shape": list(a.shape), "dtype": str(a.dtype).removeprefix("torch.")}
                       for n, a in zip(("x", "t", "cond"), args)]}


#: the only members a program archive may hold, under its one top-level folder (torch.export's .pt2 layout);
#: weights and constants are raw tensor payloads, described by their JSON configs
_PROGRAM_MEMBERS = re.compile(
    r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/[\w.-]+\.json"
    r"|data/(weights|constants)/[\w.-]+_config\.json|data/weights/weight_\d+|data/constants/(constant|tensor)_\d+"
    r"|data/sample_inputs/[\w.-]+\.pt)")


def check_program_archive(path: Path) -> None:
    """Refuse a ``.pt2`` archive that could run code on load: any member the bundle format does not name,
    any payload its own configs mark as pickled (``use_pickle`` parsed as JSON, not matched as text), any
    non-empty sample inputs (torch pickles those), and any custom object or pickled constant in the graph."""
    import zipfile

    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise BundleError(f"{path}: not a program archive ({e})") from e
    with z:
        infos = z.infolist()
        tops = {i.filename.split("/", 1)[0] for i in infos}
        if len(tops) != 1:
            raise BundleError(f"{path}: a program archive has one top-level folder, this one has {sorted(tops)}")
        for info in infos:
            name = info.filename.split("/", 1)[1] if "/" in info.filename else ""
            if info.is_dir():
                continue
            if not _PROGRAM_MEMBERS.fullmatch(name):
                raise BundleError(f"{path}: unexpected member {info.filename!r}; refusing to load")
            if name.startswith("data/sample_inputs/") and info.file_size:
                raise BundleError(f"{path}: {info.filename} holds pickled sample inputs; refusing to load")
            if name.endswith(".json"):
                try:
                    doc = json.loads(z.read(info))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise BundleError(f"{path}: {info.filename} is not valid JSON ({e})") from e
                if name.endswith("_config.json"):
                    entries = doc.get("config") if isinstance(doc, dict) else None
                    if not isinstance(entries, dict):
                        raise BundleError(f"{path}: {info.filename} has no 'config' table; refusing to load")
                    for key, entry in entries.items():
                        if not isinstance(entry, dict) or entry.get("use_pickle") is not False:
                            raise BundleError(f"{path}: {info.filename}: payload {key!r} is not declared pickle-free; "
                                              "refusing to load")
                elif _has_custom_objects(doc):
                    raise BundleError(f"{path}: {info.filename} holds custom (pickled) objects; refusing to load")


def _has_custom_objects(doc: Any) -> bool:
    if isinstance(doc, dict):
        return any(k in ("custom_obj", "as_custom_obj", "custom_obj_info") and v for k, v in doc.items()) or \
            any(_has_custom_objects(v) for v in doc.values())
    if isinstance(doc, list):
        return any(_has_custom_objects(v) for v in doc)
    return False


def load_program(bundle_dir: str | Path) -> torch.nn.Module:
    """The bundle's exported denoiser as a callable module ``(x, t, cond) -> (1, H, Da)``.

    Verifies the bundle and the archive's SHA-256 and refuses archives that could execute code on load
    (:func:`check_program_archive`) before ``torch.export.load`` reads them.
    """
    d = Path(bundle_dir)
    bundle = read_bundle(d)
    entry = bundle.get("program")
    if not entry:
        raise BundleError(f"{d}: the bundle has no exported program (export it with --program)")
    if not isinstance(entry, dict) or entry.get("file") != PROGRAM_FILE:
        raise BundleError(f"{d}/bundle.json: program.file must be {PROGRAM_FILE!r}, got {entry!r:.80}")
    path = d / PROGRAM_FILE
    if not path.is_file():
        raise BundleError(f"{path} is missing")
    if _sha256(path) != entry.get("sha256"):
        raise BundleError(f"{path}: SHA-256 does not match bundle.json; the program was changed or truncated")
    check_program_archive(path)
    return torch.export.load(str(path)).module()


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


BACKENDS = ("torch", "ort")


def load_bundle(bundle_dir: str | Path, device: str | torch.device = "cpu", backend: str = "torch", threads: int = 1,
                spinning: bool = False):
    """-> (policy in eval mode, bundle dict); verifies the bundle first (see :func:`read_bundle`).

    ``backend="ort"``: the bundle's ONNX graphs in ONNX Runtime (``threads`` intra-op threads, worker threads
    spinning between calls only with ``spinning``) behind the same ``reset`` / ``predict_chunk`` interface;
    needs a bundle exported with ``--onnx``."""
    from rtpolicy.factory import policy_from_stored

    if backend not in BACKENDS:
        raise BundleError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    bundle = read_bundle(bundle_dir)
    if backend == "ort":
        try:
            from rtpolicy.deploy.onnx import OrtPolicy
        except ImportError as e:
            raise BundleError(f"backend 'ort' needs onnxruntime: pip install -e '.[ort]' ({e})") from e
        return OrtPolicy(bundle_dir, bundle, threads=threads, spinning=spinning), bundle
    weights = load_file(str(Path(bundle_dir) / "policy.safetensors"))
    policy = policy_from_stored(bundle, weights, source=str(bundle_dir), error=BundleError)
    return policy.to(device), bundle


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m rtpolicy.deploy.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True, help="bundle folder")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="inference overrides baked into the bundle, e.g. num_inference_steps=1 (values parsed as JSON)")
    ap.add_argument("--joint-names", nargs="*", default=None)
    ap.add_argument("--control-rate", type=float, default=None, help="Hz (default: the env family's)")
    ap.add_argument("--program", action="store_true", help=f"also write the denoiser as a torch.export program ({PROGRAM_FILE})")
    ap.add_argument("--onnx", action="store_true", help="also write the whole chunk as ONNX graphs for ONNX Runtime (needs the ort extra)")
    args = ap.parse_args(argv)
    try:
        over, _ = parse_key_values(args.set)
    except ValueError as e:
        ap.error(f"--set: {e}")
    out = export_bundle(args.checkpoint, args.out, over, args.joint_names, args.control_rate, args.program, args.onnx)
    print(f"bundle: {out} ({json.loads((out / 'bundle.json').read_text())['weights_sha256'][:12]}...)")
    return out


def cli() -> None:
    """Console-script entry point: expected errors are one line and exit 2 (``--traceback`` keeps it)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
