"""ObservationBuilder: topics -> policy observation, by joint name, with stamps, history and clear errors (no ROS)."""

import json

import numpy as np
import pytest
import torch

from rtpolicy.deploy.observation import ObservationBuilder, ObservationConfigError, ObservationSpec, sources_json

JOINTS = ["hand_x", "hand_y", "hand_z", "gripper_opening"]
SOURCES = {"state": [{"joint_state": {"topic": "/joint_states", "names": JOINTS, "field": "position"}},
                     {"array": {"topic": "/object_state", "size": 35}}]}


class FakeClock:
    """A steady clock the test advances by hand (the builder only reads it)."""

    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def builder(**kw):
    args = dict(spec=SOURCES, shapes={"state": [39]}, obs_horizon=2) | kw
    return ObservationBuilder(**args)


def test_joints_are_mapped_by_name_not_order():
    state = np.arange(39, dtype=np.float32)
    a, b = builder(), builder()
    a.update_joint_state("/joint_states", JOINTS, {"position": state[:4]})
    order = [2, 0, 3, 1]  # same joints, another order, plus a joint the policy does not use
    b.update_joint_state("/joint_states", [JOINTS[i] for i in order] + ["elbow"],
                         {"position": [float(state[i]) for i in order] + [7.0], "velocity": [0.0] * 5})
    for x in (a, b):
        x.update_array("/object_state", state[4:])
    sa, sb = a.sample(), b.sample()
    assert sa.valid and sb.valid
    np.testing.assert_array_equal(sa.vectors["state"], state)
    np.testing.assert_array_equal(sb.vectors["state"], state)


def test_missing_joint_and_bad_messages_make_the_sample_invalid_with_a_reason():
    b = builder()
    assert "no message yet on /joint_states" in b.sample().reason
    b.update_joint_state("/joint_states", ["hand_x", "hand_z", "gripper_opening"], {"position": [0.0, 0.0, 0.0]})
    b.update_array("/object_state", np.zeros(35))
    s = b.sample()
    assert not s.valid and s.stamp is None and "['hand_y'] missing from /joint_states" in s.reason
    assert b.history_len == 0  # invalid samples never enter the history
    b.update_joint_state("/joint_states", JOINTS, {"position": [0.0, 0.0, 0.0]})  # 3 positions for 4 names
    assert "3 position values for 4 joint names" in b.sample().reason
    b.update_joint_state("/joint_states", JOINTS, {"position": [0.0, float("nan"), 0.0, 0.0]})
    assert "non-finite values at indices [1]" in b.sample().reason
    b.update_joint_state("/joint_states", JOINTS, {"position": [0.0] * 4})
    b.update_array("/object_state", np.zeros(30))
    assert "/object_state has 30 values, expected 35" in b.sample().reason
    b.update_array("/object_state", np.zeros(35))
    assert b.sample().valid
    with pytest.raises(ValueError, match="not configured as a array source"):
        b.update_array("/joint_states", [1.0])


def test_stamp_is_the_oldest_source_and_history_repeats_the_first_sample():
    clock = FakeClock()
    b = builder(obs_horizon=3, clock=clock)
    b.update_array("/object_state", np.zeros(35))
    clock.t = 101.5
    b.update_joint_state("/joint_states", JOINTS, {"position": [1.0, 2.0, 3.0, 4.0]})
    s = b.sample()
    assert s.valid and s.stamp == 100.0  # the array went quiet first: the watchdog must see its age
    obs = b.observation()
    assert set(obs) == {"state"} and obs["state"].shape == (1, 3, 39) and obs["state"].dtype == torch.float32
    assert torch.equal(obs["state"][0, 0], obs["state"][0, 2])  # first sample repeated after a reset
    b.update_joint_state("/joint_states", JOINTS, {"position": [9.0, 2.0, 3.0, 4.0]})
    b.sample()
    obs = b.observation()
    assert obs["state"][0, :, 0].tolist() == [1.0, 1.0, 9.0]  # oldest first
    b.reset()
    assert b.history_len == 0
    with pytest.raises(RuntimeError, match="no valid observation"):
        b.observation()
    b.sample()
    assert b.observation()["state"][0, :, 0].tolist() == [9.0, 9.0, 9.0]


