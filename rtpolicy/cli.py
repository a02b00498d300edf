"""Hydra entry points behind ``train.py`` / ``eval.py`` and the ``rtpolicy-train`` / ``rtpolicy-eval`` scripts."""

from __future__ import annotations

import json
from pathlib import Path

from rtpolicy.envs.gl import configure_gl

configure_gl()  # egl with a GPU, else osmesa, unless MUJOCO_GL is set; before anything imports mujoco

import hydra  # noqa: E402

from rtpolicy.config import register_configs  # noqa: E402
from rtpolicy.errors import reported, take_traceback_flag  # noqa: E402
from rtpolicy.factory import CONF_DIR, ConfigError, task_config  # noqa: E402
REPORT_KEYS = ("success", "ci95", "episodes", "chunk_ms_p50", "chunk_ms_p95")

register_configs()


def _report(results: dict) -> None:
    print(json.dumps({k: results[k] for k in REPORT_KEYS if k in results}))


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def _train(cfg) -> None:
    from rtpolicy.training import train

    with reported():
        results = train(cfg)
    if results.get("rank", 0):  # under torchrun only rank 0 reports the run
        return
    ckpt = results["checkpoint"]
    if "success" not in results:  # eval.episodes=0: training only
        print(f"trained in {results['train_seconds']:.0f} s; checkpoint: {ckpt}")
        return
    lo, hi = results["ci95"]
    print(
        f"\nsuccess {results['success']:.2f} (95% CI {lo:.2f}-{hi:.2f}) over {results['episodes']} episodes; "
        f"chunk latency p50 {results['chunk_ms_p50']:.1f} ms, p95 {results['chunk_ms_p95']:.1f} ms (batch 1); "
        f"trained in {results['train_seconds']:.0f} s"
    )
    _report(results)
    bundle = Path("bundles") / f"{cfg.task.name}-{cfg.policy.name}"
    print(f"checkpoint: {ckpt}\nnext:\n  python eval.py checkpoint={ckpt} eval.episodes=50 eval.out=results.json\n"
          f"  python -m rtpolicy.deploy.export --checkpoint {ckpt} --out {bundle}")
    if cfg.task.env == "metaworld" and not cfg.task.tasks:
        print(f"  rtpolicy sim task={cfg.task.name} &    # a simulated robot on ROS 2\n"
              f"  rtpolicy deploy bundle={bundle} --ros-args --params-file {CONF_DIR / 'deploy' / 'metaworld.yaml'}")


@hydra.main(config_path=str(CONF_DIR), config_name="eval", version_base="1.3")
def _eval(cfg) -> None:
    with reported():
        _evaluate(cfg)


def _evaluate(cfg) -> None:
    from omegaconf import OmegaConf

    from rtpolicy.checkpoint import load_policy
    from rtpolicy.evaluation import evaluate
    from rtpolicy.training import resolve_device

    device = resolve_device(cfg.device)
    policy, meta = load_policy(cfg.checkpoint, device, OmegaConf.to_container(cfg.policy))
    task_cfg = task_config(meta["config"]["task"])
    video_dir = Path(cfg.eval.out).parent / "videos" if cfg.eval.out else Path("eval_videos")
    if cfg.eval.runtime == "ort":  # the same policy as ONNX graphs in ONNX Runtime
        from rtpolicy.deploy.onnx import OrtPolicy

        policy = OrtPolicy.from_policy(policy.cpu(), video_dir.parent / "onnx", threads=cfg.eval.ort_threads)
    elif cfg.eval.runtime != "torch":
        raise ConfigError(f"eval.runtime must be torch or ort, got {cfg.eval.runtime!r}")
    results = evaluate(policy, task_cfg, cfg.eval, device=device, video_dir=video_dir)
    _report(results)
    if cfg.eval.out:
        print(f"results: {cfg.eval.out}")


def train_main() -> None:
    take_traceback_flag()
    _train()


def eval_main() -> None:
    take_traceback_flag()
    _eval()
