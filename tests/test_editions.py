"""The two d2l editions as objects: what each decides, and that nothing else compares the edition's
name."""

import ast
import math
from pathlib import Path

import numpy as np

import deeprnn_jax
from deeprnn_jax.base import validate
from deeprnn_jax.base.config import TrainConfig
from deeprnn_jax.text import editions

PACKAGE = Path(deeprnn_jax.__file__).parent


def test_every_pipeline_has_its_edition():
  assert set(editions.EDITIONS) == set(validate.PIPELINES) == {"classic", "windows"}
  assert editions.edition(TrainConfig()).name == "classic"
  assert editions.edition(TrainConfig(pipeline="windows")).name == "windows"


def test_each_edition_sets_its_prediction_length_masking_validation_and_perplexity():
  classic, d2l10 = editions.EDITIONS["classic"], editions.EDITIONS["windows"]
  assert (classic.prediction_length, classic.final_predictions) == (50, 2)
  assert (d2l10.prediction_length, d2l10.final_predictions) == (20, 1)
  assert not classic.masked and d2l10.masked
  assert not classic.validates_every_epoch and d2l10.validates_every_epoch
  losses = np.array([0.0, math.log(4.0)])
  assert classic.perplexity(losses) == 2.0  # exp of the mean loss
  assert d2l10.perplexity(losses) == 2.5  # the mean of exp(loss), d2l 1.0's board


def test_prefixes_are_the_books_for_the_time_machine_and_the_first_words_elsewhere():
  vocab = editions.data.Vocab(list("abc xyz"))
  assert editions.default_prefixes(TrainConfig(), None, vocab) == ("time traveller", "traveller")
  assert editions.default_prefixes(TrainConfig(pipeline="windows"), None, vocab) == \
      ("it has", "it has")
  corpus = vocab[list("abc xyz cab")]
  other = TrainConfig(corpus="other.txt")
  assert editions.default_prefixes(other, lambda: np.asarray(corpus), vocab) == ("abc xyz", "xyz")


def _compares_the_edition(tree: ast.AST) -> bool:
  for node in ast.walk(tree):
    if isinstance(node, ast.Compare):
      parts = [node.left, *node.comparators]
      # (the presets' own name "classic" is a preset's, compared where a preset is chosen)
      if any(isinstance(p, ast.Attribute) and p.attr == "pipeline" for p in parts) or any(
          isinstance(p, ast.Constant) and p.value == "windows" for p in parts):
        return True
  return False


def test_only_the_editions_and_the_settings_checks_compare_the_editions_name():
  comparing = {p.stem for p in PACKAGE.rglob("*.py") if _compares_the_edition(ast.parse(
      p.read_text()))}
  assert comparing == {"config"}  # TrainConfig.validate: the windows pipeline's own settings
