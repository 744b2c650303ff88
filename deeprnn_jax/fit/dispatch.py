"""Jitted epochs run back to back from the host, with the device never waiting for it.

:class:`EpochPipeline` is host-side scheduling around the jitted epochs of
:func:`deeprnn_jax.fit.training.make_train_epoch`: it dispatches epoch ``k + 1`` before reading
epoch ``k``'s losses, keeps a donated train state only where the caller needs it, and hands every
dispatched epoch out once, also after an interrupt (:meth:`EpochPipeline.drain`). It waits for an
epoch in short sleeps rather than one blocking call, so that signal handlers run at once, and can
give up on an epoch that does not finish (:class:`EpochAbandoned`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np

from deeprnn_jax.fit.training import TrainState


@dataclasses.dataclass(frozen=True)
class FinishedEpoch:
  """One epoch's results, as :meth:`EpochPipeline.run` hands them out.

  Attributes:
    tag: what the epoch's item carried (an epoch number, say).
    losses: ``<float32>[num_batches]`` on the host.
    seconds: the epoch's share of the wall time: from when the device could start it (its
      dispatch, or the previous epoch's end if later) to when its losses were read.
    state: the train state after the epoch, or ``None`` where it was donated to the next epoch
      (the pipeline keeps it only where ``needs_state`` asks, and for the last epoch).
  """

  tag: Any
  losses: np.ndarray
  seconds: float
  state: TrainState | None


class EpochAbandoned(Exception):
  """The epoch being waited for was given up on (``should_abandon`` said so); its state, and the
  state it was trained from, are lost."""


_MAX_POLL_SECONDS = 0.005


def _deleted(tree) -> bool:
  return any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(tree))


class EpochPipeline:
  """Runs jitted epochs back to back, keeping the device busy.

  Epoch ``k + 1`` is dispatched before epoch ``k``'s losses are read back, so that the host sync
  and the host's work between epochs (the next minibatches, logging) overlap the next epoch's
  compute. The train state is donated to every epoch, so epoch ``k``'s state only survives where
  ``needs_state(tag)`` asks for it (for predictions or a checkpoint): the pipeline then waits for
  epoch ``k``, hands its state out, and dispatches epoch ``k + 1`` when the caller asks for the
  next result. A state handed out is valid until then.

  A non-finite loss is therefore seen on the host after the next epoch has been dispatched on the
  diverged parameters; the caller checks ``losses`` first and drops the pipeline.

  A caller that wants to stop early makes ``needs_state`` true for every epoch from then on: the
  epoch already dispatched is then handed out with its state, and nothing more is dispatched.

  Args:
    epoch_fn: ``(state, Xs, Ys, key) -> (state, losses)``, as :func:`make_train_epoch` returns.
    needs_state: ``tag -> bool``; by default no epoch's state is kept but the last one's.
    should_abandon: asked every few milliseconds while an epoch is waited for; ``True`` raises
      :class:`EpochAbandoned` out of :meth:`run` (by default an epoch is waited for until done).
  """

  def __init__(self, epoch_fn: Callable, needs_state: Callable[[Any], bool] = lambda tag: False,
               should_abandon: Callable[[], bool] = lambda: False):
    self._epoch_fn, self._needs_state = epoch_fn, needs_state
    self._should_abandon = should_abandon
    # Dispatched, not yet handed out, oldest first: [tag, state, device losses, dispatch time].
    self._queue: collections.deque = collections.deque()
    self._last: FinishedEpoch | None = None
    self._last_entry = None
    self._last_done = -math.inf

  def _dispatch(self, item, state) -> bool:
    if item is None:
      return False
    tag, Xs, Ys, key = item
    t = time.perf_counter()
    new_state, losses = self._epoch_fn(state, Xs, Ys, key)
    self._queue.append([tag, new_state, losses, t])
    return True

  def _wait(self, losses) -> None:
    """Sleeps until ``losses`` are computed: short sleeps, growing to a few milliseconds, during
    which signal handlers run (a blocking read would hold them until the epoch ends)."""
    is_ready = getattr(losses, "is_ready", None)
    if is_ready is None:
      return
    delay = 1e-4
    while not is_ready():
      if self._should_abandon():
        raise EpochAbandoned
      time.sleep(delay)
      delay = min(2 * delay, _MAX_POLL_SECONDS)

  def _finish(self, entry) -> FinishedEpoch:
    tag, state, losses, t = entry
    self._wait(losses)
    losses = np.asarray(losses)  # the epoch is done: a copy to the host
    now = time.perf_counter()
    done = FinishedEpoch(tag, losses, now - max(t, self._last_done), state)
    self._last_done = now
    return done

  def run(self, state: TrainState, items: Iterable) -> Iterator[FinishedEpoch]:
    """Trains ``state`` (donated) on ``items``, each ``(tag, Xs, Ys, key)``; yields every epoch.

    ``items`` is read one item ahead of the epoch being handed out, so whatever it does (loading
    the next minibatches) overlaps the device's work; it should not compile (that time would
    count as the running epoch's).
    """
    items = iter(items)
    self._dispatch(next(items, None), state)
    while self._queue:
      entry = self._queue[0]
      if not self._needs_state(entry[0]) and self._dispatch(next(items, None), entry[1]):
        entry[1] = None  # donated to the next epoch
      done = self._finish(entry)
      self._last, self._last_entry = done, entry
      self._queue.popleft()  # only now: an interrupt while waiting leaves it for drain()
      yield done
      if done.state is not None:
        self._dispatch(next(items, None), done.state)

  def drain(self) -> list[FinishedEpoch]:
    """After an interrupt: the epoch last handed out, then every epoch dispatched since (each
    waited for), oldest first; a state donated since is ``None``. What the caller may still
    record and save."""
    out = [self._last] if self._last is not None else []
    if self._queue and self._queue[0] is self._last_entry:  # interrupted before its popleft
      self._queue.popleft()
    while self._queue:
      out.append(self._finish(self._queue[0]))
      self._queue.popleft()
    return [dataclasses.replace(f, state=None) if f.state is not None and _deleted(f.state) else f
            for f in out]
