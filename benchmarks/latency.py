"""Per-chunk inference latency of every head and sampler setting, measured side by side in one run.

    python benchmarks/latency.py --out benchmarks/latency.json [--denoisers unet1d transformer] [--vla]
                                 [--reps 30] [--lerobot-python /path/to/lerobot-venv/bin/python]

Every head is built with the same denoiser config (the registry default) for Meta-World's state
observation (39) and action (4), batch 1, 2 torch threads, random weights (latency does not depend
on the values). Settings are timed round-robin in a shuffled order per repetition, so the machine's
noise hits them all alike. Rows: head, sampler, steps, nfe (denoiser calls per call, counted with a
forward hook), unit ("chunk" = Ha actions; "tick" = one action, streaming), ms_median, ms_p95,
ratio_vs_ddpm100 (same denoiser), ratio_vs_floor (one bare denoiser forward at batch 1).

``--backends torch ort`` adds, for every setting, the same policy exported as ONNX graphs and run in ONNX
Runtime (``rtpolicy.deploy.onnx``, ``--ort-threads`` intra-op threads, no spinning), timed in the same
interleaved rounds; rows carry ``backend`` and, for ORT, ``speedup_vs_torch``. ``--camera`` adds the camera
policy of the image-only recipe (truncated 1-step, three 84x84 cameras, small CNN, proprio). ``--settings``
keeps only the named settings (e.g. ``truncated:1 diffusion:ddim:10``; DDPM-100 and the floor always run).

With ``--lerobot-python``, LeRobot's default DiffusionPolicy (its own venv; benchmarks/lerobot_peer.py)
is timed in a subprocess of that interpreter, one chunk per repetition, interleaved with ours.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from rtpolicy.policies import load_all  # noqa: E402

from rtpolicy.factory import build_policy, denoiser_config, policy_config  # noqa: E402
from rtpolicy.policies.accelerators.cache import calibrate  # noqa: E402
from rtpolicy.policies.denoisers.mode import cache_policy_experts  # noqa: E402
from rtpolicy.policies.head import denoiser_calls  # noqa: E402

SHAPES = {"state": [39], "action": [4]}
# (head, overrides): every sampler setting the heads offer at the step counts people use.
SETTINGS = [
    ("diffusion", {"sampler": "ddpm", "num_inference_steps": 100}),
    ("diffusion", {"sampler": "ddim", "num_inference_steps": 10}),
    ("edm", {"sampler": "euler", "num_inference_steps": 3}),
    ("edm", {"sampler": "euler", "num_inference_steps": 10}),
    ("edm", {"sampler": "heun", "num_inference_steps": 3}),
    ("edm", {"sampler": "heun", "num_inference_steps": 5}),
    ("edm", {"sampler": "dpmpp_2m", "num_inference_steps": 3}),
    ("edm", {"sampler": "dpmpp_2m", "num_inference_steps": 5}),
    ("edm", {"sampler": "dpmpp_2m", "num_inference_steps": 10}),
    ("truncated", {"num_inference_steps": 1}),
    ("truncated", {"num_inference_steps": 2}),
    ("streaming", {"steps_per_tick": 1}),
    ("streaming", {"steps_per_tick": 2}),
]
# feature caching of the transformer denoiser on DDIM-10 (label, calibrate() arguments)
CACHES = [("bac", {"mode": "bac", "budget": 4}), ("bac", {"mode": "bac", "budget": 3}),
          ("uniform", {"mode": "uniform", "every": 2}), ("uniform", {"mode": "uniform", "every": 3}),
          ("taylor", {"mode": "taylor", "every": 2}), ("taylor", {"mode": "taylor", "every": 3})]


def build(head: str, over: dict, den_cfg) -> torch.nn.Module:
    cfg = policy_config(head, over)
    policy = build_policy(cfg, den_cfg, SHAPES).eval()
    g = torch.Generator().manual_seed(0)
    policy.normalizer.fit({"state": torch.randn(256, 39, generator=g), "action": torch.rand(256, 4, generator=g) * 2 - 1})
    policy.prepare(torch.rand(256, policy.data_horizon, 4, generator=g) * 2 - 1)
    return policy


def label(head: str, over: dict) -> tuple[str, int]:
    sampler = over.get("sampler", {"truncated": "anchored", "streaming": "stream"}.get(head, ""))
    steps = over.get("num_inference_steps", over.get("steps_per_tick"))
    return sampler, int(steps)


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def count_nfe(policy, obs) -> int:
    """Denoiser calls of one steady-state call (after streaming's warm start). Leaves the policy warmed
    up (streaming's buffer filled), so the FLOP count taken next measures a steady-state call too."""
    n = len(denoiser_calls(policy, obs, steady=True))
    policy.predict_chunk(obs)
    return n


class Peer:
    """LeRobot's DiffusionPolicy timed in its own interpreter; one chunk per ``time()`` call."""

    def __init__(self, python: str):
        self.proc = subprocess.Popen([python, str(ROOT / "benchmarks" / "lerobot_peer.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.info = json.loads(self._read())

    def _read(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"LeRobot peer exited (rc={self.proc.wait()}); see its stderr above")
        return line

    def time(self) -> float:
        self.proc.stdin.write("chunk\n")
        return float(self._read())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def p95(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=20, method="inclusive")[-1] if len(xs) > 1 else xs[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/latency.json")
    ap.add_argument("--denoisers", nargs="+", default=["unet1d"])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--calls", type=int, default=1,
                    help="back-to-back calls of a setting per rep, timed one by one, the rep's time being their median "
                         "(1: one call each, whose caches the other settings' calls have just evicted; a control loop "
                         "calls one policy again and again, which 10 approximates)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lerobot-python", default=None, help="python of a venv with lerobot==0.3.2 installed")
    ap.add_argument("--lerobot-reps", type=int, default=10)
    ap.add_argument("--backends", nargs="+", default=["torch"], choices=["torch", "ort"])
    ap.add_argument("--ort-threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: --threads)")
    ap.add_argument("--camera", action="store_true", help="also time the three-camera small-CNN truncated policy")
    ap.add_argument("--settings", nargs="*", default=None, help="head[:sampler]:steps to keep, e.g. truncated:1")
    ap.add_argument("--vla", action="store_true", help="also time VLA policies (MiniLM backbone, 64x64 small-CNN camera, "
                    "unet1d decoder) with the truncated and streaming heads (needs the lang extra)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_all()

    obs = {"state": torch.randn(1, 2, 39)}
    timers: dict[tuple, callable] = {}
    meta: dict[tuple, dict] = {}
    ort_dir = Path(tempfile.mkdtemp(prefix="rtpolicy-ort-"))

    def add_ort(key, policy, o):
        """The same policy as ONNX graphs in ONNX Runtime, timed beside it (key: head + '@ort')."""
        if "ort" not in args.backends:
            return
        from rtpolicy.deploy.onnx import OrtPolicy

        ort = OrtPolicy.from_policy(policy, ort_dir / "-".join(map(str, key)), threads=args.ort_threads or args.threads)
        ort_key = (key[0], f"{key[1]}@ort", *key[2:])
        meta[ort_key] = dict(meta[key], backend="ort")
        ort.predict_chunk(o)  # streaming: the warm start, so the timed calls are steady-state ticks
        timers[ort_key] = (lambda p=ort: p.predict_chunk(o))

    def keep(head, over):
        sampler, steps = label(head, over)
        wanted = {tuple(s.split(":")) for s in args.settings} if args.settings is not None else None
        always = (head == "diffusion" and over.get("sampler") == "ddpm" and steps == 100)
        return wanted is None or always or (head, str(steps)) in wanted or (head, sampler, str(steps)) in wanted

    for den in args.denoisers:
        den_cfg = denoiser_config(den)
        for head, over in SETTINGS:
            if not keep(head, over):
                continue
            policy = build(head, over, den_cfg)
            sampler, steps = label(head, over)
            key = (den, head, sampler, steps)
            policy.reset()
            meta[key] = {"nfe": count_nfe(policy, obs), "unit": "tick" if head == "streaming" else "chunk",
                         "params": sum(p.numel() for p in policy.denoiser.parameters()), "backend": "torch"}
            timers[key] = (lambda p=policy: p.predict_chunk(obs))
            add_ort(key, policy, obs)
        if den == "mode" and args.settings is None:  # expert caching vs dense MoDE-architecture denoisers of the active and the total size
            ddim10 = {"sampler": "ddim", "num_inference_steps": 10}
            c = den_cfg
            width = c.expert_hidden * (c.top_k + c.shared_expert), c.expert_hidden * (c.n_experts + c.shared_expert)
            variants = [("mode+experts_cached", den_cfg, True),
                        ("dense_active_size", OmegaConf.merge(den_cfg, {"n_experts": 1, "top_k": 1, "shared_expert": False, "expert_hidden": width[0]}), False),
                        ("dense_total_size", OmegaConf.merge(den_cfg, {"n_experts": 1, "top_k": 1, "shared_expert": False, "expert_hidden": width[1]}), False)]
            for label_, dcfg, cached in variants:
                policy = build("diffusion", ddim10, dcfg)
                if cached:
                    cache_policy_experts(policy, obs)
                counts = policy.denoiser.param_counts()
                key = (den, label_, "ddim", 10)
                meta[key] = {"nfe": 10, "unit": "chunk", "params": counts["total"], "active_params": counts["active"]}
                timers[key] = (lambda p=policy: p.predict_chunk(obs))
        if den == "transformer" and args.settings is None:
            calib = {"state": torch.randn(16, 2, 39)}
            for label_, kw in CACHES:
                policy = build("diffusion", {"sampler": "ddim", "num_inference_steps": 10}, den_cfg)
                rep = calibrate(policy, calib, **kw)
                key = (den, f"diffusion+{label_}", "ddim", 10, kw.get("budget", kw.get("every")))
                meta[key] = {"nfe": 10, "unit": "chunk", "params": meta[(den, "diffusion", "ddim", 10)]["params"],
                             "computed_fraction": rep["computed_fraction"]}
                timers[key] = (lambda p=policy: p.predict_chunk(obs))
        # The floor: one bare denoiser forward at batch 1, condition precomputed.
        policy = build("diffusion", {}, den_cfg)
        with torch.inference_mode():
            cond = policy.encode(obs)
        x, t = torch.randn(1, policy.horizon, 4), torch.full((1,), 50.0)
        key = (den, "floor", "one_forward", 1)
        meta[key] = {"nfe": 1, "unit": "forward", "params": meta[(den, "diffusion", "ddpm", 100)]["params"]}
        timers[key] = (lambda p=policy, x=x, t=t, c=cond: p.denoiser(x, t, c))

    if args.camera:  # the image-only recipe's policy: truncated 1-step, three 84x84 cameras, one small CNN, proprio
        cams = ["rgb_corner", "rgb_behindGripper", "rgb_gripperPOV"]
        shapes = {"proprio": [4], **{c: [84, 84, 3] for c in cams}, "action": [4]}
        cfg = policy_config("truncated", {"obs_horizon": 1, "encoder": {"image_backbone": "small_cnn"}})
        policy = build_policy(cfg, denoiser_config("unet1d"), shapes).eval()
        g = torch.Generator().manual_seed(0)
        policy.normalizer.fit({"proprio": torch.randn(256, 4, generator=g), "action": torch.rand(256, 4, generator=g) * 2 - 1})
        policy.prepare(torch.rand(256, policy.data_horizon, 4, generator=g) * 2 - 1)
        cobs = {"proprio": torch.randn(1, 1, 4), **{c: torch.randint(0, 256, (1, 1, 84, 84, 3), dtype=torch.uint8) for c in cams}}
        key = ("camera", "truncated", "anchored", 1)
        meta[key] = {"nfe": 1, "unit": "chunk", "params": sum(p.numel() for p in policy.parameters()), "backend": "torch"}
        timers[key] = (lambda p=policy, o=cobs: p.predict_chunk(o))
        add_ort(key, policy, cobs)

    if args.vla:  # issue 7: the backbone as observation encoder, a fast head as the action decoder
        from rtpolicy.policies.encoders.vla import TOKENS_KEY, build_report_policy, count_parameters, tokenize_instructions

        ids = tokenize_instructions(["open the drawer"], "minilm", 16)
        for head, tuning in (("truncated", "lora"), ("truncated", "frozen"), ("streaming", "lora")):
            policy = build_report_policy(head, tuning)
            vobs = {"rgb": torch.randint(0, 256, (1, policy.obs_horizon, 64, 64, 3), dtype=torch.uint8),
                    "state": torch.randn(1, policy.obs_horizon, 9), TOKENS_KEY: ids}
            total, trainable = count_parameters(policy)
            key = ("vla", f"vla[{tuning}]+{head}", "anchored" if head == "truncated" else "stream", 1)
            meta[key] = {"nfe": 1, "unit": "tick" if head == "streaming" else "chunk", "params": total, "trainable_params": trainable}
            policy.reset()
            timers[key] = (lambda p=policy, o=vobs: p.predict_chunk(o))
    with torch.inference_mode():
        for key, fn in timers.items():
            if meta[key].get("backend") != "ort":  # ORT runs outside torch's FLOP counter: the same graph's torch count
                meta[key]["gflops"] = count_flops(fn) / 1e9
        for key in [k for k in timers if meta[k].get("backend") == "ort"]:
            meta[key]["gflops"] = meta[(key[0], key[1][:-4], *key[2:])]["gflops"]
    peer = Peer(args.lerobot_python) if args.lerobot_python else None
    times: dict[tuple, list[float]] = {k: [] for k in timers}
    peer_times: list[float] = []
    order = list(timers)
    rng = random.Random(0)
    with torch.inference_mode():
        for k in order:
            for _ in range(args.warmup):
                timers[k]()
        if peer:
            peer.time()  # warm-up
        for rep in range(args.reps):
            rng.shuffle(order)
            for k in order:
                block = []
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    timers[k]()
                    block.append((time.perf_counter() - t0) * 1e3)
                times[k].append(statistics.median(block))
            if peer and rep < args.lerobot_reps:
                peer_times.append(peer.time())
            print(f"\rrep {rep + 1}/{args.reps}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    if peer:
        peer.close()

    rows = []
    for den in args.denoisers:
        ddpm = statistics.median(times[(den, "diffusion", "ddpm", 100)])
        floor = statistics.median(times[(den, "floor", "one_forward", 1)])
        for key in [k for k in timers if k[0] == den]:
            _, head, sampler, steps = key[:4]
            med = statistics.median(times[key])
            row = {"denoiser": den, "head": head, "sampler": sampler, "steps": steps, **meta[key],
                   "ms_median": med, "ms_p95": p95(times[key]), "ratio_vs_ddpm100": ddpm / med, "ratio_vs_floor": med / floor}
            if len(key) == 5:  # a cached setting: its knob and the speedup over the same head uncached
                row |= {"cache_param": key[4], "speedup_vs_uncached": statistics.median(times[(den, "diffusion", "ddim", 10)]) / med}
            if head.endswith("@ort"):
                row["speedup_vs_torch"] = statistics.median(times[(den, head[:-4], *key[2:])]) / med
            rows.append(row)
        for key in [k for k in timers if k[0] in ("vla", "camera") and den == args.denoisers[0]]:
            med = statistics.median(times[key])
            rows.append({"denoiser": "unet1d", "head": key[1], "sampler": key[2], "steps": key[3], **meta[key], "ms_median": med,
                         "ms_p95": p95(times[key]), "ratio_vs_ddpm100": ddpm / med, "ratio_vs_floor": med / floor}
                        | ({"obs": key[0]} if key[0] == "camera" else {})
                        | ({"speedup_vs_torch": statistics.median(times[(key[0], key[1][:-4], *key[2:])]) / med}
                           if key[1].endswith("@ort") else {}))
        if peer_times:
            med = statistics.median(peer_times)
            rows.append({"denoiser": "lerobot_unet", "head": "lerobot_diffusion", "sampler": peer.info["sampler"],
                         "steps": peer.info["steps"], "nfe": peer.info["steps"], "unit": "chunk", "params": peer.info["params"],
                         "ms_median": med, "ms_p95": p95(peer_times), "ratio_vs_ddpm100": ddpm / med, "ratio_vs_floor": med / floor})

    print(f"\n{'denoiser':12s} {'head':22s} {'sampler':11s} {'steps':>5s} {'nfe':>4s} {'unit':>7s} {'GFLOP':>7s} {'ms p50':>9s} "
          f"{'ms p95':>9s} {'DDPM100/x':>10s} {'x/floor':>8s}")
    for r in rows:
        head = r["head"] + (f"({r['cache_param']})" if "cache_param" in r else "")
        print(f"{r['denoiser']:12s} {head:22s} {r['sampler']:11s} {r['steps']:5d} {r['nfe']:4d} {r['unit']:>7s} "
              f"{r.get('gflops', float('nan')):7.3f} {r['ms_median']:9.2f} {r['ms_p95']:9.2f} {r['ratio_vs_ddpm100']:10.1f} "
              f"{r['ratio_vs_floor']:8.2f}" + (f"  {r['speedup_vs_uncached']:.2f}x vs uncached" if "cache_param" in r else "")
              + (f"  {r['speedup_vs_torch']:.2f}x vs torch" if "speedup_vs_torch" in r else ""))
    if peer_times:
        for den in args.denoisers:
            fastest = min((r for r in rows if r["denoiser"] == den and r["unit"] == "chunk"), key=lambda r: r["ms_median"])
            print(f"LeRobot default DiffusionPolicy ({peer.info['params'] / 1e6:.0f}M params, {peer.info['sampler']}-"
                  f"{peer.info['steps']}): {statistics.median(peer_times):.0f} ms/chunk = "
                  f"{statistics.median(peer_times) / fastest['ms_median']:.0f}x our fastest {den} head "
                  f"({fastest['head']} {fastest['sampler']}-{fastest['steps']})")
    else:
        print("peer not measured: pass --lerobot-python PATH (a venv with lerobot==0.3.2) to time LeRobot's DiffusionPolicy")
    for r in rows:  # how it was measured
        r |= {"torch_threads": args.threads, "calls_per_rep": args.calls} | (
            {"ort_threads": args.ort_threads or args.threads} if "ort" in args.backends else {})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
