"""Normalizer: exact ranges, constant dims, stats in the state_dict (and a safetensors checkpoint), clear errors."""

import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rtpolicy.datasets.normalizer import Normalizer

SHAPES = {"state": [3], "action": [2], "image": [2, 2, 2]}


def sample_data(seed=0):
    rng = np.random.default_rng(seed)
    state = rng.normal(loc=[100.0, -3.0, 0.0], scale=[0.5, 2.0, 1.0], size=(200, 3))
    state[:, 2] = 5.0  # constant dim
    return {
        "state": state,
        "action": torch.as_tensor(rng.uniform(-4, 7, size=(10, 20, 2)), dtype=torch.float32),  # (B, T, Da)
        "image": rng.integers(0, 256, size=(50, 2, 2, 2), dtype=np.uint8),
    }


@pytest.mark.parametrize("mode", ["minmax", "meanstd", "identity"])
def test_round_trip(mode):
    data = sample_data()
    norm = Normalizer(SHAPES, mode=mode).fit(data)
    for key, value in data.items():
        x = torch.as_tensor(value).double()
        y = norm.normalize(key, x)
        assert y.dtype == torch.float64 and y.shape == x.shape
        torch.testing.assert_close(norm.unnormalize(key, y), x, rtol=1e-5, atol=1e-4)
    image = norm.normalize("image", torch.as_tensor(data["image"]))  # integer input -> float32
    assert image.dtype == torch.float32