def test_task_id_for_multi_task_bundles():
    b = builder(num_tasks=3)
    b.update_joint_state("/joint_states", JOINTS, {"position": [0.0] * 4})
    b.update_array("/object_state", np.zeros(35))
    assert "no task chosen" in b.sample().reason
    b.set_task_id(2)
    assert b.sample().valid
    tid = b.observation()["task_id"]
    assert tid.dtype == torch.long and tid.tolist() == [2]
    with pytest.raises(ObservationConfigError, match=r"task_id must be in \[0, 3\)"):
        b.set_task_id(3)
    with pytest.raises(ObservationConfigError, match="single-task"):
        builder(task_id=0)


def test_instruction_features_for_language_bundles():
    b = builder(language=("lang_tokens", [4]))
    b.update_joint_state("/joint_states", JOINTS, {"position": [0.0] * 4})
    b.update_array("/object_state", np.zeros(35))
    assert "no instruction" in b.sample().reason
    b.set_instruction(np.array([101, 7, 102, 0]))
    assert b.sample().valid
    ids = b.observation()["lang_tokens"]
    assert ids.dtype == torch.long and ids.shape == (1, 2, 4) and ids[0, -1].tolist() == [101, 7, 102, 0]
    with pytest.raises(ObservationConfigError, match=r"shape \(3,\), the policy's 'lang_tokens' is \(4,\)"):
        b.set_instruction(np.zeros(3))
    emb = builder(language=("lang_emb", [3]))
    with pytest.raises(ObservationConfigError, match="non-finite"):
        emb.set_instruction(np.array([0.0, np.nan, 1.0]))
    with pytest.raises(ObservationConfigError, match="not language-conditioned"):
        builder().set_instruction(np.zeros(3))
    with pytest.raises(ObservationConfigError, match="has no topic source"):
        builder(shapes={"state": [39], "lang_emb": [3]}, language=("lang_emb", [3]))


@pytest.mark.parametrize("spec, shapes, match", [
    (SOURCES | {"state": SOURCES["state"][:1]}, {"state": [39]}, r"sources give 4 \(/joint_states\) = 4 values, the policy expects 39"),
    (SOURCES, {"state": [39], "image": [3, 8, 8]}, r"the policy observes \['image'\] but no sources"),
    (SOURCES | {"extra": [{"array": {"topic": "/x", "size": 1}}]}, {"state": [39]}, r"configured for \['extra'\]"),
    ({"state": [{"joint_state": {"topic": "/j", "names": ["a", "a"]}}]}, {"state": [2]}, r"\['a'\] appear twice"),
    ({"state": [{"joint_state": {"topic": "/j", "names": ["a"], "field": "torque"}}]}, {"state": [1]}, "field must be one of"),
    ({"state": [{"camera": {"topic": "/c"}}]}, {"state": [1]}, "unknown source kind 'camera'"),
    ({"state": [{"array": {"topic": "/a", "size": 1, "scale": 2}}]}, {"state": [1]}, "bad array source"),
    ({"state": [{"array": {"topic": "/a", "size": 1}}, {"joint_state": {"topic": "/a", "names": ["q"]}}]}, {"state": [2]},
     "configured both as array and as joint_state"),
    ("{not json", {"state": [1]}, "not valid JSON"),
    ("", {"state": [1]}, "observation sources are empty"),
])
def test_configuration_errors_are_clear(spec, shapes, match):
    with pytest.raises(ObservationConfigError, match=match):
        ObservationBuilder(spec, shapes, obs_horizon=2)


def test_json_config_round_trip():
    text = sources_json(SOURCES)
    assert json.loads(text) == SOURCES
    spec = ObservationSpec.from_config(text)
    assert spec.topics() == {"/joint_states": "joint_state", "/object_state": "array"}
    assert spec.sources["state"][0].names == tuple(JOINTS)


# ---------------------------------------------------------------- camera topics (real sensor_msgs messages)
IMG_SOURCES = SOURCES | {"rgb": [{"image": {"topic": "/cam/image_raw"}}],
                         "rgb_wrist": [{"image": {"topic": "/wrist/image_raw/compressed", "compressed": True}}]}


