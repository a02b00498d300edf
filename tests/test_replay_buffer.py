"""ReplayBuffer on real zarr stores: round trips, zarr v2 stores from other tools, crashes and damaged stores."""

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

from rtpolicy.datasets.replay_buffer import ReplayBuffer, ReplayBufferError


def episode(length: int, value: float = 0.0, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "state": (rng.normal(size=(length, 4)) + value).astype(np.float32),
        "action": np.full((length, 2), value, np.float32),
        "img": rng.integers(0, 255, size=(length, 3, 4, 4), dtype=np.uint8),
    }


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def store(tmp_path):
    """A store with episodes of lengths 5, 7, 3 (state + value, action == value 1, 2, 3)."""
    path = tmp_path / "demo.zarr"
    buf = ReplayBuffer.create(path)
    for i, n in enumerate([5, 7, 3]):
        buf.add_episode(episode(n, value=i + 1, seed=i), chunk_steps=4)
    return path


def test_round_trip(store):
    buf = ReplayBuffer.open(store)
    assert buf.keys == ["action", "img", "state"]
    assert buf.n_episodes == 3 and buf.n_steps == 15
    assert buf.episode_ends.tolist() == [5, 12, 15] and buf.episode_ends.dtype == np.int64
    assert buf.episode_lengths.tolist() == [5, 7, 3]
    assert buf.shape("img") == (3, 4, 4) and buf["img"].dtype == np.uint8
    data = buf.load()
    for i, n in enumerate([5, 7, 3]):
        ep, want = buf.get_episode(i), episode(n, value=i + 1, seed=i)
        for k in want:
            np.testing.assert_array_equal(ep[k], want[k])
            np.testing.assert_array_equal(data[k][buf.episode_ends[i] - n : buf.episode_ends[i]], want[k])
    assert buf.get_episode(-1, keys=["action"])["action"].tolist() == [[3, 3]] * 3
    with pytest.raises(IndexError, match="episode 3 out of range for a buffer with 3 episodes"):
        buf.get_episode(3)
    with pytest.raises(KeyError, match="no key 'actions'.*available keys"):
        buf.load(["actions"])
    with pytest.raises(ValueError, match="read-only"):
        buf.episode_ends[0] = 1  # a view the caller cannot corrupt


def test_append_mode_and_attrs(store):
    buf = ReplayBuffer.open(store, mode="a")
    buf.attrs["env"] = "push-v3"
    buf.attrs["obs_spec"] = {"state": [4]}
    buf.add_episode(episode(6, value=9, seed=9))
    again = ReplayBuffer.open(store)
    assert again.n_episodes == 4 and again.episode_ends.tolist() == [5, 12, 15, 21]
    np.testing.assert_array_equal(again.get_episode(3)["state"], episode(6, value=9, seed=9)["state"])
    assert dict(again.attrs) == {"env": "push-v3", "obs_spec": {"state": [4]}}
    with pytest.raises(ReplayBufferError, match="read-only"):
        again.add_episode(episode(2))
    assert ReplayBuffer.open_or_create(store).n_episodes == 4
    fresh = ReplayBuffer.open_or_create(store.parent / "new.zarr")
    assert fresh.n_episodes == 0 and fresh.n_steps == 0 and fresh.keys == [] and fresh.load() == {}


def test_create_refuses_existing_store(store):
    before = snapshot(store)
    with pytest.raises(FileExistsError, match="already exists"):
        ReplayBuffer.create(store)
    assert snapshot(store) == before


def test_all_zero_chunks_are_stored(tmp_path):
    # zarr 3 skips chunks equal to the fill value by default; the buffer must store them anyway
    buf = ReplayBuffer.create(tmp_path / "z.zarr")
    buf.add_episode({"action": np.zeros((8, 2), np.float32)}, chunk_steps=4)
    assert buf["action"].nchunks_initialized == 2
    np.testing.assert_array_equal(ReplayBuffer.open(tmp_path / "z.zarr").load()["action"], np.zeros((8, 2)))


