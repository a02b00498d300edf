"""Bring your own data: zarr <-> LeRobot v3 <-> robomimic HDF5 round trips, rosbag2 (sqlite3 and MCAP)
alignment, training straight from each format, the convert CLI's refusals, and interop with the
``lerobot`` package itself (skipped unless its own venv is there)."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("av")
h5py = pytest.importorskip("h5py")
pytest.importorskip("rosbags")  # the four come together: pip install -e ".[formats]"

from rtpolicy.datasets.convert import main as convert_main
from rtpolicy.datasets.formats import FormatError, convert, detect_format, read_dataset
from rtpolicy.datasets.replay_buffer import ReplayBuffer

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "rtpolicy" / "conf")
LENGTHS = [17, 23, 12]


def _frames(L: int, e: int, h: int = 32, w: int = 48) -> np.ndarray:
    """Smooth moving gradients (what a camera sees; codec error is small on them): (L, h, w, 3) uint8."""
    yy, xx = np.mgrid[:h, :w]
    t = np.arange(L)[:, None, None]
    r = (xx * 4 + t * 3 + e * 20) % 256
    g = (r // 2 + yy * 2) % 256
    b = np.broadcast_to((yy * 6 + e * 9) % 256, r.shape)
    return np.stack([r, g, b], -1).astype(np.uint8)


def _store(path: Path, image: bool = True, robosuite: bool = False) -> ReplayBuffer:
    rng = np.random.default_rng(0)
    buf = ReplayBuffer.create(path)
    for e, L in enumerate(LENGTHS):
        if robosuite:
            ep = {"robot0_eef_pos": rng.normal(size=(L, 3)), "robot0_eef_quat": rng.normal(size=(L, 4)).astype(np.float32),
                  "robot0_gripper_qpos": rng.normal(size=(L, 2)), "object": rng.normal(size=(L, 10))}
        else:
            ep = {"state": rng.normal(size=(L, 5)).astype(np.float32), "task_id": np.full(L, e % 2, np.int64),
                  "reward": rng.random(L)}
        ep["action"] = rng.uniform(-1, 1, size=(L, 3)).astype(np.float32)
        if image:
            ep["rgb_agentview" if robosuite else "rgb_top"] = _frames(L, e)
        buf.add_episode(ep)
    buf.attrs.update({"task": "demo", "num_tasks": 2, "fps": 10})
    return buf


def _same(a: ReplayBuffer, b: ReplayBuffer, image_tol: float | None = None) -> None:
    assert np.array_equal(a.episode_ends, b.episode_ends)
    assert a.keys == b.keys
    for k in a.keys:
        x, y = a[k][: a.n_steps], b[k][: b.n_steps]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        if x.dtype == np.uint8 and x.ndim == 4 and image_tol is not None:
            err = np.abs(x.astype(np.int16) - y.astype(np.int16))
            assert err.mean() < image_tol and np.percentile(err, 99) <= 4 * image_tol, (k, err.mean(), err.max())
        else:
            assert np.array_equal(x, y), k


def test_round_trip_zarr_lerobot_robomimic_zarr(tmp_path):
    src = _store(tmp_path / "src.zarr")
    assert convert(tmp_path / "src.zarr", tmp_path / "lr") == ("zarr", "lerobot")
    assert detect_format(tmp_path / "lr") == "lerobot"
    info = json.loads((tmp_path / "lr/meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == 3 and info["total_frames"] == sum(LENGTHS)
    assert info["features"]["observation.images.top"]["dtype"] == "video"
    # many episodes per file: one data parquet, one mp4
    assert len(list((tmp_path / "lr/videos/observation.images.top").rglob("*.mp4"))) == 1
    assert convert(tmp_path / "lr", tmp_path / "rm.hdf5") == ("lerobot", "robomimic")
    assert convert(tmp_path / "rm.hdf5", tmp_path / "back.zarr") == ("robomimic", "zarr")
    back = ReplayBuffer.open(tmp_path / "back.zarr")
    _same(src, back, image_tol=4.0)
    assert back.attrs["tasks"] == ["task 0", "task 1"]


def test_lerobot_many_files_and_chunks(tmp_path):
    """Small file limits: episodes spread over several data/video files and chunk folders; each video file's
    timestamps restart at 0, and the reader follows meta/episodes to the right file and offset."""
    src = _store(tmp_path / "src.zarr")
    convert(tmp_path / "src.zarr", tmp_path / "lr", write_options={"data_file_mb": 0.001, "video_file_mb": 0.001, "chunks_size": 2})
    assert len(list((tmp_path / "lr/data").rglob("*.parquet"))) == 3
    videos = sorted((tmp_path / "lr/videos").rglob("*.mp4"))
    assert len(videos) == 3 and any("chunk-001" in str(v) for v in videos)
    convert(tmp_path / "lr", tmp_path / "back.zarr")
    _same(src, ReplayBuffer.open(tmp_path / "back.zarr"), image_tol=4.0)


def test_robomimic_layout_and_exact_round_trip(tmp_path):
    src = _store(tmp_path / "rs.zarr", robosuite=True)
    convert(tmp_path / "rs.zarr", tmp_path / "demo.hdf5")
    with h5py.File(tmp_path / "demo.hdf5", "r") as f:
        demo = f["data/demo_1"]
        assert sorted(demo["obs"]) == ["agentview_image", "object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]
        assert demo["actions"].shape == (23, 3) and demo.attrs["num_samples"] == 23
        assert demo["dones"][-1] == 1 and demo["rewards"].shape == (23,)  # synthesized: robomimic needs them
        assert f["data"].attrs["total"] == sum(LENGTHS)
        assert json.loads(f["data"].attrs["env_args"])["env_name"] == "demo"
        assert [m.decode() for m in f["mask/valid"][()]] == ["demo_2"]
    convert(tmp_path / "demo.hdf5", tmp_path / "back.zarr")
    _same(src, ReplayBuffer.open(tmp_path / "back.zarr"))  # bit-identical, frames included (no reward/done added)


def _h5py_file(path: Path, n_demos: int = 11, bad: tuple[int, str] | None = None) -> dict[int, int]:
    """A robomimic-layout file as robomimic's own tools write it (demo_<i> unordered on purpose)."""
    rng = np.random.default_rng(1)
    lengths = {}
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for i in reversed(range(n_demos)):
            L = 20 + i
            g = data.create_group(f"demo_{i}")
            g.create_dataset("obs/robot0_eef_pos", data=rng.normal(size=(L, 3)))
            g.create_dataset("obs/object", data=rng.normal(size=(L, 7)))
            g.create_dataset("actions", data=np.full((L, 4), i, np.float64))
            g.create_dataset("rewards", data=np.zeros(L))
            g.create_dataset("dones", data=np.zeros(L, np.int64))
            g.attrs["num_samples"] = L
            lengths[i] = L
        data.attrs["total"] = sum(lengths.values())
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1, "env_kwargs": {"control_freq": 20}})
        if bad:
            f[f"data/demo_{bad[0]}/{bad[1]}"][3] = np.nan
    return lengths