def image_builder():
    return ObservationBuilder(IMG_SOURCES, {"state": [39], "rgb": [8, 12, 3], "rgb_wrist": [8, 12, 3]}, obs_horizon=2)


def _image_msg(rgb, encoding="rgb8"):
    from sensor_msgs.msg import Image

    channels = {"rgb8": rgb, "bgr8": rgb[..., ::-1], "rgba8": np.concatenate([rgb, np.full_like(rgb[..., :1], 255)], -1),
                "mono8": rgb[..., :1]}[encoding]
    h, w, c = channels.shape
    pad = 4  # a row stride larger than width * channels, as some drivers send
    rows = np.concatenate([channels.reshape(h, w * c), np.zeros((h, pad), np.uint8)], 1)
    return Image(height=h, width=w, encoding=encoding, step=w * c + pad, data=rows.tobytes())


def _compressed_msg(rgb, fmt="png"):
    import io

    from PIL import Image as PILImage
    from sensor_msgs.msg import CompressedImage

    out = io.BytesIO()
    PILImage.fromarray(rgb).save(out, format=fmt)
    return CompressedImage(format=fmt, data=out.getvalue())


def _feed(b, raw, packed, state=np.zeros(39, np.float32)):
    b.update_joint_state("/joint_states", JOINTS, {"position": state[:4]})
    b.update_array("/object_state", state[4:])
    b.update_image("/cam/image_raw", raw.encoding, raw.height, raw.width, raw.step, raw.data)
    b.update_compressed_image("/wrist/image_raw/compressed", packed.format, packed.data)


def test_images_from_raw_and_compressed_messages():
    rgb = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    for encoding in ("rgb8", "bgr8", "rgba8"):
        b = image_builder()
        _feed(b, _image_msg(rgb, encoding), _compressed_msg(rgb))
        s = b.sample()
        assert s.valid, s.reason
        np.testing.assert_array_equal(s.vectors["rgb"], rgb)  # channel order fixed to RGB, row padding dropped
        np.testing.assert_array_equal(s.vectors["rgb_wrist"], rgb)  # PNG is lossless
    b = image_builder()
    smooth = np.stack(np.broadcast_arrays(np.arange(8)[:, None] * 30, np.arange(12)[None] * 20, 128), -1).astype(np.uint8)
    _feed(b, _image_msg(rgb, "mono8"), _compressed_msg(smooth, "jpeg"))
    s = b.sample()
    np.testing.assert_array_equal(s.vectors["rgb"], np.repeat(rgb[..., :1], 3, -1))
    assert np.abs(s.vectors["rgb_wrist"].astype(int) - smooth).mean() < 8  # JPEG is lossy, but the same picture
    obs = b.observation()
    assert obs["rgb"].shape == (1, 2, 8, 12, 3) and obs["rgb"].dtype == torch.uint8
    assert obs["state"].shape == (1, 2, 39) and obs["state"].dtype == torch.float32


def test_camera_size_bad_frames_and_recovery():
    b = image_builder()
    big = np.kron(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3), np.ones((8, 8, 1), np.uint8))  # 16 x 24, same aspect
    _feed(b, _image_msg(big), _compressed_msg(big))
    s = b.sample()
    assert s.valid and s.vectors["rgb"].shape == (8, 12, 3)  # resized to the policy's size
    wide = np.zeros((8, 20, 3), np.uint8)
    b.update_image("/cam/image_raw", "rgb8", 8, 20, 60, wide.tobytes())
    s = b.current()
    assert not s.valid and "/cam/image_raw" in s.reason and "aspect" in s.reason
    b.update_image("/cam/image_raw", "yuv422", 8, 12, 24, bytes(192))
    assert "yuv422" in b.current().reason
    b.update_image("/cam/image_raw", "rgb8", 8, 12, 36, bytes(100))  # truncated payload
    assert "bytes" in b.current().reason
    b.update_compressed_image("/wrist/image_raw/compressed", "jpeg", b"\xff\xd8 not a jpeg")
    b.update_image("/cam/image_raw", "rgb8", 8, 12, 36, bytes(288))
    s = b.current()
    assert not s.valid and "/wrist/image_raw/compressed" in s.reason and "decode" in s.reason
    b.update_compressed_image("/wrist/image_raw/compressed", "png", _compressed_msg(np.zeros((8, 12, 3), np.uint8)).data)
    assert b.current().valid


