"""LeRobot's default DiffusionPolicy, timed per action chunk; run by benchmarks/latency.py in LeRobot's own venv.

Not part of rtpolicy and imports none of it: it runs under the interpreter given by
``latency.py --lerobot-python`` (a venv with ``lerobot==0.3.2``, which pins an older gymnasium).
The policy is LeRobot's ``DiffusionConfig()`` defaults (UNet down_dims 512/1024/2048, DDPM, 100
inference steps, n_obs_steps 2, horizon 16, n_action_steps 8) on the same state-only Meta-World
spaces as our heads: observation.state (4: hand xyz + gripper), observation.environment_state
(35: object and goal poses), action (4); random weights, batch 1.

Protocol: prints one JSON line (params, sampler, steps, versions), then for every ``chunk`` line read
on stdin, times ``reset()`` + ``select_action()`` (which generates one full chunk) and prints its ms.
"""

import json
import sys
import time

import torch


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    torch.manual_seed(0)
    import lerobot
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy

    cfg = DiffusionConfig(
        input_features={
            "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(4,)),
            "observation.environment_state": PolicyFeature(type=FeatureType.ENV, shape=(35,)),
        },
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(4,))},
        device="cpu",
    )
    box = {"min": -torch.ones(4), "max": torch.ones(4), "mean": torch.zeros(4), "std": torch.ones(4)}
    stats = {"observation.state": box, "action": box}
    policy = DiffusionPolicy(cfg, dataset_stats=stats).eval()
    steps = cfg.num_inference_steps or cfg.num_train_timesteps
    batch = {"observation.state": torch.randn(1, 4), "observation.environment_state": torch.randn(1, 35)}
    print(json.dumps({"params": sum(p.numel() for p in policy.parameters()), "sampler": cfg.noise_scheduler_type.lower(),
                      "steps": steps, "lerobot": getattr(lerobot, "__version__", "?"), "torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        if line.strip() != "chunk":
            raise SystemExit(f"lerobot_peer: unknown command {line.strip()!r}")
        with torch.inference_mode():
            policy.reset()
            t0 = time.perf_counter()
            policy.select_action(dict(batch))
            ms = (time.perf_counter() - t0) * 1e3
        print(f"{ms:.3f}", flush=True)


if __name__ == "__main__":
    main()