def test_robomimic_reads_in_demo_order_and_maps_keys(tmp_path):
    lengths = _h5py_file(tmp_path / "lift.hdf5")
    src = read_dataset(tmp_path / "lift.hdf5", keys={"state": ["obs/robot0_eef_pos", "obs/object"]})
    assert src.fps == 20.0 and list(src.lengths) == [lengths[i] for i in range(11)]
    assert src.keys["state"][0] == (10,) and "robot0_eef_pos" not in src.keys
    eps = list(src.episodes())
    assert [int(ep["action"][0, 0]) for ep in eps] == list(range(11))  # demo_10 after demo_9


def _train(tmp_path, overrides):
    from hydra import compose, initialize_config_dir

    from rtpolicy.config import register_configs
    from rtpolicy.training import train

    register_configs()
    tiny = ["denoiser.down_dims=[16,32]", "policy.cond_dim=16", "train.batch_size=8", "train.steps=2", "train.threads=1",
            "train.val_every=1000", "train.log_every=1", "train.ckpt_every=1000", "eval.episodes=0", f"run_dir={tmp_path}/run",
            f"task.dataset_cache={tmp_path}/cache"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, *tiny])
    return train(cfg)


def test_train_from_robomimic_hdf5(tmp_path):
    _h5py_file(tmp_path / "lift.hdf5", n_demos=3)
    res = _train(tmp_path, ["task=reach", "task.name=lift", f"task.dataset={tmp_path}/lift.hdf5",
                            "task.dataset_keys={state:[obs/robot0_eef_pos,obs/object]}"])
    assert res["step"] == 2 and Path(res["checkpoint"]).exists()
    assert len(list((tmp_path / "cache").glob("lift.hdf5-robomimic-*.zarr"))) == 1


