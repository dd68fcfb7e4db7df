"""TrainConfig: one frozen config built once from the flags; its loss options ARE an AdaptiveDPOConfig."""
import dataclasses

import pytest

from adpo_kernels import AdaptiveDPOConfig
from adpo_kernels.config import LOSS_TYPES, MARGIN_TYPES, WEIGHT_TYPES
from adpo_train.cli import build_cache_parser, build_parser, resolve
from adpo_train.config import TOY_LOSS, TrainConfig
from adpo_train.errors import UserError

from tests.test_train_fixtures import toy_assets


def _cfg(*argv) -> TrainConfig:
    return resolve(build_parser().parse_args(list(argv)))


def test_config_is_frozen_and_replace_makes_a_new_one():
    cfg = _cfg()
    assert isinstance(cfg, TrainConfig) and isinstance(cfg.loss_config, AdaptiveDPOConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.loss_config.beta = 1.0
    assert isinstance(cfg.ema_decays, tuple)  # no mutable list inside a frozen config
    other = cfg.replace(rank=3)
    assert other.rank == 3 and cfg.rank == 4 and other != cfg
    with pytest.raises(TypeError, match="loss_config"):
        TrainConfig(loss_config=dict(beta=1.0))


def test_presets_round_trip():
    # no flags at all: exactly the toy demo preset
    assert _cfg() == TrainConfig.toy_demo()
    # --preset paper on a real model (no CUDA here: no fp16 layer) is the paper preset
    model = toy_assets()["model"]
    cfg = _cfg("--pretrained_model_name_or_path", model, "--preset", "paper")
    assert cfg == TrainConfig.paper(pretrained_model_name_or_path=model)
    # the recorded options rebuild the same config
    assert TrainConfig(**cfg.to_dict(), loss_config=cfg.loss_config) == cfg


def test_loss_config_is_what_the_flags_say():
    cfg = _cfg("--rho", "3", "--weight_type", "sqrt", "--tau", "2", "--intercept", "0.5", "--margin_type", "none",
               "--loss_type", "robust", "--label_smoothing", "0.1", "--beta_ipo", "7", "--no-logits_normalize",
               "--std_standardize", "--weight_normalize", "--loss_flip_ratio", "0.25", "--loss_flip_threshold",
               "0.5", "--sync_batch_stats", "--beta", "42")
    assert cfg.loss_config == AdaptiveDPOConfig(
        beta=42.0, rho=3.0, weight_type="sqrt", tau=2.0, intercept=0.5, margin_type=None, loss_type="robust",
        label_smoothing=0.1, beta_ipo=7.0, logits_normalize=False, std_standardize=True, weight_normalize=True,
        flip_ratio=0.25, flip_threshold=0.5, sync_stats=True)
    assert _cfg("--no-adaptive").loss_config == AdaptiveDPOConfig(**TOY_LOSS, adaptive=False)
    # the loss's flipping and the data's label noise are different options
    assert _cfg("--loss_flip_ratio", "0.3").inject_label_noise == TrainConfig.toy_demo().inject_label_noise


def test_loss_flag_choices_come_from_the_loss_config():
    actions = {a.dest: a for a in build_parser()._actions}
    assert set(actions["loss_type"].choices) == set(LOSS_TYPES) | {"cpo"}  # cpo: refused with diffusers' reason
    assert tuple(actions["weight_type"].choices) == WEIGHT_TYPES
    assert len(actions["margin_type"].choices) == len(MARGIN_TYPES)
    for f in dataclasses.fields(AdaptiveDPOConfig):
        assert any(f.name in (dest, dest.replace("loss_", ""), dest.replace("_batch", ""))
                   for dest in actions), f.name


@pytest.mark.parametrize("argv,flag", [(["--rho", "-1"], "--rho"), (["--loss_flip_ratio", "2"], "--loss_flip_ratio"),
                                       (["--beta", "0"], "--beta"), (["--tau", "nan"], "--tau")])
def test_bad_loss_values_name_the_flag(argv, flag):
    with pytest.raises(UserError) as e:
        _cfg(*argv)
    assert str(e.value).startswith(flag + ":"), str(e.value)


def test_old_flip_flag_spellings_still_work():
    assert _cfg("--flip_ratio", "0.3").inject_label_noise == 0.3
    assert _cfg("--flip_ratio", "0.3") == _cfg("--inject_label_noise", "0.3")
    cache = ["--pretrained_model_name_or_path", "m", "--dataset_name", "d", "--latent_cache", "c"]
    old = build_cache_parser().parse_args(cache + ["--flip_ratio", "0.4", "--flip_seed", "3"])
    new = build_cache_parser().parse_args(cache + ["--inject_label_noise", "0.4", "--flip_seed", "3"])
    assert old == new and new.inject_label_noise == 0.4
    assert build_cache_parser().parse_args(cache).inject_label_noise == 0.0
