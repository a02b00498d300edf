"""Every registered denoiser: shapes, conditioning on t and cond, trainability, config validation."""

import pytest
import torch

import rtpolicy.policies.denoisers.transformer  # noqa: F401  (registers)
import rtpolicy.policies.denoisers.unet1d  # noqa: F401  (registers)
from rtpolicy.factory import denoiser_config
from rtpolicy.policies.denoisers.base import DENOISERS

B, T, DA, DC, N = 3, 8, 3, 10, 2
SMALL = {"unet1d": {"down_dims": [16, 32]}, "transformer": {"n_layer": 1, "n_head": 2, "n_emb": 32}}


def build(name: str, horizon: int = T, **over):
    cfg = denoiser_config(name, SMALL.get(name, {}), over)
    torch.manual_seed(0)
    return DENOISERS.build(name, cfg, DA, horizon, DC, N)


def data(b: int = B, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, T, DA, generator=g), torch.randint(0, 100, (b,), generator=g).float(), torch.randn(b, N, DC, generator=g)


def fit(model, steps: int, lr: float = 3e-3) -> tuple[float, float]:
    """Regress a fixed random target on one fixed batch; returns (first loss, last loss)."""
    x, t, cond = data()
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x, t, cond), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_both_registered():
    assert {"unet1d", "transformer"} <= set(DENOISERS.names())


@pytest.mark.parametrize("name", DENOISERS.names())
def test_config_is_structured(name):
    cfg = denoiser_config(name)
    assert cfg.name == name


@pytest.mark.parametrize("name", DENOISERS.names())
def test_shape_batch_one_and_inference_mode(name):
    model = build(name)
    x, t, cond = data()
    assert model(x, t, cond).shape == (B, T, DA)
    model.eval()
    with torch.inference_mode():
        out = model(x[:1], t[:1], cond[:1])
    assert out.shape == (1, T, DA) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", DENOISERS.names())
def test_trains_and_depends_on_t_and_cond(name):
    model = build(name)
    fit(model, steps=5)  # moves DiT off its zero-initialised output
    x, t, cond = data(seed=3)
    loss = model(x, t, cond).square().mean()
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead}"
    with torch.no_grad():
        out = model(x, t, cond)
        assert not torch.allclose(out, model(x, t + 7.0, cond), atol=1e-5)
        assert not torch.allclose(out, model(x, t, cond + torch.randn_like(cond)), atol=1e-5)
        # the samples of a batch are independent
        torch.testing.assert_close(out[:1], model(x[:1], t[:1], cond[:1]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", DENOISERS.names())
def test_overfits_one_batch(name):
    first, last = fit(build(name), steps=60)
    assert last < first / 20, (first, last)


def test_dit_starts_at_zero():
    x, t, cond = data()
    assert torch.equal(build("transformer")(x, t, cond), torch.zeros(B, T, DA))


def test_unet_rejects_indivisible_horizon():
    with pytest.raises(ValueError, match=r"horizon 10 .*divisible.*\[16, 32, 64\]"):
        build("unet1d", horizon=10, down_dims=[16, 32, 64])
    assert build("unet1d", horizon=12, down_dims=[16, 32, 64])(torch.zeros(1, 12, DA), torch.zeros(1), torch.zeros(1, N, DC)).shape == (1, 12, DA)


def test_unet_rejects_bad_groups():
    with pytest.raises(ValueError, match="n_groups 8 must divide"):
        build("unet1d", down_dims=[12, 32])


def test_transformer_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="n_emb 30 must be divisible by n_head 4"):
        build("transformer", n_emb=30, n_head=4)