def test_opens_zarr_v2_store_with_blosc(tmp_path):
    numcodecs = pytest.importorskip("numcodecs")
    path = tmp_path / "dp.zarr"
    root = zarr.open_group(path, mode="w", zarr_format=2)
    state = np.arange(1, 31, dtype=np.float64).reshape(10, 3)
    blosc = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)
    root.require_group("data").create_array("state", shape=(10, 3), chunks=(3, 2), dtype="f8", compressors=blosc)[:] = state
    root["data"].create_array("action", shape=(10,), chunks=(7,), dtype="f4")[:] = np.arange(1, 11)
    root.require_group("meta").create_array("episode_ends", shape=(2,), chunks=(1,), dtype="i8")[:] = [4, 10]
    assert (path / "data" / "state" / ".zarray").exists() and (path / "data" / "state" / "3.1").exists()

    buf = ReplayBuffer.open(path, mode="a")
    assert buf.keys == ["action", "state"] and buf.episode_lengths.tolist() == [4, 6] and buf.shape("action") == ()
    np.testing.assert_array_equal(buf.load()["state"], state)
    buf.add_episode({"state": np.full((3, 3), 7.0), "action": np.ones(3, np.float32)})
    again = ReplayBuffer.open(path)
    assert again.episode_ends.tolist() == [4, 10, 13]
    np.testing.assert_array_equal(again.load()["state"][:10], state)
    np.testing.assert_array_equal(again.get_episode(2)["state"], np.full((3, 3), 7.0))
    os.remove(path / "data" / "state" / "1.1")  # v2 chunk keys are found too
    with pytest.raises(ReplayBufferError, match=r"data/state is missing chunk '1\.1' \(from row 3\)"):
        ReplayBuffer.open(path)


def test_crash_mid_append_leaves_last_complete_episode(store):
    # a writer killed after resizing and writing part of an episode, before episode_ends was updated
    root = zarr.open_group(store, mode="r+")
    for key in ["action", "state"]:
        root["data"][key].resize((19, *root["data"][key].shape[1:]))
        root["data"][key][15:19] = 99
    with pytest.warns(UserWarning, match=r"ignoring rows past meta/episode_ends\[-1\]=15.*data/action \(4 rows\)"):
        buf = ReplayBuffer.open(store, mode="a")
    assert buf.n_episodes == 3 and buf.n_steps == 15 and buf.load()["action"].shape == (15, 2)
    buf.add_episode(episode(2, value=5, seed=5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tail was overwritten and trimmed: no warning
        again = ReplayBuffer.open(store)
    assert again["action"].shape == (17, 2) and again.episode_ends.tolist() == [5, 12, 15, 17]
    np.testing.assert_array_equal(again.get_episode(3)["action"], np.full((2, 2), 5))
    np.testing.assert_array_equal(again.get_episode(2)["state"], episode(3, value=3, seed=2)["state"])


def test_crash_between_episode_ends_resize_and_write(store):
    zarr.open_group(store, mode="r+")["meta/episode_ends"].resize((4,))  # killed before the end was written
    with pytest.warns(UserWarning, match="unwritten trailing meta/episode_ends entry"):
        buf = ReplayBuffer.open(store, mode="a")
    assert buf.episode_ends.tolist() == [5, 12, 15]
    buf.add_episode(episode(4, value=6))
    assert ReplayBuffer.open(store).episode_ends.tolist() == [5, 12, 15, 19]


def test_truncated_store(store):
    zarr.open_group(store, mode="r+")["data/action"].resize((8, 2))
    with pytest.raises(ReplayBufferError, match="truncated: data/action has 8 rows but meta/episode_ends ends at 15"):
        ReplayBuffer.open(store)


def test_deleted_chunk_file(store):
    os.remove(store / "data" / "action" / "c" / "1" / "0")
    with pytest.raises(ReplayBufferError, match=r"data/action is missing chunk 'c/1/0' \(from row 4\)"):
        ReplayBuffer.open(store)
    assert ReplayBuffer.open(store, check_chunks=False).n_episodes == 3  # explicit opt-out


def test_corrupted_chunk_is_reported_on_load(store):
    chunk = store / "data" / "state" / "c" / "2" / "0"
    chunk.write_bytes(b"\x00garbage" + chunk.read_bytes()[8:])
    buf = ReplayBuffer.open(store)
    with pytest.raises(ReplayBufferError, match=r"data/state: the chunk holding rows \[8, 12\) failed to decode"):
        buf.load()
    with pytest.raises(ReplayBufferError, match=r"data/state: the chunk holding rows \[8, 12\)"):
        buf.get_episode(1)
    assert buf.get_episode(0)["state"].shape == (5, 4)  # other chunks still read


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda e: e.update(action=e["action"][:-1]), r"same length >= 1; got lengths \{'state': 5, 'action': 4, 'img': 5\}"),
        (lambda e: e["state"].__setitem__((3, 1), np.nan), r"episode\['state'\] has a non-finite value \(NaN or inf\) at row 3"),
        (lambda e: e["action"].__setitem__((0, 0), np.inf), r"episode\['action'\] has a non-finite value .* at row 0"),
        (lambda e: e.update(state=np.zeros((5, 5), np.float32)), r"episode\['state'\] has feature shape \(5,\), expected \(4,\)"),
        (lambda e: e.update(state=e["state"].astype(np.float64)), r"episode\['state'\] has dtype float64, expected float32"),
        (lambda e: e.update(extra=np.zeros(5)), r"missing \[\], unexpected \['extra'\]"),
        (lambda e: e.pop("img"), r"missing \['img'\], unexpected \[\]"),
        (lambda e: e.update(img=np.array(["a"] * 5)), r"episode\['img'\] has non-numeric dtype <U1"),
        (lambda e: e.update(action=np.float32(1)), r"episode\['action'\] is a scalar"),
        (lambda e: e.clear(), "non-empty dict"),
        (lambda e: [e.update({k: v[:0]}) for k, v in list(e.items())], r"same length >= 1"),
    ],
    ids=["lengths", "nan", "inf", "shape", "dtype", "extra_key", "missing_key", "strings", "scalar", "empty", "zero_steps"],
)
def test_bad_episode_is_rejected_and_store_unchanged(store, change, match):
    before = snapshot(store)
    buf = ReplayBuffer.open(store, mode="a")
    ep = episode(5, value=4)
    change(ep)
    with pytest.raises(ReplayBufferError, match=match):
        buf.add_episode(ep)
    assert snapshot(store) == before
    assert buf.n_episodes == 3
    buf.add_episode(episode(5, value=4))  # the buffer is still usable
    assert ReplayBuffer.open(store).n_steps == 20


