"""robomimic HDF5 (robomimic's, MimicGen's and robosuite's datasets).

Layout::

    data                      attrs: total (int, all steps), env_args (JSON: {"env_name", "type", "env_kwargs"})
    data/demo_<i>/obs/<key>   (L, *shape)   e.g. robot0_eef_pos (L, 3), object (L, 14), agentview_image (L, 84, 84, 3) uint8
    data/demo_<i>/actions     (L, Da)
    data/demo_<i>/rewards     (L,)
    data/demo_<i>/dones       (L,)
    data/demo_<i>/states      (L, Ds)       optional MuJoCo states
    data/demo_<i>             attrs: num_samples (= L)
    mask/<split>              (n,) bytes    demo names of a split (train, valid, ...)

Demos are read in robomimic's order (by the integer after ``demo_``). Our names: ``obs/<cam>_image`` ->
``rgb_<cam>``, ``obs/<key>`` -> ``<key>``, ``actions`` -> ``action``, ``rewards`` -> ``reward``, ``dones`` ->
``done``, ``states`` -> ``sim_state``; the writer inverts this, so a zarr store with robosuite-style keys
(robot0_eef_pos, robot0_eef_quat, robot0_gripper_qpos, object, rgb_agentview) exports to what robomimic
trains on. robomimic needs rewards and dones: when the source has none the writer stores zeros (dones 1 at
each episode's last step) and lists them in ``data`` attr ``rtpolicy_synthesized``, so reading the file back
gives the source's keys only. Values are stored with their dtype, uncompressed: zarr -> hdf5 -> zarr is exact.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rtpolicy.datasets.formats.base import (
    DEFAULT_FPS,
    FORMATS,
    EpisodeSource,
    Format,
    FormatError,
    atomic_path,
    check_episode,
    concat_features,
    jsonable,
    map_keys,
)

_TOP = {"actions": "action", "rewards": "reward", "dones": "done", "states": "sim_state"}
_TOP_INV = {v: k for k, v in _TOP.items()}
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def absolute_pose_actions(env_args: Any) -> bool:
    """Whether robomimic ``env_args`` describe robosuite's OSC_POSE with absolute input (robosuite 1.5's composite
    ``input_type: absolute``, or robosuite 1.4's ``control_delta: false`` as in Chi et al.'s ``*_abs`` datasets)."""
    if not isinstance(env_args, Mapping) or env_args.get("type") != 1:
        return False
    ctrl = (env_args.get("env_kwargs") or {}).get("controller_configs") or {}
    arm = ((ctrl.get("body_parts") or {}).get("right") or {}) if isinstance(ctrl, Mapping) else {}
    return arm.get("input_type") == "absolute" or (isinstance(ctrl, Mapping) and ctrl.get("control_delta") is False)


def _h5py():
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("robomimic HDF5 needs h5py: pip install 'rtpolicy[formats]'") from e
    return h5py


def default_name(native: str) -> str | None:
    """robomimic key -> ours."""
    if native in _TOP:
        return _TOP[native]
    key = native.removeprefix("obs/")
    return f"rgb_{key[: -len('_image')]}" if key.endswith("_image") and len(key) > len("_image") else key


def native_name(ours: str) -> str:
    """Our key -> robomimic's (the inverse of :func:`default_name`)."""
    if ours in _TOP_INV:
        return _TOP_INV[ours]
    if ours.startswith("rgb_") and len(ours) > 4:
        return f"obs/{ours[4:]}_image"
    return f"obs/{ours}"


def _demo_names(data, where: str) -> list[str]:
    names = [n for n in data if n.startswith("demo_")]
    bad = [n for n in names if not n[5:].isdigit()]
    if bad:
        raise FormatError(f"{where}: data/{bad[0]} is not named demo_<integer>")
    if not names:
        raise FormatError(f"{where}: group 'data' holds no demo_<i> groups; not a robomimic dataset")
    return sorted(names, key=lambda n: int(n[5:]))


def _native_keys(demo, where: str, name: str) -> list[str]:
    keys = [k for k in _TOP if k in demo]
    if "actions" not in keys:
        raise FormatError(f"{where}: data/{name} has no 'actions' dataset (it holds {sorted(demo.keys())})")
    if "obs" in demo:
        keys += [f"obs/{k}" for k in sorted(demo["obs"].keys())]
    return keys


