"""Conversion throughput between dataset formats, and how LeRobot videos are best read for training.

    python benchmarks/formats_throughput.py [--episodes 40] [--length 100] [--out benchmarks/formats_throughput.json]

For a synthetic store of E episodes x L steps (state (39,) float32, action (4,) float32, and in the camera case
one rgb_corner (84, 84, 3) uint8 camera with smooth moving content), times every conversion the CLI offers
(zarr -> LeRobot v3 -> zarr, zarr -> robomimic HDF5 -> zarr, rosbag2 MCAP -> zarr) in steps (frames) per second,
once state-only and once with the camera.

Decoding LeRobot video for training, two ways:
  once:  decode every frame in order into the zarr cache (what ``open_dataset`` does), then read random
         training windows (To = 2 consecutive frames) from the cache;
  lazy:  for every random window, open the episode's mp4, seek to the window and decode its 2 frames
         (what a reader decoding only the frames a batch needs does).
It reports both in windows/s and the number of epochs after which decoding once has paid for itself.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rtpolicy.datasets.formats import convert
from rtpolicy.datasets.formats.lerobot import VideoCursor
from rtpolicy.datasets.replay_buffer import ReplayBuffer


def make_store(path: Path, episodes: int, length: int, camera: bool) -> int:
    rng = np.random.default_rng(0)
    buf = ReplayBuffer.create(path)
    yy, xx = np.mgrid[:84, :84]
    for e in range(episodes):
        ep = {"state": rng.normal(size=(length, 39)).astype(np.float32),
              "action": rng.uniform(-1, 1, (length, 4)).astype(np.float32)}
        if camera:
            t = np.arange(length)[:, None, None]
            r = (xx * 3 + t * 2 + e * 7) % 256
            g = (yy * 3 + t) % 256
            b = ((xx + yy) * 2 + e) % 256
            ep["rgb_corner"] = (np.stack([r, g, np.broadcast_to(b, r.shape)], -1) + rng.integers(0, 8, (length, 84, 84, 3))).astype(np.uint8)
        buf.add_episode(ep)
    buf.attrs.update({"task": "bench", "fps": 10})
    return episodes * length


def write_bag(path: Path, store: Path) -> None:
    """The store as an MCAP bag: /state (39) and /cmd (4) Float64MultiArray and /camera Image at 10 Hz."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_JAZZY)
    T = ts.types
    buf = ReplayBuffer.open(store)
    layout = T["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0)
    Header, Time = T["std_msgs/msg/Header"], T["builtin_interfaces/msg/Time"]
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        conns = {k: w.add_connection(f"/{k}", "std_msgs/msg/Float64MultiArray", typestore=ts) for k in ("state", "action")}
        cam = "rgb_corner" in buf.keys
        if cam:
            conns["rgb_corner"] = w.add_connection("/camera", "sensor_msgs/msg/Image", typestore=ts)
        data = buf.load()
        t_ns = 0
        for e in range(buf.n_episodes):
            ep = buf.get_episode(e)
            for i in range(len(ep["action"])):
                for k in ("state", "action"):
                    msg = T["std_msgs/msg/Float64MultiArray"](layout=layout, data=ep[k][i].astype(np.float64))
                    w.write(conns[k], t_ns, ts.serialize_cdr(msg, conns[k].msgtype))
                if cam:
                    msg = T["sensor_msgs/msg/Image"](header=Header(stamp=Time(sec=t_ns // 10**9, nanosec=t_ns % 10**9), frame_id=""),
                                                     height=84, width=84, encoding="rgb8", is_bigendian=0, step=252,
                                                     data=ep["rgb_corner"][i].reshape(-1))
                    w.write(conns["rgb_corner"], t_ns, ts.serialize_cdr(msg, conns["rgb_corner"].msgtype))
                t_ns += 100_000_000
            t_ns += 2_000_000_000  # a 2 s pause between episodes: split by gap
        del data


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def conversions(tmp: Path, steps: int, camera: bool) -> dict[str, float]:
    src = tmp / "src.zarr"
    out = {}
    for name, a, b in (("zarr->lerobot", src, tmp / "lr"), ("lerobot->zarr", tmp / "lr", tmp / "lr.zarr"),
                       ("zarr->robomimic", src, tmp / "rm.hdf5"), ("robomimic->zarr", tmp / "rm.hdf5", tmp / "rm.zarr")):
        out[name] = round(steps / timed(lambda a=a, b=b: convert(a, b)), 1)
    write_bag(tmp / "bag", src)
    sources = {"state": [{"array": {"topic": "/state", "size": 39}}], "action": [{"array": {"topic": "/action", "size": 4}}]}
    if camera:
        sources["rgb_corner"] = [{"image": {"topic": "/camera"}}]
    opts = {"sources": sources, "rate": 10, "max_age": 0.05, "split": "gap"}
    out["rosbag(mcap)->zarr"] = round(steps / timed(lambda: convert(tmp / "bag", tmp / "bag.zarr", read_options=opts)), 1)
    assert ReplayBuffer.open(tmp / "bag.zarr").n_steps == steps
    return out


def decode_strategies(tmp: Path, episodes: int, length: int, windows: int = 300) -> dict[str, float]:
    """Random To=2 windows: decoded lazily from the mp4 per window, or read from the zarr cache made once."""
    import pyarrow.parquet as pq

    lr = tmp / "lr"
    eps = pq.read_table(next((lr / "meta/episodes").rglob("*.parquet"))).to_pydict()
    video = next((lr / "videos").rglob("*.mp4"))
    rng = np.random.default_rng(1)
    picks = [(int(rng.integers(episodes)), int(rng.integers(length - 1))) for _ in range(windows)]

    decoded = [0]

    def lazy():
        for e, s in picks:
            cur = VideoCursor(video, 10.0, str(lr))
            cur.read(eps["videos/observation.images.corner/from_timestamp"][e] + s / 10, 2, "bench")
            decoded[0] += cur.decoded
            cur.close()

    lazy_s = timed(lazy)
    cache = tmp / "cache.zarr"
    once_s = timed(lambda: convert(lr, cache))
    arr = ReplayBuffer.open(cache)["rgb_corner"]

    def cached():
        for e, s in picks:
            arr[e * length + s: e * length + s + 2]

    cached_s = timed(cached)
    lazy_rate, cached_rate = windows / lazy_s, windows / cached_s
    n_windows = episodes * (length - 1)
    per_epoch_lazy, per_epoch_cached = n_windows / lazy_rate, n_windows / cached_rate
    return {"lazy_frames_decoded_per_window": round(decoded[0] / windows, 2),
            "once_frames_decoded_per_window_per_epoch": round(episodes * length / n_windows, 3),
            "lazy_windows_per_s": round(lazy_rate, 1), "cached_windows_per_s": round(cached_rate, 1),
            "decode_once_s": round(once_s, 2), "decode_once_frames_per_s": round(episodes * length / once_s, 1),
            "break_even_epochs": round(once_s / max(per_epoch_lazy - per_epoch_cached, 1e-9), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=40)
    ap.add_argument("--length", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "formats_throughput.json"))
    args = ap.parse_args()
    import av
    import pyarrow

    res = {"episodes": args.episodes, "length": args.length, "machine": platform.processor() or platform.machine(),
           "versions": {"av": av.__version__, "pyarrow": pyarrow.__version__}, "steps_per_s": {}}
    for camera in (False, True):
        tmp = Path(tempfile.mkdtemp(prefix="rtpolicy-formats-"))
        try:
            steps = make_store(tmp / "src.zarr", args.episodes, args.length, camera)
            res["steps_per_s"]["camera_84x84" if camera else "state_only"] = conversions(tmp, steps, camera)
            if camera:
                res["video_decoding"] = decode_strategies(tmp, args.episodes, args.length)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res, indent=2))
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
