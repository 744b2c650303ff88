"""Named runs: the settings of an edition of d2l's chapter, which flags then override.

``classic`` (the default) is d2l's classic edition:
:class:`~deeprnn_jax.base.config.TrainConfig`'s own defaults. ``d2l-en`` is the section in the
current English edition (d2l 1.0, package 1.0.3):

    data = d2l.TimeMachine(batch_size=1024, num_steps=32)
    gru = d2l.GRU(num_inputs=len(data.vocab), num_hiddens=32, num_layers=2)
    model = d2l.RNNLM(gru, vocab_size=len(data.vocab), lr=2)
    trainer = d2l.Trainer(max_epochs=100, gradient_clip_val=1, num_gpus=1)

read through the windows pipeline (:mod:`deeprnn_jax.text.windows`) over the whole text.
"""

from __future__ import annotations

import dataclasses

from deeprnn_jax.base.config import TrainConfig
from deeprnn_jax.base.errors import UsageError

PRESETS: dict[str, dict] = {
    "classic": {},
    "d2l-en": dict(pipeline="windows", cell="gru", num_layers=2, num_hiddens=32, batch_size=1024,
                   num_steps=32, lr=2.0, clip=1.0, num_epochs=100, max_tokens=-1,
                   num_train=10000, num_val=5000),
}


def preset(name: str, **overrides) -> TrainConfig:
  """The preset ``name``'s config, with ``overrides`` (config fields) applied over it."""
  if name not in PRESETS:
    raise UsageError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
  return dataclasses.replace(TrainConfig(**PRESETS[name]), **overrides)