@FORMATS.register("robomimic")
class RobomimicFormat(Format):
    name = "robomimic"
    suffixes = (".hdf5", ".h5")

    def detect(self, path: Path) -> bool:
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            return f.read(8) == _HDF5_MAGIC

    def read(self, path: Path, keys: Mapping[str, Any] | None = None, **options: Any) -> EpisodeSource:
        h5py = _h5py()
        where = str(path)
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise FormatError(f"{where}: not an HDF5 file ({e})") from e
        with f:
            if not isinstance(f.get("data"), h5py.Group):
                raise FormatError(f"{where}: no group 'data'; not a robomimic dataset (top level: {sorted(f.keys())})")
            data = f["data"]
            demos = _demo_names(data, where)
            native = _native_keys(data[demos[0]], where, demos[0])
            synthesized = set(json.loads(data.attrs.get("rtpolicy_synthesized", "[]")))
            native = [k for k in native if k not in synthesized]
            for name in demos[1:]:
                if (other := [k for k in _native_keys(data[name], where, name) if k not in synthesized]) != native:
                    raise FormatError(f"{where}: data/{name} holds keys {sorted(other)}, data/{demos[0]} holds {sorted(native)}")
            mapping = map_keys(native, default_name, keys, where)
            shapes = {}
            first = data[demos[0]]
            for ours, srcs in mapping.items():
                dsets = [first[s] for s in srcs]
                if len(srcs) == 1:
                    shapes[ours] = (tuple(dsets[0].shape[1:]), dsets[0].dtype)
                else:
                    shapes[ours] = ((sum(int(np.prod(d.shape[1:])) for d in dsets),), np.result_type(*[d.dtype for d in dsets]))
            lengths = np.array([len(data[n]["actions"]) for n in demos], dtype=np.int64)
            attrs = _read_attrs(f, data, where)
        fps = float(attrs.get("fps", DEFAULT_FPS))
        # absolute OSC_POSE actions (pos, axis-angle, gripper) -> our absolute action_mode's (pos, 6D rotation, gripper)
        to_rot6d = (mapping.get("action") == ["actions"] and shapes["action"][0] == (7,)
                    and absolute_pose_actions(attrs.get("env_args")))
        if to_rot6d:
            shapes["action"] = ((10,), shapes["action"][1])

        def episodes():
            with h5py.File(path, "r") as f:
                data = f["data"]
                for i, name in enumerate(demos):
                    demo = data[name]
                    ep = {}
                    for ours, srcs in mapping.items():
                        parts = []
                        for s in srcs:
                            if s not in demo:
                                raise FormatError(f"{where}: data/{name}/{s} is missing")
                            parts.append(np.asarray(demo[s][()]))
                        ep[ours] = concat_features(parts, where, ours)
                    if to_rot6d:
                        from rtpolicy.envs.robosuite.env import axis_angle_to_absolute

                        ep["action"] = axis_angle_to_absolute(ep["action"])
                    try:
                        check_episode(ep, where, i)
                    except FormatError as e:
                        raise FormatError(f"{e} (data/{name})") from e
                    yield ep

        return EpisodeSource(shapes, episodes, where, lengths, attrs, fps)

    def write(self, source: EpisodeSource, path: Path, overwrite: bool = False, **options: Any) -> None:
        h5py = _h5py()
        if "action" not in source.keys:
            raise FormatError(f"{source.where}: robomimic needs an 'action' key; the source holds {sorted(source.keys)}")
        names = {k: native_name(k) for k in source.keys}
        synth = [n for n in ("rewards", "dones") if n not in names.values()]
        attrs = dict(source.attrs)
        env_type = 1 if attrs.get("env") == "robosuite" else 2  # robomimic's EnvType: ROBOSUITE_TYPE 1, GYM_TYPE 2
        env_args = attrs.pop("env_args", None) or {"env_name": str(attrs.get("task", "")), "type": env_type,
                                                   "env_kwargs": {"control_freq": source.fps} if env_type == 1 else {}}
        if isinstance(env_args, str):  # already JSON (robosuite stores it so)
            try:
                env_args = json.loads(env_args)
            except json.JSONDecodeError as e:
                raise FormatError(f"{source.where}: attrs env_args is a string but not JSON ({e})") from e
        # our absolute robosuite actions (pos, 6D rotation, gripper) -> what robosuite's absolute input takes (axis-angle)
        to_axis_angle = absolute_pose_actions(env_args) and source.keys["action"][0] == (10,)
        if to_axis_angle:
            from rtpolicy.envs.robosuite.env import absolute_to_axis_angle
        with atomic_path(path, overwrite) as tmp, h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            total = 0
            demo_names = []
            for i, ep in enumerate(source.checked_episodes()):
                L = check_episode(ep, source.where, i)
                demo = data.create_group(f"demo_{i}")
                for k, x in ep.items():
                    demo.create_dataset(names[k], data=absolute_to_axis_angle(x) if k == "action" and to_axis_angle else x)
                if "rewards" in synth:
                    demo.create_dataset("rewards", data=np.zeros(L, np.float64))
                if "dones" in synth:
                    demo.create_dataset("dones", data=(np.arange(L) == L - 1).astype(np.int64))
                demo.attrs["num_samples"] = L
                total += L
                demo_names.append(f"demo_{i}")
            if not demo_names:
                raise FormatError(f"{source.where}: no episodes to write")
            masks = attrs.pop("robomimic_masks", None)
            data.attrs["total"] = total
            data.attrs["env_args"] = json.dumps(env_args)
            data.attrs["rtpolicy_synthesized"] = json.dumps(synth)
            data.attrs["rtpolicy_attrs"] = json.dumps(jsonable(attrs) | {"fps": source.fps})
            if not isinstance(masks, Mapping) or not all(set(v) <= set(demo_names) for v in masks.values()):
                n_val = max(1, round(0.1 * len(demo_names))) if len(demo_names) > 1 else 0
                masks = {"train": demo_names[: len(demo_names) - n_val], "valid": demo_names[len(demo_names) - n_val:]}
            mask = f.create_group("mask")
            for split, members in masks.items():
                mask.create_dataset(split, data=np.array([m.encode() for m in members], dtype="S"))


def _read_attrs(f, data, where: str) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    if "rtpolicy_attrs" in data.attrs:
        attrs |= json.loads(data.attrs["rtpolicy_attrs"])
    if "env_args" in data.attrs:
        try:
            attrs["env_args"] = json.loads(data.attrs["env_args"])
        except (json.JSONDecodeError, TypeError) as e:
            raise FormatError(f"{where}: data attr env_args is not JSON ({e})") from e
        control = attrs["env_args"].get("env_kwargs", {}).get("control_freq") if isinstance(attrs["env_args"], dict) else None
        if control and "fps" not in attrs:
            attrs["fps"] = float(control)
    if "mask" in f:
        attrs["robomimic_masks"] = {s: [m.decode() if isinstance(m, bytes) else str(m) for m in f["mask"][s][()]] for s in f["mask"]}
    return attrs

