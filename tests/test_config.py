"""Hydra structured configs: defaults compose, typos and wrong types fail loudly."""


import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from rtpolicy.config import register_configs
from rtpolicy.factory import CONF_DIR

CONF = str(CONF_DIR)
register_configs()


def _compose(overrides, name="train"):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(name, overrides=overrides)


def test_defaults_compose():
    cfg = _compose([])
    assert cfg.task.name == "pick-place-v3"
    assert cfg.policy.name == "diffusion"
    assert cfg.denoiser.name == "unet1d"
    assert cfg.task.dataset == "data/metaworld/pick-place-v3.zarr"


def test_group_choice_switches_schema():
    cfg = _compose(["denoiser=transformer", "task=drawer_open", "denoiser.n_layer=2"])
    assert cfg.denoiser.n_layer == 2 and cfg.task.name == "drawer-open-v3"


@pytest.mark.parametrize(
    "override",
    ["train.stpes=10", "task.nmae=x", "denoiser.n_layer=2", "policy.horizon_len=3"],
)
def test_unknown_key_fails(override):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as e:
        _compose([override])
    assert override.split("=")[0].split(".")[-1] in str(e.value) + str(e.value.__cause__)


def test_wrong_type_fails():
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        _compose(["train.steps=many"])
    assert "steps" in str(e.value) + str(e.value.__cause__)


def test_unknown_group_option_fails():
    with pytest.raises(ConfigCompositionException, match="denoiser"):
        _compose(["denoiser=lstm"])


def test_eval_config_composes():
    cfg = _compose(["checkpoint=x.safetensors", "eval.episodes=3", "+policy.num_inference_steps=4"], name="eval")
    assert cfg.eval.episodes == 3 and cfg.policy.num_inference_steps == 4
