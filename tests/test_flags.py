"""Every flag of every command explains itself in ``--help``, its default shown once."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest
from helpers import REPO, TIMEOUT

import deeprnn_jax.evaluate as evaluate_command
from deeprnn_jax import convert, predict, train

PARSERS = {"train": train.parser, "predict": predict.parser, "convert": convert.parser,
           "convert --preset d2l-en": lambda: convert.parser("d2l-en"),
           "evaluate": evaluate_command.parser}
CHOICE_OF_WAY = {"--from-torch", "--to-torch"}  # one of them is required: neither has a default


def _helps(p: argparse.ArgumentParser) -> dict[str, str]:
  """Each option's help as ``--help`` prints it (``%(default)s`` filled in, the formatter's
  ``(default: X)`` added), by its first flag."""
  formatter = p._get_formatter()
  return {a.option_strings[0]: formatter._expand_help(a) if a.help else ""
          for a in p._actions if a.option_strings}


@pytest.mark.parametrize("name", list(PARSERS))
def test_every_option_has_help_with_its_default_shown_once(name):
  p = PARSERS[name]()
  assert "``" not in (p.description or "")
  for action in p._actions:
    if not action.option_strings or action.default == argparse.SUPPRESS:
      continue
    text = _helps(p)[action.option_strings[0]]
    flag = action.option_strings[0]
    assert text.strip(), f"{name} {flag} has no help"
    assert "``" not in text, f"{name} {flag}: {text}"
    shown = re.findall(r"\bdefault\b", text)
    assert len(shown) <= 1, f"{name} {flag} shows its default {len(shown)} times: {text}"
    if action.default not in (None, False):
      assert shown and str(action.default) in text, f"{name} {flag} hides its default: {text}"
    elif action.default is None and not (action.required or flag in CHOICE_OF_WAY):
      # What leaving it out means, in words.
      assert shown, f"{name} {flag} does not say what its absence means: {text}"


@pytest.mark.parametrize("command", ["train", "predict", "convert", "evaluate"])
def test_help_exits_0_with_no_rst_markup_and_no_empty_defaults(command):
  result = subprocess.run([sys.executable, "-m", f"deeprnn_jax.{command}", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT)
  assert result.returncode == 0 and result.stderr == ""
  assert "``" not in result.stdout
  assert "(default: None)" not in result.stdout and "(default: False)" not in result.stdout


def test_checkpoint_every_says_what_a_kill_costs():
  text = _helps(train.parser())["--checkpoint-every"]
  assert "SIGKILL" in text and "50" in text
