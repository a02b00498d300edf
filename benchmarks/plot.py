"""MT10 success against per-chunk latency for every head, sampler, denoiser and backend, from the committed rows.

    python benchmarks/plot.py [--out docs/img/success_vs_latency.png]

Success (y): the ``task: "mean"`` rows of the MT10 result files (``SUCCESS_FILES``; 500 episodes each, Wilson
95% CI as error bars; each one training run). Latency (x, log scale): the median per-chunk time of the same
setting in the interleaved latency benchmark (``latency.json``), batch 1 on this project's 2-core CPU. An ONNX
Runtime point sits at that torch latency divided by ORT's speedup over torch measured side by side in
``latency_ort_warm.json`` (10 back-to-back calls per setting and rep, 1 thread each, as in a control loop). A setting with no latency-benchmark row
(EDM DPM-Solver++(2M)-4, MoDE's fused experts) is placed at the chunk latency its own evaluation measured
(hollow marker). Streaming heads produce one action per call: their x is the per-tick time.
LeRobot's default DiffusionPolicy (DDPM-100, timed in its own venv by ``benchmarks/lerobot_peer.py``) is marked
by its latency only: its MT10 success has not been measured here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
# (file, label suffix): the MT10 runs; success.json holds every head on unet1d (4000 steps)
SUCCESS_FILES = [("success.json", " (16-step buffer)"), ("success_streaming_h8.json", " (8-step buffer)"),
                 ("success_cache.json", ""), ("success_mode.json", ""), ("ort_mt10.json", "")]
COLORS = {"diffusion": "tab:blue", "edm": "tab:orange", "truncated": "tab:green", "streaming": "tab:purple"}
MARKERS = {"unet1d": "o", "transformer": "s", "mode": "D"}


def load(name: str) -> list[dict]:
    path = BENCH / name
    return json.loads(path.read_text()) if path.exists() else []


def latency_index() -> dict[tuple, float]:
    """(denoiser, head, sampler, steps, backend[, cache]) -> ms median, from the latency benchmark rows."""
    out = {}
    speedup = {}  # ORT rows: (denoiser, head, sampler, steps) -> speedup over torch in the same interleaved run
    for row in load("latency_ort_warm.json"):
        if row["head"].endswith("@ort") and row.get("obs") != "camera":
            speedup[(row["denoiser"], row["head"].removesuffix("@ort"), row["sampler"], row["steps"])] = row["speedup_vs_torch"]
    for row in load("latency.json"):
        head = row["head"]
        backend = "torch"
        if row.get("obs") == "camera":
            continue
        if (sp := speedup.get((row["denoiser"], head, row["sampler"], row["steps"]))) is not None:
            out[(row["denoiser"], head, row["sampler"], row["steps"], "ort")] = row["ms_median"] / sp
        if "+" in head and "cache_param" in row:  # diffusion+bac (4) -> the success files' sampler ddim+bac4
            base, cache = head.split("+", 1)
            key = (row["denoiser"], base, f"ddim+{cache}{row['cache_param']}", row["steps"], backend)
        else:
            key = (row["denoiser"], head, row["sampler"], row["steps"], backend)
        out[key] = row["ms_median"]
    return out


def points() -> list[dict]:
    lat = latency_index()
    pts = []
    for name, suffix in SUCCESS_FILES:
        for r in load(name):
            if r.get("task") != "mean" or r.get("train_seed", 0) != 0:
                continue
            den = r.get("denoiser", "unet1d")
            backend = r.get("backend", "torch")
            key = (den, r["head"], r["sampler"], r["steps"], backend)
            measured = key in lat
            if not measured and r["head"] == "diffusion" and r["sampler"] == "ddim+experts":
                key = (den, "mode+experts_cached", "ddim", 10, backend)
                measured = key in lat
            ms = lat[key] if measured else r.get("chunk_ms_p50")
            if ms is None:
                continue
            label = f"{r['head']} {r['sampler']}-{r['steps']}" + (suffix if r["head"] == "streaming" else "")
            label += f" [{den}]" if den != "unet1d" else ""
            label += f" ({r['checkpoint_note']})" if r.get("checkpoint_note") else ""
            pts.append({"label": label + (" ORT" if backend == "ort" else ""), "head": r["head"], "denoiser": den,
                        "backend": backend, "ms": ms, "success": r["success"], "ci95": r["ci95"], "benchmarked": measured})
    return pts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs" / "img" / "success_vs_latency.png"))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = points()
    fig, ax = plt.subplots(figsize=(10, 6.2), dpi=120)
    for p in pts:
        color = COLORS.get(p["head"], "tab:gray")
        lo, hi = p["ci95"]
        face = color if p["benchmarked"] else "white"
        marker = "*" if p["backend"] == "ort" else MARKERS.get(p["denoiser"], "o")
        ax.errorbar(p["ms"], p["success"], yerr=[[p["success"] - lo], [hi - p["success"]]], fmt=marker, color=color,
                    mfc=face, ms=14 if p["backend"] == "ort" else 8, capsize=2, lw=1, alpha=0.9)
        offset = (6, -12) if p["backend"] == "ort" else (6, 4)
        ax.annotate(p["label"], (p["ms"], p["success"]), textcoords="offset points", xytext=offset, fontsize=6.5, color=color)
    peer = next((r for r in load("latency.json") if r["head"] == "lerobot_diffusion"), None)
    if peer is not None:
        ax.axvline(peer["ms_median"], color="black", ls="--", lw=1)
        ax.text(peer["ms_median"] * 0.93, 0.02, f"LeRobot default DiffusionPolicy\n(DDPM-100, {peer['ms_median'] / 1e3:.1f} s/chunk;\n"
                "latency only: MT10 success not measured)", ha="right", va="bottom", fontsize=7.5, transform=ax.get_xaxis_transform())
    ax.set_xscale("log")
    ax.set_xlabel("per-chunk latency, ms (log; batch 1, 2-core CPU; streaming: per tick)")
    ax.set_ylabel("Meta-World MT10 success (Wilson 95% CI; 500 episodes,\n200 for the 2000-step checkpoint)")
    ax.set_title("MT10 success vs inference latency: every head, sampler, denoiser and backend")
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=h) for h, c in COLORS.items()]
    handles += [plt.Line2D([], [], marker=m, ls="", color="gray", label=f"{d} denoiser") for d, m in MARKERS.items()]
    handles += [plt.Line2D([], [], marker="*", ls="", ms=12, color="gray", label="ONNX Runtime backend"),
                plt.Line2D([], [], marker="o", ls="", color="gray", mfc="white", label="latency from its own eval run")]
    ax.legend(handles=handles, loc="lower left", fontsize=7.5, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    ymin = min([p["ci95"][0] for p in pts] + [0.7])
    ax.set_ylim(ymin - 0.05, 1.0)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"{len(pts)} settings; wrote {args.out}")


if __name__ == "__main__":
    main()
