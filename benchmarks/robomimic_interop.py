"""robomimic's own SequenceDataset reads an HDF5 file rtpolicy wrote; run under an interpreter with robomimic.

Not part of rtpolicy and imports none of it. robomimic 0.3.0 (PyPI) needs torch, h5py, numpy and tqdm; its
other dependencies are for training and rendering, so ``pip install --no-deps robomimic h5py`` into a venv
that has torch (e.g. the lerobot one of benchmarks/lerobot_interop.py) is enough:

    python -m rtpolicy.datasets.convert demos.zarr demos.hdf5     # keys robot0_eef_pos, ..., rgb_agentview
    ../lerobot-venv/bin/python benchmarks/robomimic_interop.py demos.hdf5 demos.expected.npz \\
        robot0_eef_pos,robot0_eef_quat,robot0_gripper_qpos,object agentview_image

EXPECTED.npz holds, for every key named (low-dim keys, then image keys) and ``actions``, all steps of every
episode concatenated, plus ``episode_ends``. The script opens the file with robomimic's SequenceDataset
(obs specs registered as robomimic requires, every step one item: seq_length 1, frame_stack 1), iterates
every item and its ``train`` split, and prints one JSON line: ``ok`` when every value is equal.
"""

import json
import sys

import numpy as np


def main() -> int:
    path, expected_path, low_dim, rgb = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4].split(",")
    import robomimic
    import robomimic.utils.obs_utils as ObsUtils
    from robomimic.utils.dataset import SequenceDataset

    exp = np.load(expected_path, allow_pickle=False)
    ObsUtils.initialize_obs_utils_with_obs_specs({"obs": {"low_dim": low_dim, "rgb": rgb}})
    kw = dict(hdf5_path=path, obs_keys=low_dim + rgb, dataset_keys=("actions", "rewards", "dones"), load_next_obs=False,
              frame_stack=1, seq_length=1, pad_frame_stack=True, pad_seq_length=True, get_pad_mask=False, goal_mode=None,
              hdf5_cache_mode="all", hdf5_use_swmr=True, hdf5_normalize_obs=False)
    ds = SequenceDataset(filter_by_attribute=None, **kw)
    items = [ds[i] for i in range(len(ds))]
    got = {k: np.concatenate([it["obs"][k] for it in items]) for k in low_dim + rgb}
    got["actions"] = np.concatenate([it["actions"] for it in items])
    equal = {k: bool(np.array_equal(got[k], exp[k])) for k in got}
    train = SequenceDataset(filter_by_attribute="train", **kw)
    res = {"robomimic": getattr(robomimic, "__version__", "?"), "items": len(ds), "demos": len(ds.demos),
           "train_demos": len(train.demos), "equal": equal}
    res["ok"] = all(equal.values()) and len(ds) == int(exp["episode_ends"][-1]) and len(ds.demos) == len(exp["episode_ends"])
    print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