def _set_ends(values):
    def damage(root):
        del root["meta/episode_ends"]
        root["meta"].create_array("episode_ends", data=np.asarray(values))

    return damage


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda r: r.__delitem__("data"), "missing group 'data'"),
        (lambda r: r.__delitem__("meta"), "missing array 'meta/episode_ends'"),
        (_set_ends([5, 5, 15]), "strictly increasing, but entry 1 is 5 after 5"),
        (_set_ends([-1, 12, 15]), r"episode_ends\[0\] must be positive, got -1"),
        (_set_ends([5.0, 12.0, 15.0]), r"1-D integer array, got shape \(3,\) dtype float64"),
        (_set_ends([[5, 12, 15]]), r"1-D integer array, got shape \(1, 3\)"),
    ],
    ids=["no_data", "no_meta", "not_increasing", "negative", "float_ends", "2d_ends"],
)
def test_invalid_store_layout(store, damage, match):
    damage(zarr.open_group(store, mode="r+"))
    with pytest.raises(ReplayBufferError, match=match):
        ReplayBuffer.open(store)


def test_not_a_store(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("hello")
    with pytest.raises(ReplayBufferError, match="is not a zarr group"):
        ReplayBuffer.open(tmp_path / "folder")
    (tmp_path / "file.zarr").write_text("hello")
    with pytest.raises(ReplayBufferError, match="is not a zarr group"):
        ReplayBuffer.open(tmp_path / "file.zarr")
    zarr.create_array(tmp_path / "array.zarr", shape=(3,), dtype="i4")
    with pytest.raises(ReplayBufferError, match="is not a zarr group"):
        ReplayBuffer.open(tmp_path / "array.zarr")
    with pytest.raises(FileNotFoundError, match="no replay buffer at"):
        ReplayBuffer.open(tmp_path / "missing.zarr")
    with pytest.raises(ValueError, match="mode must be 'r' or 'a'"):
        ReplayBuffer.open(tmp_path / "folder", mode="w")


def test_corrupted_episode_ends(store):
    chunk = store / "meta" / "episode_ends" / "c" / "0"
    chunk.write_bytes(b"\x00garbage")
    with pytest.raises(ReplayBufferError, match="meta/episode_ends failed to decode"):
        ReplayBuffer.open(store)


def test_stale_consolidated_metadata_is_ignored(tmp_path):
    path = tmp_path / "c.zarr"
    buf = ReplayBuffer.create(path, zarr_format=2)
    buf.add_episode({"action": np.ones((4, 2), np.float32)})
    zarr.consolidate_metadata(str(path))  # snapshot of the metadata at 1 episode
    ReplayBuffer.open(path, mode="a").add_episode({"action": np.full((3, 2), 2, np.float32)})
    assert (path / ".zmetadata").exists()
    again = ReplayBuffer.open(path)
    assert again.episode_ends.tolist() == [4, 7] and again.load()["action"][4:].tolist() == [[2, 2]] * 3
