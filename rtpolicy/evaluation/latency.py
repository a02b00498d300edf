"""The batch-1 latency probe: ``predict_chunk`` timed on real observations from the rollouts, after warm-up."""

from __future__ import annotations

import time

import numpy as np
import torch

WARMUP = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe(policy, observations: list[dict[str, torch.Tensor]], reps: int, device: torch.device) -> dict[str, float]:
    """``reps`` timed batch-1 calls (after ``WARMUP`` untimed ones) cycling over ``observations`` (network inputs,
    batch 1) -> {"chunk_ms_p50", "chunk_ms_p95"}. The policy is reset before and after."""
    if not observations:
        raise ValueError("the latency probe needs at least one observation")
    policy.reset()
    ms = []
    with torch.inference_mode():
        for r in range(WARMUP + reps):
            obs = observations[r % len(observations)]
            _sync(device)
            tic = time.perf_counter()
            policy.predict_chunk(obs)
            _sync(device)
            if r >= WARMUP:
                ms.append((time.perf_counter() - tic) * 1e3)
    policy.reset()
    return {"chunk_ms_p50": float(np.percentile(ms, 50)), "chunk_ms_p95": float(np.percentile(ms, 95))}
