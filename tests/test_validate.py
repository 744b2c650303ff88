"""The shared checks: every layer reports a bad setting the same way, before JAX starts."""

import dataclasses
import math
import re

import numpy as np
import pytest

from deeprnn_jax.base import validate
from deeprnn_jax.base.config import TrainConfig
from deeprnn_jax.base.errors import UsageError


@pytest.mark.parametrize("value", [1, 7, 2.0, np.int64(3), np.float32(4)])
def test_positive_int_accepts_whole_numbers(value):
  assert validate.positive_int("layers", value) == int(value)
  assert type(validate.positive_int("layers", value)) is int


@pytest.mark.parametrize("value,message", [
    (0, "layers must be a positive integer, got 0"),
    (-1, "layers must be a positive integer, got -1"),
    (2.5, "layers must be a positive integer, got 2.5"),
    (True, "layers must be a positive integer, got True"),
    ("3", "layers must be a positive integer, got 3"),
    (None, "layers must be a positive integer, got None"),
    (math.nan, "layers must be a positive integer, got nan"),
    (math.inf, "layers must be a positive integer, got inf"),
])
def test_positive_int_refuses_the_rest_naming_the_setting_and_the_value(value, message):
  with pytest.raises(UsageError, match="^" + re.escape(message) + "$"):
    validate.positive_int("layers", value)


# Each refused value and how the message shows it, for both settings.
REFUSED = [(math.inf, "inf"), (1e39, "1e+39"), (-1.0, "-1.0"), (0.0, "0.0"), (math.nan, "nan"),
           ("2", "2")]


@pytest.mark.parametrize("name,value,message", [
    (name, value, f"{name} must be a finite number > 0, got {shown}")
    for name in ("learning rate", "clipping norm") for value, shown in REFUSED])
def test_learning_rates_and_norms_must_be_positive_and_finite_in_float32(name, value, message):
  with pytest.raises(UsageError, match="^" + re.escape(message) + "$"):
    validate.positive_finite(name, value)


def test_learning_rates_up_to_the_float32_maximum_are_accepted():
  assert validate.positive_finite("learning rate", 3e38) == 3e38


def test_unknown_cells_and_impls_are_refused_listing_the_choices():
  assert validate.cell("gru") == "gru"
  with pytest.raises(UsageError,
                     match=r"^unknown cell 'transformer'; choose one of rnn, gru, lstm$"):
    validate.cell("transformer")
  with pytest.raises(UsageError, match="unknown impl 'fast'"):
    validate.model(28, 8, 2, "lstm", "tanh", 0.0, impl="fast")


@pytest.mark.parametrize("field,value,message", [
    ("lr", math.inf, "learning rate"), ("lr", 1e39, "learning rate"),
    ("clip", math.inf, "clipping"),
    ("max_tokens", 0, "max tokens"), ("max_tokens", -2, "max tokens"), ("unroll", 0, "unroll"),
    ("cell", "transformer", "unknown cell"), ("precision", "float16", "unknown precision"),
    ("optimizer", "rmsprop", "unknown optimizer"), ("clean", "strip", "unknown cleaning"),
    ("valid_fraction", 1.0, "valid fraction"), ("batch_size", 0, "batch size"),
    ("lr_schedule", "step", "unknown learning-rate schedule"),
    ("warmup_epochs", 500, "fewer than the run's 500 epochs"),
    ("warmup_epochs", 1.5, "warmup epochs must be an integer"),
    ("lr_min_factor", -0.1, "lr min factor"),
])
def test_config_validate_refuses_each_impossible_setting_naming_it(field, value, message):
  with pytest.raises(UsageError, match=message):
    TrainConfig(**{field: value}).validate()


def test_the_default_config_is_valid_and_the_cells_and_precisions_are_the_documented_ones():
  assert TrainConfig().validate() == TrainConfig()
  assert validate.CELLS == ("rnn", "gru", "lstm") and "layerwise" in validate.IMPLS
  assert validate.PRECISIONS == ("float32", "bfloat16")


def test_unroll_reaches_the_model_from_the_command_line():
  from deeprnn_jax import train
  from deeprnn_jax.model import models
  config = TrainConfig(**train.config_fields(train.parser().parse_args(["--unroll", "4"])))
  assert config.validate().unroll == 4 and models.from_config(config, 28).unroll == 4
  assert TrainConfig.from_json(config.to_json()) == config
  assert models.from_config(TrainConfig(), 28).unroll is None  # the backend's default


def test_every_config_field_has_a_flag_and_the_schedule_flags_round_trip_through_json():
  from deeprnn_jax import train
  args = train.parser().parse_args([])
  assert set(train.config_fields(args)) == {f.name for f in dataclasses.fields(TrainConfig)}
  flags = ["--lr-schedule", "cosine", "--warmup-epochs", "3", "--lr-min-factor", "0.1"]
  config = TrainConfig(**train.config_fields(train.parser().parse_args(flags))).validate()
  assert (config.lr_schedule, config.warmup_epochs, config.lr_min_factor) == ("cosine", 3, 0.1)
  assert TrainConfig.from_json(config.to_json()) == config
