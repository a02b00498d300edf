"""The one path from a config to a policy. Train, resume, ``load_policy``, export, ``load_bundle``, eval,
the ROS 2 node, the benchmarks and the tests all build policies here, so an artifact written by one of
them loads in every other.

    policy_config("truncated", {"horizon": 8}, {"num_inference_steps": 2})  -> DictConfig on TruncatedConfig
    denoiser_config({"name": "unet1d", "down_dims": [16, 32]})              -> DictConfig on UNet1DConfig
    build_policy(policy_cfg, denoiser_cfg, shapes, num_tasks)               -> an untrained head
    policy_from_stored(stored, weights, source=path)                        -> a head with its weights, eval mode
    compose(["task=reach", "policy=edm"])                                   -> the config ``train.py`` runs

A config is always the registered dataclass (``POLICIES`` / ``DENOISERS``) merged with the stored or
given values, so a misspelt key, a wrong type or an unknown choice fails with one line naming it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rtpolicy.errors import UserError
from rtpolicy.processors import ObservationProcessor

#: the Hydra config folder train.py and eval.py compose from
CONF_DIR = Path(__file__).resolve().parent / "conf"  # package data: an installed rtpolicy carries its configs


class ConfigError(UserError):
    """A config that does not fit this rtpolicy's schemas; the message names the source and the key."""


def _registries():
    from rtpolicy.policies import load_all
    from rtpolicy.policies.base import POLICIES
    from rtpolicy.policies.denoisers.base import DENOISERS

    load_all()
    return POLICIES, DENOISERS


def _typed(kind: str, registry, stored: Any, overrides: Sequence[Any], source: str) -> DictConfig:
    if isinstance(stored, str):
        stored = {"name": stored}
    elif dataclasses.is_dataclass(stored):
        stored = OmegaConf.structured(stored)
    stored = OmegaConf.to_container(stored) if isinstance(stored, DictConfig) else dict(stored)
    name = stored.get("name")
    if name not in registry:
        raise ConfigError(f"{source}: unknown {kind} {name!r}; registered: {', '.join(registry.names())}")
    try:
        return OmegaConf.merge(OmegaConf.structured(registry.get(name).config), stored,
                               *[OmegaConf.to_container(o) if isinstance(o, DictConfig) else o for o in overrides if o])
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {kind} config does not fit {registry.get(name).config.__name__}: "
                          f"{str(e).splitlines()[0]} (key {getattr(e, 'full_key', '?')})") from e


def policy_config(stored: Mapping[str, Any] | DictConfig | str, *overrides: Mapping[str, Any] | None,
                  source: str = "policy") -> DictConfig:
    """A head's config: its registered dataclass (a ``HeadConfig``) merged with ``stored`` (a name or a
    dict with ``name``) and then each override in turn. Raises ConfigError naming ``source`` and the key."""
    return _typed("policy", _registries()[0], stored, overrides, source)


def denoiser_config(stored: Mapping[str, Any] | DictConfig | str, *overrides: Mapping[str, Any] | None,
                    source: str = "denoiser") -> DictConfig:
    """A denoiser's config, as :func:`policy_config` for the ``DENOISERS`` registry."""
    return _typed("denoiser", _registries()[1], stored, overrides, source)


def task_config(stored: Mapping[str, Any] | DictConfig, source: str = "task") -> DictConfig:
    """A stored task config (e.g. a checkpoint's) on the ``TaskConfig`` schema, newer fields defaulted."""
    from rtpolicy.config import TaskConfig

    try:
        return OmegaConf.merge(OmegaConf.structured(TaskConfig), stored)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: task config does not fit TaskConfig: {str(e).splitlines()[0]}") from e


def build_policy(policy_cfg, denoiser_cfg, shapes: Mapping[str, Sequence[int]], num_tasks: int = 0,
                 processor: ObservationProcessor | None = None):
    """Build a registered head from typed configs (:func:`policy_config`, :func:`denoiser_config`).

    shapes: {obs_key: feature shape, ..., "action": [Da]}; the head builds its normalizer, encoder and
    denoiser from them, so an artifact needs only configs + shapes + processor + weights.
    processor: the policy's :class:`ObservationProcessor` (None: none, the network reads the raw observation).
    """
    policies, _ = _registries()
    shapes = {k: list(v) for k, v in shapes.items()}
    processor = processor if processor is not None else ObservationProcessor()
    policy = policies.build(policy_cfg.name, policy_cfg, denoiser_cfg, shapes, num_tasks, processor=processor)
    # what policy_from_stored needs to build it again (e.g. on a Ray evaluation worker, with its state dict)
    policy.spec = {"policy": _plain(policy_cfg), "denoiser": _plain(denoiser_cfg), "shapes": shapes, "num_tasks": num_tasks}
    policy.processor = processor
    return policy


def _plain(cfg: Any) -> dict[str, Any]:
    """A config (DictConfig, dataclass or mapping) as plain JSON-able values, enums as their names."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)


def without_init_files(policy_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A stored policy config without training-time init files (``encoder.image_weights``): once trained,
    the weights travel inside the checkpoint or bundle and the init file is never read again."""
    out = dict(policy_cfg)
    if isinstance(out.get("encoder"), Mapping):
        out["encoder"] = dict(out["encoder"], image_weights="")
    return out


def policy_from_stored(stored: Mapping[str, Any], weights: Mapping[str, torch.Tensor] | None, *, source: str,
                       overrides: Mapping[str, Any] | None = None, error: type[Exception] = ConfigError):
    """The policy an artifact describes: ``stored`` holds ``policy`` and ``denoiser`` configs (dicts),
    ``shapes``, ``num_tasks`` and ``processor`` (its config, :mod:`rtpolicy.processors`; None: none);
    ``weights`` its state dict (None: left untrained). ``overrides``
    changes inference-only fields (e.g. ``num_inference_steps``). Every problem raises ``error`` with one
    line naming ``source``. Returns the policy in eval mode on the CPU."""
    try:
        pol = policy_config(without_init_files(stored["policy"]), overrides, source=str(source))
        den = denoiser_config(stored["denoiser"], source=str(source))
        shapes = stored["shapes"]
    except KeyError as e:
        raise error(f"{source}: no {e.args[0]!r} in its metadata") from e
    except ConfigError as e:
        raise error(str(e)) from e
    try:
        processor = ObservationProcessor.from_config(stored.get("processor"))
    except (ValueError, TypeError) as e:
        raise error(f"{source}: bad processor config: {e}") from e
    try:
        policy = build_policy(pol, den, shapes, int(stored.get("num_tasks") or 0), processor)
    except (ValueError, TypeError, KeyError) as e:
        raise error(f"{source}: its config does not build a policy: {e}") from e
    if weights is not None:
        try:
            policy.load_state_dict(dict(weights))
        except RuntimeError as e:  # missing/unexpected keys or size mismatches, all listed by torch
            raise error(f"{source}: weights do not match the policy its config builds: "
                        f"{' '.join(str(e).split())[:400]}") from e
    return policy.eval()


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """The config ``python train.py OVERRIDES`` (or ``eval.py``) runs, composed by Hydra from ``rtpolicy/conf/``
    and the registered schemas; for tests and benchmarks that start where a user starts."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rtpolicy.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))
