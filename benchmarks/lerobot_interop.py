"""Interop with the ``lerobot`` package itself (format v3.0), run under lerobot's own interpreter.

Not part of rtpolicy and imports none of it. lerobot 0.4.4 (the newest release on Python 3.11; it writes
format v3.0) needs torch < 2.11, so it lives in its own venv (only PyPI, no hub access needed):

    printf 'torch==2.10.0\\ntorchvision==0.25.0\\n' > /tmp/lerobot-constraints.txt
    python3.11 -m venv ../lerobot-venv
    PIP_CONSTRAINT=/tmp/lerobot-constraints.txt ../lerobot-venv/bin/pip install torch==2.10.0 torchvision==0.25.0 lerobot==0.4.4

Modes (each prints one JSON line last; exit status 1 on a mismatch):

    write OUT        LeRobotDataset.create + add_frame + save_episode + finalize: 3 episodes of observation.state (6,),
                     action (3,) and one camera observation.images.front (48, 64, 3) stored as video (lerobot's
                     default codec), plus OUT.expected.npz with the exact arrays it was given
    read ROOT CAM    LeRobotDataset(repo_id, root=ROOT) opens a dataset rtpolicy wrote, iterates every frame and
                     compares with ROOT.expected.npz (state, action, image (N, H, W, 3) uint8, episode_ends):
                     vectors exactly, frames within codec tolerance; once per video backend: pyav, and
                     torchcodec (lerobot's default) where the system's FFmpeg libraries let it load

tests/test_formats.py runs both directions against rtpolicy's reader and writer:

    HF_HUB_OFFLINE=1 ../lerobot-venv/bin/python benchmarks/lerobot_interop.py write /tmp/theirs
    python -m rtpolicy.datasets.convert /tmp/theirs /tmp/theirs.zarr
"""

import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LENGTHS = [18, 25, 12]
REPO_ID = "local/rtpolicy-interop"


def _frames(L: int, e: int, h: int = 48, w: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    t = np.arange(L)[:, None, None]
    r = (xx * 3 + t * 5 + e * 30) % 256
    g = (yy * 4 + t * 2) % 256
    b = np.broadcast_to((xx + yy + e * 11) % 256, r.shape)
    return np.stack([r, g, b], -1).astype(np.uint8)


def write(out: Path) -> dict:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    features = {
        "observation.state": {"dtype": "float32", "shape": (6,), "names": None},
        "action": {"dtype": "float32", "shape": (3,), "names": None},
        "observation.images.front": {"dtype": "video", "shape": (48, 64, 3), "names": ["height", "width", "channels"]},
    }
    ds = LeRobotDataset.create(REPO_ID, fps=10, features=features, root=out, use_videos=True)
    rng = np.random.default_rng(0)
    expected = {"state": [], "action": [], "image": []}
    for e, L in enumerate(LENGTHS):
        frames = _frames(L, e)
        for t in range(L):
            state, action = rng.normal(size=6).astype(np.float32), rng.uniform(-1, 1, 3).astype(np.float32)
            ds.add_frame({"observation.state": state, "action": action, "observation.images.front": frames[t],
                          "task": "pick the cube" if e % 2 == 0 else "push the cube"})
            expected["state"].append(state)
            expected["action"].append(action)
        expected["image"].append(frames)
        ds.save_episode()
    ds.finalize()
    np.savez(Path(f"{out}.expected.npz"), state=np.stack(expected["state"]), action=np.stack(expected["action"]),
             image=np.concatenate(expected["image"]), episode_ends=np.cumsum(LENGTHS))
    import lerobot

    return {"lengths": LENGTHS, "lerobot": getattr(lerobot, "__version__", "?"), "codec": ds.meta.features["observation.images.front"]["info"]["video.codec"]}


def _backends() -> list[str]:
    """pyav always; torchcodec (lerobot's default decoder) where it loads (it needs the system's FFmpeg libraries)."""
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except (ImportError, OSError, RuntimeError):  # torchcodec names the FFmpeg libraries it could not load
        return ["pyav"]
    return ["pyav", "torchcodec"]


def read(root: Path, camera: str) -> dict:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    exp = np.load(Path(f"{root}.expected.npz"), allow_pickle=False)
    res = {"backends": {}}
    for backend in _backends():
        ds = LeRobotDataset(REPO_ID, root=root, video_backend=backend)
        n = len(ds)
        state, action, image, episode = [], [], [], []
        for i in range(n):
            item = ds[i]
            state.append(item["observation.state"].numpy())
            action.append(item["action"].numpy())
            image.append((item[camera].permute(1, 2, 0).numpy() * 255).round().astype(np.int16))
            episode.append(int(item["episode_index"]))
        ends = np.flatnonzero(np.diff(episode, append=-1)) + 1
        err = np.abs(np.stack(image) - exp["image"].astype(np.int16))
        r = {"frames": n, "episodes": ds.num_episodes, "state_equal": bool(np.array_equal(np.stack(state), exp["state"])),
             "action_equal": bool(np.array_equal(np.stack(action), exp["action"])),
             "episode_ends_equal": bool(np.array_equal(ends, exp["episode_ends"])),
             "image_mean_abs_err": float(err.mean()), "image_max_abs_err": int(err.max())}
        r["ok"] = r["state_equal"] and r["action_equal"] and r["episode_ends_equal"] and r["image_mean_abs_err"] < 4.0
        res["backends"][backend] = r
    res["ok"] = all(r["ok"] for r in res["backends"].values())
    return res


def main() -> int:
    mode, path = sys.argv[1], Path(sys.argv[2])
    res = write(path) if mode == "write" else read(path, sys.argv[3])
    print(json.dumps(res))
    return 0 if res.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