def test_train_from_lerobot_folder(tmp_path):
    _store(tmp_path / "src.zarr", image=False)
    convert(tmp_path / "src.zarr", tmp_path / "lr")
    # two tasks: task_index comes back as task_id, which a single-task policy ignores
    res = _train(tmp_path, ["task=reach", "task.name=lr-demo", f"task.dataset={tmp_path}/lr", "task.dataset_format=lerobot",
                            "task.condition_on_task_id=false"])
    assert res["step"] == 2


# ---------------------------------------------------------------------------------------------------- rosbag2
def _write_bag(path: Path, storage: str, gap: tuple[float, float] | None = None, markers: tuple = (),
               stamp_back_at: float | None = None) -> dict[str, list]:
    """Joint states at ~50 Hz (jittered), an object array at 20 Hz, a camera at 10 Hz and TwistStamped teleop commands
    at ~15 Hz for 3 s, plus std_msgs/Bool episode markers (t, start?) on /episode; returns {topic: [(t, values)]} as
    written. ``stamp_back_at``: the /cmd header stamp after that time jumps 0.5 s back."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_JAZZY)
    T = ts.types
    Header, Time = T["std_msgs/msg/Header"], T["builtin_interfaces/msg/Time"]
    rng = np.random.default_rng(2)
    plugin = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}[storage]
    sent: dict[str, list] = {"/joint_states": [], "/object": [], "/cmd": [], "/camera": []}
    events = []
    for t in np.arange(0.0, 3.0, 0.02) + rng.uniform(0, 0.004, 150):
        events.append((t, "/joint_states"))
    events += [(t, "/object") for t in np.arange(0.013, 3.0, 0.05)]
    events += [(t, "/camera") for t in np.arange(0.031, 3.0, 0.1)]
    events += [(t, "/cmd") for t in np.arange(0.007, 3.0, 1 / 15)]
    events += [(t, "/episode") for t, _ in markers]
    events = [(t, tp) for t, tp in sorted(events) if not (gap and gap[0] <= t < gap[1] and tp == "/joint_states")]
    base = 1_700_000_000.0
    with Writer(path, version=9, storage_plugin=plugin) as w:
        conns = {"/joint_states": w.add_connection("/joint_states", "sensor_msgs/msg/JointState", typestore=ts),
                 "/object": w.add_connection("/object", "std_msgs/msg/Float64MultiArray", typestore=ts),
                 "/camera": w.add_connection("/camera", "sensor_msgs/msg/Image", typestore=ts),
                 "/cmd": w.add_connection("/cmd", "geometry_msgs/msg/TwistStamped", typestore=ts),
                 "/episode": w.add_connection("/episode", "std_msgs/msg/Bool", typestore=ts)}
        for i, (t, topic) in enumerate(events):
            stamp = base + t
            hs = stamp - 0.5 if stamp_back_at is not None and t > stamp_back_at and topic == "/cmd" else stamp
            header = Header(stamp=Time(sec=int(hs), nanosec=int((hs % 1) * 1e9)), frame_id="")
            if topic == "/joint_states":
                v = np.array([i, -i, 0.5 * i], dtype=np.float64)
                msg = T["sensor_msgs/msg/JointState"](header=header, name=["b", "a", "c"], position=v,
                                                      velocity=np.zeros(3), effort=np.zeros(0))
                sent[topic].append((t, np.array([v[1], v[0]])))  # sources read joints a, b by name
            elif topic == "/object":
                v = np.array([t, 2 * t])
                layout = T["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0)
                msg = T["std_msgs/msg/Float64MultiArray"](layout=layout, data=v)
                sent[topic].append((t, v))
            elif topic == "/camera":
                img = np.full((6, 8, 3), i % 256, np.uint8)
                msg = T["sensor_msgs/msg/Image"](header=header, height=6, width=8, encoding="rgb8", is_bigendian=0, step=24,
                                                 data=img.reshape(-1))
                sent[topic].append((t, img))
            elif topic == "/episode":
                msg = T["std_msgs/msg/Bool"](data=dict(markers)[t])
            else:
                V3 = T["geometry_msgs/msg/Vector3"]
                twist = T["geometry_msgs/msg/Twist"](linear=V3(x=t, y=1.0, z=2.0), angular=V3(x=0.0, y=0.0, z=-t))
                msg = T["geometry_msgs/msg/TwistStamped"](header=header, twist=twist)
                sent[topic].append((t, np.array([t, 1.0, 2.0, 0.0, 0.0, -t])))
            w.write(conns[topic], round(stamp * 1e9), ts.serialize_cdr(msg, conns[topic].msgtype))
    return sent


SOURCES = {"state": [{"joint_state": {"topic": "/joint_states", "names": ["a", "b"]}}, {"array": {"topic": "/object", "size": 2}}],
           "rgb_cam": [{"image": {"topic": "/camera"}}],
           "action": [{"array": {"topic": "/cmd", "size": 6}}]}


def _latest(sent, t):
    i = max(j for j, (ts, _) in enumerate(sent) if ts <= t + 1e-9)
    return sent[i]


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_rosbag_aligns_to_the_control_rate(tmp_path, storage):
    sent = _write_bag(tmp_path / "bag", storage, gap=(1.5, 1.9))
    assert detect_format(tmp_path / "bag") == "rosbag"
    opts = {"sources": SOURCES, "rate": 10, "max_age": 0.25}
    src = read_dataset(tmp_path / "bag", **opts)
    eps = list(src.episodes())
    assert len(eps) == 2  # the joint states stop for 0.4 s > max_age: a gap splits the recording
    t0 = min(t for v in sent.values() for t, _ in v)
    t_end = max(t for v in sent.values() for t, _ in v)
    ticks = [t for t in t0 + np.arange(0, 40) / 10 if t <= t_end]  # the recording ends with its last message
    valid = [t for t in ticks if all(any(ts <= t + 1e-9 for ts, _ in sent[tp]) for tp in sent)
             and all(t - _latest(sent[tp], t)[0] <= 0.25 for tp in sent)]
    assert sum(len(ep["action"]) for ep in eps) == len(valid)
    rows = [{k: ep[k][i] for k in ep} for ep in eps for i in range(len(ep["action"]))]
    for t, row in zip(valid, rows):
        state = np.concatenate([_latest(sent["/joint_states"], t)[1], _latest(sent["/object"], t)[1]])
        np.testing.assert_allclose(row["state"], state.astype(np.float32))
        np.testing.assert_allclose(row["action"], _latest(sent["/cmd"], t)[1].astype(np.float32))
        assert np.array_equal(row["rgb_cam"], _latest(sent["/camera"], t)[1])
    convert(tmp_path / "bag", tmp_path / "bag.zarr", read_options=opts)
    buf = ReplayBuffer.open(tmp_path / "bag.zarr")
    assert list(buf.episode_lengths) == [len(ep["action"]) for ep in eps] and buf.shape("rgb_cam") == (6, 8, 3)
    assert buf.attrs["fps"] == 10


def test_rosbag_strict_split_reports_the_gap(tmp_path):
    _write_bag(tmp_path / "bag.mcap.d", "mcap", gap=(1.5, 1.9))
    bag = next((tmp_path / "bag.mcap.d").glob("*.mcap"))
    with pytest.raises(FormatError, match=r"gap inside episode 0 at .*joint|gap inside episode 0 at .*old"):
        list(read_dataset(bag, sources=SOURCES, rate=10, max_age=0.25, split="bag").episodes())
    with pytest.raises(FormatError, match="/missing"):
        list(read_dataset(bag, sources={"state": [{"array": {"topic": "/missing", "size": 2}}]}).episodes())


def test_rosbag_episodes_from_a_topic_and_header_stamps_that_go_back(tmp_path):
    sent = _write_bag(tmp_path / "bag", "mcap", markers=((0.45, True), (1.25, False), (1.65, True), (2.55, False)))
    src = read_dataset(tmp_path / "bag", sources=SOURCES, rate=10, split="topic", episode_topic="/episode")
    eps = list(src.episodes())
    t0 = min(t for v in sent.values() for t, _ in v)
    # ticks strictly inside [start, end) of each marked span
    expect = [sum(1 for k in range(40) if a < t0 + k / 10 < b) for a, b in ((0.45, 1.25), (1.65, 2.55))]
    assert [len(ep["action"]) for ep in eps] == expect
    np.testing.assert_allclose(eps[1]["action"][0], _latest(sent["/cmd"], t0 + 1.7)[1].astype(np.float32))
    # a span opened by true and never closed (the recorder discarded it, or stopped) is dropped, not cut at the next true
    _write_bag(tmp_path / "open", "mcap", markers=((0.45, True), (1.25, True), (2.55, False)))
    src = read_dataset(tmp_path / "open", sources=SOURCES, rate=10, split="topic", episode_topic="/episode")
    assert [len(ep["action"]) for ep in src.episodes()] == [sum(1 for k in range(40) if 1.25 < k / 10 < 2.55)]

    _write_bag(tmp_path / "back", "sqlite3", stamp_back_at=1.0)
    assert len(list(read_dataset(tmp_path / "back", sources=SOURCES, rate=10).episodes())) == 1  # receive time: fine
    with pytest.raises(FormatError, match=r"back.*topic /cmd: timestamps go back in time"):
        list(read_dataset(tmp_path / "back", sources=SOURCES, rate=10, stamp="header").episodes())


def test_train_from_rosbag_folder(tmp_path):
    """One bag per episode (a folder of bags: split by bag), topics mapped on the command line."""
    for i, storage in enumerate(["mcap", "sqlite3"]):
        _write_bag(tmp_path / "rec" / f"ep{i}", storage)
    opts = ("task.dataset_options={rate:10,max_age:0.25,sources:{state:[{joint_state:{topic:/joint_states,names:[a,b]}},"
            "{array:{topic:/object,size:2}}],action:[{array:{topic:/cmd,size:6}}]}}")
    res = _train(tmp_path, ["task=reach", "task.name=rec", f"task.dataset={tmp_path}/rec", opts])
    assert res["step"] == 2
    cache = ReplayBuffer.open(next((tmp_path / "cache").glob("rec-rosbag-*.zarr")))
    assert cache.n_episodes == 2 and cache.shape("state") == (4,) and cache.shape("action") == (6,)


# ---------------------------------------------------------------------------------------------------- CLI refusals
def _cli(*args) -> int:
    with pytest.raises(SystemExit) as e:
        convert_main([str(a) for a in args])
    return e.value.code


def test_cli_refuses_to_clobber_and_names_bad_input(tmp_path, capsys):
    _store(tmp_path / "src.zarr", image=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert _cli(tmp_path / "src.zarr", tmp_path / "taken") == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    assert convert_main([str(tmp_path / "src.zarr"), str(tmp_path / "taken"), "--overwrite"]) == 0
    assert detect_format(tmp_path / "taken") == "lerobot"

    _h5py_file(tmp_path / "bad.hdf5", n_demos=3, bad=(1, "obs/object"))
    before = (tmp_path / "bad.hdf5").read_bytes()
    assert _cli(tmp_path / "bad.hdf5", tmp_path / "out.zarr") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "bad.hdf5" in err and "'object'" in err
    assert "demo_1" in err and "NaN" in err
    assert not (tmp_path / "out.zarr").exists() and not list(tmp_path.glob(".out.zarr.tmp-*"))  # nothing left behind
    assert (tmp_path / "bad.hdf5").read_bytes() == before  # the source is only read

    (tmp_path / "junk").mkdir()
    assert _cli(tmp_path / "junk", tmp_path / "o.zarr") == 2
    assert "cannot tell its format" in capsys.readouterr().err
    assert _cli(tmp_path / "src.zarr", tmp_path / "o.zarr", "--keys", "[1]") == 2
    assert "--keys must be a mapping" in capsys.readouterr().err


def test_demos_that_disagree_are_named(tmp_path):
    _h5py_file(tmp_path / "a.hdf5", n_demos=3)
    with h5py.File(tmp_path / "a.hdf5", "a") as f:
        pos = f["data/demo_1/obs/robot0_eef_pos"][()]
        del f["data/demo_1/obs/robot0_eef_pos"], f["data/demo_2/obs/object"]
        f["data/demo_1/obs/robot0_eef_pos"] = pos.astype(np.float32)  # same kind, other dtype: cast, not refused
        f["data/demo_2/obs/object"] = np.zeros((22, 8))
    with pytest.raises(FormatError, match=r"a.hdf5: episode 2: key 'object' has feature shape \(8,\), episode 0 has \(7,\)"):
        convert(tmp_path / "a.hdf5", tmp_path / "a.zarr")
    assert not (tmp_path / "a.zarr").exists()
    with h5py.File(tmp_path / "a.hdf5", "a") as f:
        f["data/demo_1/obs/extra"] = np.zeros((21, 2))
    with pytest.raises(FormatError, match=r"data/demo_1 holds keys .*'obs/extra'"):
        read_dataset(tmp_path / "a.hdf5")


def test_lerobot_lengths_that_disagree_are_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _store(tmp_path / "src.zarr", image=False)
    convert(tmp_path / "src.zarr", tmp_path / "lr")
    p = tmp_path / "lr/meta/episodes/chunk-000/file-000.parquet"
    t = pq.read_table(p)
    pq.write_table(t.set_column(t.column_names.index("length"), "length", pa.array([17, 22, 12])), p)
    with pytest.raises(FormatError, match=r"episode 1: data/chunk-000/file-000.parquet holds 23 rows, meta/episodes says length 22"):
        list(read_dataset(tmp_path / "lr").episodes())


# ---------------------------------------------------------------------------------------------------- the peer itself
LEROBOT_PYTHON = Path(os.environ.get("RTPOLICY_LEROBOT_PYTHON", ROOT.parent / "lerobot-venv" / "bin" / "python"))
PEER = ROOT / "benchmarks" / "lerobot_interop.py"


@pytest.mark.slow
@pytest.mark.skipif(not LEROBOT_PYTHON.exists(), reason=f"no lerobot 0.4.4 venv at {LEROBOT_PYTHON} (set RTPOLICY_LEROBOT_PYTHON; "
                    "see benchmarks/lerobot_interop.py for how to build it)")
def test_lerobot_package_reads_ours_and_we_read_and_train_on_its(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_LEROBOT_HOME=str(tmp_path / "hf"))

    def peer(*args):
        proc = subprocess.run([str(LEROBOT_PYTHON), str(PEER), *args], env=env, capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    # lerobot writes (LeRobotDataset.create / add_frame / save_episode, one camera as video) -> we read and train
    out = peer("write", str(tmp_path / "theirs"))
    expected = np.load(tmp_path / "theirs.expected.npz", allow_pickle=False)
    src = read_dataset(tmp_path / "theirs")
    eps = list(src.episodes())
    assert [len(ep["action"]) for ep in eps] == out["lengths"]
    for k, ours in (("state", "state"), ("action", "action"), ("image", "rgb_front")):
        got = np.concatenate([ep[ours] for ep in eps])
        if k == "image":
            assert np.abs(got.astype(np.int16) - expected[k]).mean() < 4.0
        else:
            assert np.array_equal(got, expected[k])
    res = _train(tmp_path, ["task=reach", "task.name=theirs", f"task.dataset={tmp_path}/theirs", "task.condition_on_task_id=false"])
    assert res["step"] == 2

    # we write -> LeRobotDataset opens it, iterates every frame and gets the same values
    _store(tmp_path / "ours.zarr")  # spread over several files and chunk folders
    convert(tmp_path / "ours.zarr", tmp_path / "ours", write_options={"data_file_mb": 0.001, "video_file_mb": 0.001, "chunks_size": 2})
    buf = ReplayBuffer.open(tmp_path / "ours.zarr")
    np.savez(tmp_path / "ours.expected.npz", state=buf["state"][:], action=buf["action"][:], image=buf["rgb_top"][:],
             episode_ends=buf.episode_ends)
    res = peer("read", str(tmp_path / "ours"), "observation.images.top")
    assert res["ok"] and "pyav" in res["backends"]
    for r in res["backends"].values():
        assert r["frames"] == sum(LENGTHS) and r["episodes"] == 3 and r["image_mean_abs_err"] < 4.0


def _peer_has(module: str) -> bool:
    if not LEROBOT_PYTHON.exists():
        return False
    return subprocess.run([str(LEROBOT_PYTHON), "-c", f"import {module}"], capture_output=True, check=False, timeout=120).returncode == 0


@pytest.mark.slow
def test_robomimic_package_reads_ours(tmp_path):
    if not _peer_has("robomimic"):
        pytest.skip(f"no robomimic under {LEROBOT_PYTHON} (pip install --no-deps robomimic h5py there; "
                    "see benchmarks/robomimic_interop.py)")
    _store(tmp_path / "rs.zarr", robosuite=True)
    convert(tmp_path / "rs.zarr", tmp_path / "rs.hdf5")
    buf = ReplayBuffer.open(tmp_path / "rs.zarr")
    low_dim = ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object"]
    np.savez(tmp_path / "exp.npz", **{k: buf[k][:] for k in low_dim}, agentview_image=buf["rgb_agentview"][:],
             actions=buf["action"][:], episode_ends=buf.episode_ends)
    proc = subprocess.run([str(LEROBOT_PYTHON), str(ROOT / "benchmarks" / "robomimic_interop.py"), str(tmp_path / "rs.hdf5"),
                           str(tmp_path / "exp.npz"), ",".join(low_dim), "agentview_image"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["ok"] and res["items"] == sum(LENGTHS) and res["train_demos"] == 2


def _bag_with(path: Path, fault: str) -> None:
    """3 s of /joint_states (joints a, b) and /cmd (2 values) at 10 Hz; at message 20 ``fault`` ("nan": NaN in
    /cmd, "joint": joint b missing)."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_JAZZY)
    T = ts.types
    header = T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=1, nanosec=0), frame_id="")
    layout = T["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0)
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        cj = w.add_connection("/joint_states", "sensor_msgs/msg/JointState", typestore=ts)
        ca = w.add_connection("/cmd", "std_msgs/msg/Float64MultiArray", typestore=ts)
        for i in range(30):
            names = ["a"] if fault == "joint" and i == 20 else ["a", "b"]
            js = T["sensor_msgs/msg/JointState"](header=header, name=names, position=np.array([i, -i], float)[: len(names)],
                                                 velocity=np.zeros(0), effort=np.zeros(0))
            w.write(cj, int((1.0 + i * 0.1) * 1e9), ts.serialize_cdr(js, cj.msgtype))
            cmd = T["std_msgs/msg/Float64MultiArray"](layout=layout, data=np.array([i, np.nan if fault == "nan" and i == 20 else 0.0]))
            w.write(ca, int((1.01 + i * 0.1) * 1e9), ts.serialize_cdr(cmd, ca.msgtype))


def test_bad_values_are_named_in_every_format(tmp_path):
    """NaN, timestamps that go back, a missing column and a missing joint: each error names the file, the episode and the key (robomimic's
    NaN and disagreeing demos are in the tests above)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zarr

    _store(tmp_path / "a.zarr", image=False)
    g = zarr.open_group(tmp_path / "a.zarr", mode="r+")
    state = g["data/state"][:]
    state[int(g["meta/episode_ends"][0]) + 2, 1] = np.nan
    g["data/state"][:] = state
    with pytest.raises(FormatError, match=r"a.zarr: episode 1: key 'state' has a non-finite value \(NaN or inf\) at step 2"):
        convert(tmp_path / "a.zarr", tmp_path / "a.hdf5")

    _store(tmp_path / "b.zarr", image=False)
    convert(tmp_path / "b.zarr", tmp_path / "lr")
    p = tmp_path / "lr/data/chunk-000/file-000.parquet"
    t = pq.read_table(p)
    action = t.column("action").to_pylist()
    action[30][0] = float("nan")
    pq.write_table(t.set_column(t.column_names.index("action"), "action", pa.array(action, type=t.schema.field("action").type)), p)
    with pytest.raises(FormatError, match=r"lr: episode 1: key 'action' has a non-finite value \(NaN or inf\) at step 13"):
        convert(tmp_path / "lr", tmp_path / "lr.zarr")
    t = pq.read_table(p)
    stamps = t.column("timestamp").to_pylist()
    stamps[25], stamps[26], action[30][0] = stamps[26], stamps[25], 0.0
    pq.write_table(t.set_column(t.column_names.index("timestamp"), "timestamp", pa.array(stamps, type=t.schema.field("timestamp").type))
                   .set_column(t.column_names.index("action"), "action", pa.array(action, type=t.schema.field("action").type)), p)
    with pytest.raises(FormatError, match=r"lr: episode 1: data/chunk-000/file-000.parquet timestamps are not increasing at frame 9"):
        convert(tmp_path / "lr", tmp_path / "lr.zarr")
    pq.write_table(pq.read_table(p).drop(["observation.state"]), p)
    with pytest.raises(FormatError, match=r"lr: data/chunk-000/file-000.parquet has no column\(s\) \['observation.state'\]"):
        convert(tmp_path / "lr", tmp_path / "lr.zarr")
    assert not (tmp_path / "lr.zarr").exists()

    sources = {"state": [{"joint_state": {"topic": "/joint_states", "names": ["a", "b"]}}], "action": [{"array": {"topic": "/cmd", "size": 2}}]}
    for fault, msg in (("nan", r"episode 0, tick at 3.100 s: observation 'action': non-finite values at indices \[1\] \(/cmd: \[1\]\)"),
                       ("joint", r"episode 0, tick at 3.000 s: observation 'state': joints \['b'\] missing from /joint_states")):
        _bag_with(tmp_path / f"bag_{fault}", fault)
        with pytest.raises(FormatError, match=rf"bag_{fault}: {msg}"):
            list(read_dataset(tmp_path / f"bag_{fault}", sources=sources, rate=10).episodes())