def test_minmax_maps_fit_data_to_exactly_minus_one_one():
    data = sample_data()
    norm = Normalizer(SHAPES).fit(data)
    y = norm.normalize("action", data["action"]).reshape(-1, 2)
    torch.testing.assert_close(y.amin(0), torch.tensor([-1.0, -1.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(y.amax(0), torch.tensor([1.0, 1.0]), rtol=0, atol=1e-6)
    y = norm.normalize("state", torch.as_tensor(data["state"], dtype=torch.float32))  # large offset, float32
    torch.testing.assert_close(y[:, :2].amin(0), torch.tensor([-1.0, -1.0]), rtol=0, atol=1e-5)
    torch.testing.assert_close(y[:, :2].amax(0), torch.tensor([1.0, 1.0]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["minmax", "meanstd"])
def test_constant_dims_get_unit_scale_and_are_centred(mode):
    data = sample_data()
    data["state"][:, 1] = 5.0 + 2e-7 * np.arange(200)  # range 4e-5 < 1e-4
    norm = Normalizer(SHAPES, mode=mode).fit({"state": data["state"]})
    stats = norm.get_stats("state")
    assert stats["scale"][1:].tolist() == [1.0, 1.0] and stats["scale"][0] != 1  # dim 0 varies
    y = norm.normalize("state", torch.as_tensor(data["state"], dtype=torch.float32))
    assert torch.isfinite(y).all() and y[:, 1:].abs().max() < 1e-4
    assert torch.allclose(norm.unnormalize("state", torch.zeros(3))[2], torch.tensor(5.0))


def test_meanstd_stats():
    data = sample_data()
    norm = Normalizer(SHAPES, mode="minmax", modes={"state": "meanstd"}).fit(data)
    stats = norm.get_stats("state")
    np.testing.assert_allclose(stats["mean"].numpy(), data["state"].mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["std"].numpy(), data["state"].std(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats["min"].numpy(), data["state"].min(0), rtol=1e-6)
    y = norm.normalize("state", torch.as_tensor(data["state"]))
    torch.testing.assert_close(y[:, :2].mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[:, :2].std(0, correction=0), torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)
    assert norm.modes == {"state": "meanstd", "action": "minmax", "image": "minmax"}
    # action stays min-max: its own stats over both leading dims
    assert norm.get_stats("action")["max"].tolist() == data["action"].reshape(-1, 2).amax(0).tolist()


def test_stats_stream_over_blocks(monkeypatch):
    import rtpolicy.datasets.normalizer as mod

    data = sample_data()["state"]
    whole = Normalizer(SHAPES, mode="meanstd").fit({"state": data}).get_stats("state")
    monkeypatch.setattr(mod, "_BLOCK", 7 * 3)  # 7 rows per block, uneven last block
    blocks = Normalizer(SHAPES, mode="meanstd").fit({"state": data}).get_stats("state")
    for k in whole:
        torch.testing.assert_close(blocks[k], whole[k], rtol=1e-6, atol=1e-6)


def test_state_dict_and_safetensors_round_trip(tmp_path):
    shapes = SHAPES | {"robot0.eef_pos": [3]}
    data = sample_data() | {"robot0.eef_pos": np.random.default_rng(1).normal(size=(30, 3))}
    norm = Normalizer(shapes, modes={"state": "meanstd"}).fit(data)
    state = norm.state_dict()
    assert "stats.robot0%2Eeef_pos.scale" in state and "stats.state.fitted" in state
    save_file(state, str(tmp_path / "n.safetensors"))
    fresh = Normalizer(shapes, modes={"state": "meanstd"})
    fresh.load_state_dict(load_file(str(tmp_path / "n.safetensors")))
    x = torch.randn(4, 7, 3)
    for key in ["state", "robot0.eef_pos"]:
        assert torch.equal(fresh.normalize(key, x), norm.normalize(key, x))
        assert torch.equal(fresh.unnormalize(key, x), norm.unnormalize(key, x))


def test_unfitted_use_raises():
    norm = Normalizer(SHAPES)
    with pytest.raises(RuntimeError, match="normalizer for 'state' is not fitted"):
        norm.normalize("state", torch.zeros(3))
    fitted = Normalizer(SHAPES).fit(sample_data())
    norm.load_state_dict(fitted.state_dict())
    assert norm.normalize("state", torch.zeros(3)).shape == (3,)
    fitted.load_state_dict(Normalizer(SHAPES).state_dict())  # loading unfitted stats must be noticed
    with pytest.raises(RuntimeError, match="normalizer for 'action' is not fitted"):
        fitted.unnormalize("action", torch.zeros(2))


def test_partial_fit_leaves_other_keys_unfitted():
    norm = Normalizer(SHAPES).fit({"action": sample_data()["action"]})
    assert norm.normalize("action", torch.zeros(2)).shape == (2,)
    with pytest.raises(RuntimeError, match="'image' is not fitted"):
        norm.normalize("image", torch.zeros(2, 2, 2))


def test_bad_data_raises_and_keeps_previous_stats():
    norm = Normalizer(SHAPES).fit(sample_data())
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    bad = sample_data(seed=1)
    bad["action"][3, 5, 1] = float("nan")
    with pytest.raises(ValueError, match=r"data\['action'\] has a non-finite value \(NaN or inf\) at index \(3, 5\)"):
        norm.fit(bad)
    bad = sample_data(seed=1)
    bad["state"][17, 0] = np.inf
    with pytest.raises(ValueError, match=r"data\['state'\] has a non-finite value \(NaN or inf\) at row 17"):
        norm.fit(bad)
    with pytest.raises(ValueError, match=r"data\['state'\] has shape \(10, 4\), expected \(N, 3\)"):
        norm.fit({"state": np.zeros((10, 4))})
    with pytest.raises(ValueError, match=r"data\['state'\] has shape \(3,\), expected \(N, 3\)"):
        norm.fit({"state": np.zeros(3)})
    with pytest.raises(ValueError, match=r"unknown key 'pose'; normalizer keys are \['action', 'image', 'state'\]"):
        norm.fit({"pose": np.zeros((3, 3))})
    after = norm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_input_and_config_errors():
    norm = Normalizer(SHAPES).fit(sample_data())
    with pytest.raises(ValueError, match=r"normalizer 'image': input has shape \(4, 2, 2\), expected \(\.\.\., 2, 2, 2\)"):
        norm.normalize("image", torch.zeros(4, 2, 2))
    with pytest.raises(KeyError, match="normalizer has no key 'pose'"):
        norm.unnormalize("pose", torch.zeros(3))
    with pytest.raises(ValueError, match=r"normalizer mode for 'state' is 'zscore'; expected one of"):
        Normalizer(SHAPES, modes={"state": "zscore"})
    with pytest.raises(ValueError, match=r"modes has keys \['pose'\] that are not in shapes"):
        Normalizer(SHAPES, modes={"pose": "minmax"})
    with pytest.raises(ValueError, match="normalizer key 'keys' is a reserved name"):
        Normalizer({"keys": [1]})


def test_any_device_and_dtype():
    norm = Normalizer(SHAPES).fit(sample_data())
    x = torch.randn(5, 2, dtype=torch.bfloat16)
    y = norm.normalize("action", x)
    assert y.dtype == torch.bfloat16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    norm.to(device)
    z = norm.unnormalize("action", norm.normalize("action", x.float().to(device)))
    assert z.device.type == device
    torch.testing.assert_close(z.cpu(), x.float(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- hygiene (issue 13)
def tiny_range_data():
    rng = np.random.default_rng(0)
    state = np.stack([rng.uniform(-1, 1, 500), rng.uniform(0.0, 0.0011, 500), rng.uniform(2, 3, 500)], axis=1)
    return {"state": state, "action": rng.uniform(-1, 1, size=(500, 2))}


@pytest.mark.parametrize("mode", ["minmax", "meanstd"])
def test_min_range_caps_the_scale_of_a_barely_moving_dim(mode):
    data = tiny_range_data()  # dim 1: a 1.1 mm range, like the CALVIN-like button
    old = Normalizer(SHAPES, mode=mode, min_range=None).fit(data).get_stats("state")["scale"]
    new = Normalizer(SHAPES, mode=mode).fit(data).get_stats("state")["scale"]
    assert old[1] > 1000 and new[1] == pytest.approx(200.0, rel=1e-6)  # 2 / 0.01 (minmax), 1 / 0.005 (meanstd)
    torch.testing.assert_close(new[[0, 2]], old[[0, 2]])  # dims with a real range keep their scale
    stats = Normalizer(SHAPES, mode=mode, min_range=0.5).fit(data).get_stats("state")
    col = data["state"][:, 2]  # range ~1, std ~0.29: a floor of 0.5 (std floor 0.25) leaves it alone
    assert stats["scale"][2] == pytest.approx(2 / np.ptp(col) if mode == "minmax" else 1 / np.std(col), rel=1e-5)
    assert stats["scale"][1] == pytest.approx(2 / 0.5 if mode == "minmax" else 1 / 0.25, rel=1e-6)


def test_normalized_inputs_are_clipped_and_a_far_input_warns_once():
    norm = Normalizer(SHAPES).fit(tiny_range_data())
    x = torch.tensor([[0.0, 0.5, 2.5], [0.9, 0.0005, 2.6]])  # row 0 dim 1: 0.5 m on a 1 mm dim
    with pytest.warns(RuntimeWarning, match=r"normalizer 'state'\[1\]: input 0\.5 is \d+\.\d normalized units out "
                                            r"\(fitted range \[.*\]; warn_at 2\.0\); clipped to \+-3\.0"):
        y = norm.normalize("state", x)
    assert y[0, 1] == 3.0 and y.abs().max() <= 3.0
    torch.testing.assert_close(norm.unnormalize("state", norm.normalize("state", x[1:])), x[1:], rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once per key
        norm.normalize("state", x)
        norm.normalize("state", x[1:])  # in range: silent
    off = Normalizer(SHAPES, min_range=None, clip={"minmax": None}, warn_at={"minmax": None}).fit(tiny_range_data())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert off.normalize("state", x)[0, 1] > 100  # every rule off: the previous behaviour


def test_fit_data_is_never_clipped_or_reported():
    data = sample_data()
    for mode in ("minmax", "meanstd"):
        norm = Normalizer(SHAPES, mode=mode).fit(data)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            x = torch.as_tensor(data["state"])
            torch.testing.assert_close(norm.unnormalize("state", norm.normalize("state", x)), x)


def test_hygiene_settings_are_checked():
    for kw in ({"min_range": 0.0}, {"clip": -1.0}, {"warn_at": {"minmax": "x"}}, {"clip": True}):
        with pytest.raises(ValueError, match=r"normalizer (min_range|clip|warn_at) must be a float > 0 or None"):
            Normalizer(SHAPES, **kw)