def test_image_source_config_errors():
    with pytest.raises(ObservationConfigError, match="exactly one image source"):
        ObservationBuilder(SOURCES | {"rgb": [{"image": {"topic": "/a"}}, {"image": {"topic": "/b"}}]},
                           {"state": [39], "rgb": [8, 8, 3]}, 1)
    with pytest.raises(ObservationConfigError, match="vector keys"):
        ObservationBuilder({"state": [{"image": {"topic": "/a"}}]}, {"state": [39]}, 1)
    with pytest.raises(ObservationConfigError, match="compressed must be"):
        ObservationSpec.from_config({"rgb": [{"image": {"topic": "/a", "compressed": "yes"}}]})
    spec = ObservationSpec.from_config(IMG_SOURCES)
    assert spec.topics()["/wrist/image_raw/compressed"] == "compressed_image" and spec.topics()["/cam/image_raw"] == "image"


def test_each_fault_has_its_kind_and_values_are_checked_after_the_float32_cast():
    b = builder()
    assert b.sample().kind == "stale_obs"  # nothing heard yet: no observation at all
    b.update_array("/object_state", np.zeros(35))
    cases = [  # (names, positions) -> kind, text in the reason
        ((["hand_x", "hand_z", "gripper_opening"], [0.0] * 3), "obs_missing_joint", "['hand_y'] missing"),
        ((JOINTS + ["hand_x"], [0.0] * 5), "obs_duplicate_joint", "names joints ['hand_x'] more than once"),
        ((JOINTS, [0.0] * 3), "obs_wrong_length", "3 position values for 4 joint names"),
        ((JOINTS, [0.0, 1e39, 0.0, 0.0]), "obs_non_finite", "indices [1] (/joint_states: ['hand_y']) as float32"),
        ((JOINTS, [0.0, -np.inf, 0.0, 0.0]), "obs_non_finite", "indices [1]"),
    ]
    for (names, pos), kind, text in cases:
        b.update_joint_state("/joint_states", names, {"position": pos})
        s = b.sample()
        assert not s.valid and s.kind == kind and text in s.reason, (kind, s)
    b.update_joint_state("/joint_states", JOINTS, {"position": [0.0] * 4}, fault=("obs_bad_stamp", "stamp from the future"))
    assert b.sample().kind == "obs_bad_stamp"
    b.update_joint_state("/joint_states", JOINTS, {"position": [3e38] * 4})  # large but finite as float32
    assert b.sample().valid and b.history_len == 2


def test_range_check_from_the_normalizer_stats_names_the_source():
    from rtpolicy.deploy.observation import ranges_from_normalizer

    stats = {"state.min": [-1.0] * 39, "state.max": [1.0] * 39, "state.fitted": [True]}
    ranges = ranges_from_normalizer(stats, {"state": [39]}, margin=0.5)  # [-1, 1] widened by 0.5 * 2 on each side
    np.testing.assert_array_equal(ranges["state"][0], -2.0)
    b = builder(ranges=ranges)
    b.update_joint_state("/joint_states", JOINTS, {"position": [0.0] * 4})
    obj = np.zeros(35)
    obj[3] = 2.5
    b.update_array("/object_state", obj)
    s = b.sample()
    assert s.kind == "obs_out_of_range" and "indices [7] (/object_state: [3])" in s.reason and "2.5 not in [-2, 2]" in s.reason
    obj[3] = 1.9
    b.update_array("/object_state", obj)
    assert b.sample().valid
    assert ranges_from_normalizer({}, {"state": [39]}, 0.5) == {}  # no stats: no check
    with pytest.raises(ObservationConfigError, match="margin must be >= 0"):
        ranges_from_normalizer(stats, {"state": [39]}, -1.0)
