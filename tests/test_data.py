"""The data pipeline: d2l parity, corpus files, vocabulary and minibatch iterators."""

from __future__ import annotations

import collections
import hashlib
import io
import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from references import d2l

from deeprnn_jax.base.errors import UsageError
from deeprnn_jax.text import corpora, data
from deeprnn_jax.text.data import DataError

TM = "timemachine.txt"
# Written out here, not read from the module under test: the variable a user sets, and where The
# Time Machine is downloaded from with its SHA-1 (that of the file d2l's book uses).
DATA_ENV = "DEEPRNN_JAX_DATA"
TM_URL = "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt"
TM_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"
TM_BYTES = 178_979


def stack(batches):
  xs, ys = zip(*batches)
  return np.stack(xs), np.stack(ys)


def positions(fn, n, batch_size, num_steps, seed):
  """Where each token of an epoch comes from: the epoch of ``arange(n)`` with the same seed."""
  return fn(np.arange(n, dtype=np.int32), batch_size, num_steps, seed)


def mentions(message: str, number: int) -> bool:
  return re.search(rf"(?<!\d){number}(?!\d)", message) is not None


def reference_offsets(num_steps: int, use_random_iter: bool) -> range:
  """d2l's offsets, both ends included: ``random.randint(0, num_steps - 1)`` (random sampling),
  ``random.randint(0, num_steps)`` (sequential partitioning)."""
  return range(num_steps) if use_random_iter else range(num_steps + 1)


def reference_batches(n: int, batch_size: int, num_steps: int, offset: int,
                      use_random_iter: bool) -> int:
  """How many minibatches d2l's own iterator yields for ``n`` tokens from ``offset``: counted by
  running it (``references/d2l.py``), not by a formula."""
  corpus = list(range(n))
  if use_random_iter:
    return sum(1 for _ in d2l.seq_data_iter_random(corpus, batch_size, num_steps, offset,
                                                   lambda indices: None))
  return sum(1 for _ in d2l.seq_data_iter_sequential(corpus, batch_size, num_steps, offset))


# --------------------------------------------------------------------------------------------
# Cleaning, The Time Machine, vocabulary.


def test_clean_line_is_d2l():
  for line in ["The Time Machine, by H. G. Wells [1898]\n", "  I.\n", "\n", "it's 12 o'clock",
               "ÉCOLE--normale", "a\tb\r\n", "123 !!"]:
    assert data.clean_line(line) == d2l.clean(line)
  assert data.clean_line("The Time Machine, by H. G. Wells [1898]\n") == \
      "the time machine by h g wells"


def test_read_time_machine_is_d2l(time_machine_path):
  lines = data.read_time_machine()
  assert lines == d2l.read_time_machine(time_machine_path)
  assert all(line == line.strip().lower() for line in lines)


def test_time_machine_corpus_and_vocab_match_d2l_170580_tokens_and_28_symbols(
    time_machine_path, time_machine_corpus):
  corpus, vocab = time_machine_corpus
  want_corpus, want_vocab = d2l.load_corpus_time_machine(time_machine_path)
  tokens = [ch for line in d2l.read_time_machine(time_machine_path) for ch in line]
  # d2l's Vocab, restated: characters of the cleaned lines, counted, stable-sorted by count.
  token_freqs = sorted(collections.Counter(tokens).items(), key=lambda x: x[1], reverse=True)
  expected = ["<unk>"] + [token for token, _ in token_freqs]
  assert want_vocab.idx_to_token == expected and want_vocab.token_freqs == token_freqs

  assert len(vocab) == 28
  assert vocab.idx_to_token[:5] == ["<unk>", " ", "e", "t", "a"]
  assert vocab.idx_to_token == expected
  assert vocab.token_freqs == token_freqs
  assert vocab.token_to_idx == want_vocab.token_to_idx
  assert corpus.dtype == np.int32 and corpus.ndim == 1
  assert len(corpus) == 170_580
  index = {token: i for i, token in enumerate(expected)}
  np.testing.assert_array_equal(corpus, np.array([index[t] for t in tokens], np.int32))
  np.testing.assert_array_equal(corpus, np.array(want_corpus, np.int32))


def test_max_tokens_keeps_the_first_tokens_and_the_vocab_of_the_whole_book(
    time_machine_path, time_machine_corpus):
  full, full_vocab = time_machine_corpus
  corpus, vocab = data.load_corpus_time_machine(max_tokens=10000)
  assert len(corpus) == 10000
  np.testing.assert_array_equal(corpus, full[:10000])
  assert vocab.idx_to_token == full_vocab.idx_to_token  # Built from the whole book.
  want_corpus, want_vocab = d2l.load_corpus_time_machine(time_machine_path, max_tokens=10000)
  np.testing.assert_array_equal(corpus, np.array(want_corpus, np.int32))
  assert vocab.idx_to_token == want_vocab.idx_to_token


def test_vocab_orders_by_count_maps_unknowns_to_unk_and_honours_min_freq_and_reserved():
  tokens = [["b", "a", "b"], ["c", "b", "a"], ["d"]]  # b: 3, a: 2, c: 1, d: 1.
  vocab = data.Vocab(tokens)
  assert vocab.idx_to_token == ["<unk>", "b", "a", "c", "d"]  # Ties keep first appearance.
  assert len(vocab) == 5
  assert vocab.unk == 0
  assert vocab["b"] == 1 and vocab["d"] == 4
  assert vocab["zzz"] == 0 and vocab["<unk>"] == 0
  assert vocab[["a", "c", "zzz"]] == [2, 3, 0]
  assert vocab[("b", "a")] == [1, 2]
  assert vocab.to_tokens(2) == "a"
  assert vocab.to_tokens(np.int32(3)) == "c"
  assert vocab.to_tokens([1, 4, 0]) == ["b", "d", "<unk>"]
  assert vocab.token_freqs == [("b", 3), ("a", 2), ("c", 1), ("d", 1)]
  for i, token in enumerate(vocab.idx_to_token):
    assert vocab[token] == i and vocab.to_tokens(i) == token

  # A flat list of tokens counts the same as a list of lines.
  assert data.Vocab(["b", "a", "b", "c", "b", "a", "d"]).idx_to_token == vocab.idx_to_token

  # min_freq drops rare tokens, which then map to <unk>.
  frequent = data.Vocab(tokens, min_freq=2)
  assert frequent.idx_to_token == ["<unk>", "b", "a"]
  assert frequent["c"] == 0 and len(frequent) == 3
  assert frequent.token_freqs == vocab.token_freqs  # Counts are of every token.

  # Reserved tokens come right after <unk> and are not repeated when they occur.
  reserved = data.Vocab(tokens + [["<pad>"]], reserved_tokens=["<pad>", "<bos>"])
  assert reserved.idx_to_token == ["<unk>", "<pad>", "<bos>", "b", "a", "c", "d"]
  assert reserved["<bos>"] == 2 and reserved["b"] == 3

  empty = data.Vocab()
  assert len(empty) == 1 and empty["x"] == 0 and empty.token_freqs == []


@pytest.mark.parametrize("tokens,kwargs", [
    ([["b", "a", "b"], ["c", "b", "a"], ["d"]], {}),
    (["b", "a", "b", "c", "b", "a", "d"], {}),
    ([["b", "a", "b"], ["c", "b", "a"], ["d"]], dict(min_freq=2)),
    ([["b", "a"], ["<pad>", "c"]], dict(reserved_tokens=["<pad>", "<bos>"])),
    ([list("the time machine by h g wells"), []], dict(min_freq=3)),
    (None, {}),
])
def test_vocab_is_d2l_vocab(tokens, kwargs):
  ours, theirs = data.Vocab(tokens, **kwargs), d2l.Vocab(tokens, **kwargs)
  assert ours.idx_to_token == theirs.idx_to_token
  assert ours.token_to_idx == theirs.token_to_idx
  assert ours.token_freqs == theirs.token_freqs
  assert len(ours) == len(theirs) and ours.unk == theirs.unk
  probe = ["a", "zzz", "<pad>", "t", " "]
  assert ours[probe] == theirs[probe] and ours[tuple(probe)] == theirs[tuple(probe)]
  indices = list(range(len(theirs)))
  assert ours.to_tokens(indices) == theirs.to_tokens(indices)


def test_tokenize_splits_words_or_chars_like_d2l_and_refuses_other_kinds():
  lines = ["the time  machine", "", "by h g wells"]
  assert data.tokenize(lines, "word") == [["the", "time", "machine"], [], ["by", "h", "g", "wells"]]
  assert data.tokenize(lines, "char") == [list("the time  machine"), [], list("by h g wells")]
  assert data.tokenize(lines) == data.tokenize(lines, "char")
  for token in ("word", "char"):
    assert data.tokenize(lines, token) == d2l.tokenize(lines, token)
  with pytest.raises(DataError):
    data.tokenize(lines, "byte")


def test_load_corpus_cleans_like_d2l_by_default_and_keeps_the_text_with_clean_none(tmp_path):
  text = "Hello, World!\nIt's 1895.\n"
  path = tmp_path / "tiny.txt"
  path.write_text(text, encoding="utf-8")

  corpus, vocab = data.load_corpus(path, clean="none")
  assert corpus.dtype == np.int32
  assert "".join(vocab.to_tokens(corpus.tolist())) == text  # Case, punctuation, newlines kept.
  for token in ("H", "W", ",", "!", "'", "1", "\n"):
    assert token in vocab.token_to_idx

  corpus, vocab = data.load_corpus(path)  # clean="d2l"
  assert "".join(vocab.to_tokens(corpus.tolist())) == "hello worldit s"
  assert set(vocab.idx_to_token) == {"<unk>"} | set("hello worldit s")

  corpus, vocab = data.load_corpus(path, token="word")
  assert vocab.to_tokens(corpus.tolist()) == ["hello", "world", "it", "s"]

  corpus, _ = data.load_corpus(path, clean="none", max_tokens=5)
  assert len(corpus) == 5
  with pytest.raises(UsageError, match="unknown cleaning"):
    data.load_corpus(path, clean="strip")


# --------------------------------------------------------------------------------------------
# Finding, downloading and reading corpus files.


@pytest.fixture
def offline(monkeypatch):
  """No network: ``urlopen`` raises ``OSError`` and records what was asked for."""
  calls = []

  def urlopen(url, *args, **kwargs):
    calls.append(url)
    raise OSError("network is unreachable")

  monkeypatch.setattr(urllib.request, "urlopen", urlopen)
  return calls


def files_in(directory: Path) -> list[Path]:
  return sorted(directory.iterdir()) if directory.exists() else []


def test_the_known_corpora_are_the_published_files_and_the_variable_is_deeprnn_jax_data():
  assert corpora.DATA_ENV == "DEEPRNN_JAX_DATA"
  table = {name: (d.name, d.url, d.sha1, d.size) for name, d in corpora.DATASETS.items()}
  assert table == {
      "timemachine.txt": (
          "timemachine.txt",
          "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt",
          "090b5e7e70c295757f55df93cb0a180b9691891a",
          178979,
      ),
      "tinyshakespeare.txt": (
          "tinyshakespeare.txt",
          "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"
          "input.txt",
          "04486597058d11dcc2c556b1d0433891eb639d2e",
          1115394,
      ),
  }
  assert (TM_URL, TM_SHA1, TM_BYTES) == table[TM][1:]


def test_the_time_machine_file_has_the_published_sha1_and_size(time_machine_path):
  payload = time_machine_path.read_bytes()
  assert len(payload) == TM_BYTES
  assert hashlib.sha1(payload).hexdigest() == TM_SHA1


def test_corpus_resolution_prefers_a_path_then_the_env_folder_then_data_dir(
    tmp_path, monkeypatch, offline):
  env_dir, work = tmp_path / "env", tmp_path / "work"
  (work / "data").mkdir(parents=True)
  env_dir.mkdir()
  (env_dir / TM).write_text("From the environment.\n")
  (work / "data" / TM).write_text("From data under the working directory.\n")
  explicit = tmp_path / "my corpus.txt"
  explicit.write_text("Explicit.\n")
  monkeypatch.chdir(work)

  # 1. An explicit path wins over everything.
  monkeypatch.setenv(DATA_ENV, str(env_dir))
  assert data.resolve_corpus(explicit) == explicit
  assert data.resolve_corpus(str(explicit)) == explicit
  # 2. Then $DEEPRNN_JAX_DATA, before data/.
  assert data.resolve_corpus(TM).resolve() == (env_dir / TM).resolve()
  corpus, vocab = data.load_corpus(TM)
  assert "".join(vocab.to_tokens(corpus.tolist())) == "from the environment"
  # 3. Then data/ under the working directory: without the variable, or when it lacks the file.
  monkeypatch.setenv(DATA_ENV, str(tmp_path / "nowhere"))
  assert data.resolve_corpus(TM).resolve() == (work / "data" / TM).resolve()
  monkeypatch.delenv(DATA_ENV)
  assert data.resolve_corpus(TM).resolve() == (work / "data" / TM).resolve()
  corpus, vocab = data.load_corpus(TM)
  assert "".join(vocab.to_tokens(corpus.tolist())) == \
      "from data under the working directory"
  assert offline == []  # Nothing was downloaded.


def test_a_corpus_found_nowhere_offline_fails_naming_every_way_to_provide_it(
    tmp_path, monkeypatch, offline):
  monkeypatch.chdir(tmp_path)
  monkeypatch.delenv(DATA_ENV, raising=False)
  with pytest.raises(DataError) as info:
    data.resolve_corpus(TM)
  message = str(info.value)
  # One clear error naming the three ways: a path, the variable, data/.
  assert "path" in message
  assert "$DEEPRNN_JAX_DATA/timemachine.txt" in message
  assert "data/timemachine.txt" in message
  assert TM_URL in message and TM_SHA1 in message
  assert offline == [TM_URL]
  assert not (tmp_path / "data" / TM).exists()
  assert files_in(tmp_path / "data") == []

  for load in (data.load_corpus_time_machine, data.read_time_machine,
               lambda: data.load_data_time_machine(2, 3)):
    with pytest.raises(DataError):
      load()
  # download=False does not even try.
  with pytest.raises(DataError) as info:
    data.resolve_corpus(TM, download=False)
  message = str(info.value)
  assert "$DEEPRNN_JAX_DATA/timemachine.txt" in message and "data/timemachine.txt" in message
  assert len(offline) == 4
  # An unknown name is not downloaded either.
  with pytest.raises(DataError):
    data.resolve_corpus("not_a_corpus.txt")
  assert len(offline) == 4


def test_a_download_with_the_wrong_sha1_is_refused_and_leaves_no_file(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.delenv(DATA_ENV, raising=False)
  monkeypatch.setattr(urllib.request, "urlopen",
                      lambda url, *a, **k: io.BytesIO(b"The Time Machine, abridged.\n"))
  with pytest.raises(DataError) as info:
    data.resolve_corpus(TM)
  message = str(info.value)
  assert "SHA-1" in message and TM_SHA1 in message
  # The other ways.
  assert "$DEEPRNN_JAX_DATA/timemachine.txt" in message and "data/timemachine.txt" in message
  assert files_in(tmp_path / "data") == []  # Nothing left behind, not even a temporary file.


def test_a_verified_download_lands_in_data_dir_and_is_not_fetched_again(
    tmp_path, monkeypatch, time_machine_path):
  payload = time_machine_path.read_bytes()
  calls = []

  def urlopen(url, *args, **kwargs):
    calls.append(url)
    return io.BytesIO(payload)

  monkeypatch.chdir(tmp_path)
  monkeypatch.delenv(DATA_ENV, raising=False)
  monkeypatch.setattr(urllib.request, "urlopen", urlopen)
  path = data.resolve_corpus(TM)
  assert path.resolve() == (tmp_path / "data" / TM).resolve()
  assert (tmp_path / "data" / TM).read_bytes() == payload
  assert files_in(tmp_path / "data") == [tmp_path / "data" / TM]
  assert calls == [TM_URL]
  # Now it is found locally: no second download, and it is the corpus.
  corpus, vocab = data.load_corpus_time_machine()
  assert calls == [TM_URL]
  assert len(corpus) == 170_580 and len(vocab) == 28


def test_missing_empty_cleaned_away_or_non_utf8_corpora_fail_naming_the_file(tmp_path):
  missing = tmp_path / "missing.txt"
  with pytest.raises(DataError) as info:
    data.load_corpus(missing)
  assert str(missing) in str(info.value)
  with pytest.raises(DataError):
    data.read_text(missing)
  with pytest.raises(DataError):
    data.read_text(tmp_path)  # A directory.

  empty = tmp_path / "empty.txt"
  empty.write_bytes(b"")
  with pytest.raises(DataError) as info:
    data.load_corpus(empty)
  assert "empty" in str(info.value)

  nothing = tmp_path / "digits.txt"
  nothing.write_text("123 !!\n\n42\n")
  with pytest.raises(DataError) as info:
    data.load_corpus(nothing)
  assert str(nothing) in str(info.value)
  assert "cleaning" in str(info.value)
  assert len(data.load_corpus(nothing, clean="none")[0]) == len("123 !!\n\n42\n")

  binary = tmp_path / "latin1.txt"
  binary.write_bytes(b"caf\xe9 au lait\n")  # Latin-1, not UTF-8: bad byte at offset 3.
  for read in (data.read_text, data.load_corpus):
    with pytest.raises(DataError) as info:
      read(binary)
    message = str(info.value)
    assert str(binary) in message
    assert mentions(message, 3) and "offset" in message


def test_data_error_is_usage_and_value_error():
  assert issubclass(DataError, UsageError) and issubclass(DataError, ValueError)


# --------------------------------------------------------------------------------------------
# Iterators.


def test_sequential_equals_d2l():
  n, batch_size, num_steps = 103, 3, 5
  corpus = np.arange(n, dtype=np.int32)
  offsets = set()
  for seed in range(40):
    Xs, Ys = data.sequential_epoch(corpus, batch_size, num_steps, seed)
    offset = int(Xs[0, 0, 0])  # Token i of arange is at position i.
    offsets.add(offset)
    assert 0 <= offset <= num_steps
    want_X, want_Y = stack(d2l.seq_data_iter_sequential(list(corpus), batch_size, num_steps,
                                                         offset))
    np.testing.assert_array_equal(Xs, want_X)
    np.testing.assert_array_equal(Ys, want_Y)
    got = list(data.seq_data_iter_sequential(corpus, batch_size, num_steps, seed))
    np.testing.assert_array_equal(stack(got)[0], want_X)
    np.testing.assert_array_equal(stack(got)[1], want_Y)
  assert offsets == set(range(num_steps + 1))  # d2l's randint(0, num_steps), both ends.


def test_sequential_equals_d2l_on_real_corpus(time_machine_corpus):
  corpus = time_machine_corpus[0][:5000]
  batch_size, num_steps = 4, 7
  for seed in range(3):
    Xs, Ys = data.sequential_epoch(corpus, batch_size, num_steps, seed)
    matches = [offset for offset in range(num_steps + 1)
               if np.array_equal(stack(d2l.seq_data_iter_sequential(
                   list(corpus), batch_size, num_steps, offset))[0], Xs)]
    assert matches
    want_Y = stack(d2l.seq_data_iter_sequential(list(corpus), batch_size, num_steps,
                                                matches[0]))[1]
    np.testing.assert_array_equal(Ys, want_Y)


def test_random_equals_d2l():
  batch_size, num_steps = 3, 4
  for n in (61, 64, 100):
    corpus = np.arange(n, dtype=np.int32)
    for seed in range(20):
      Xs, Ys = data.random_epoch(corpus, batch_size, num_steps, seed)
      offset = int(Xs[0, 0, 0]) % num_steps
      used = [int(j) - offset for j in Xs[:, :, 0].ravel()]

      def shuffle(indices):  # The order the implementation drew, unused ones after.
        assert set(used) <= set(indices) and len(set(used)) == len(used)
        indices[:] = used + [j for j in indices if j not in set(used)]

      want_X, want_Y = stack(d2l.seq_data_iter_random(list(corpus), batch_size, num_steps,
                                                      offset, shuffle))
      np.testing.assert_array_equal(Xs, want_X)
      np.testing.assert_array_equal(Ys, want_Y)
      got = stack(data.seq_data_iter_random(corpus, batch_size, num_steps, seed))
      np.testing.assert_array_equal(got[0], want_X)
      np.testing.assert_array_equal(got[1], want_Y)


def test_random_offsets_and_full_coverage():
  """With n = steps*(k+1) and k a multiple of the batch size, every offset in [0, steps) leaves
  exactly k subsequences and all are used: each visited exactly once, the offset visible."""
  batch_size, num_steps, k = 3, 5, 6
  n = num_steps * (k + 1)
  corpus = np.arange(n, dtype=np.int32)
  offsets, orders = set(), set()
  for seed in range(60):
    Xs, _ = data.random_epoch(corpus, batch_size, num_steps, seed)
    starts = Xs[:, :, 0].ravel()
    offset = int(starts.min())
    offsets.add(offset)
    assert sorted(starts.tolist()) == list(range(offset, offset + k * num_steps, num_steps))
    orders.add(tuple(starts.tolist()))
  assert offsets == set(range(num_steps))  # d2l's randint(0, num_steps - 1).
  assert len(orders) > 30  # Shuffled, not in one order.


def test_shift_and_continuity_on_time_machine(time_machine_corpus):
  corpus = time_machine_corpus[0][:3000]
  batches = list(data.seq_data_iter_sequential(corpus, 4, 10, seed=1))
  assert len(batches) > 2
  for X, Y in batches:
    assert X.shape == Y.shape == (4, 10) and X.dtype == Y.dtype == np.int32
    np.testing.assert_array_equal(Y[:, :-1], X[:, 1:])
  for (_, Y0), (X1, _) in zip(batches, batches[1:]):
    np.testing.assert_array_equal(X1[:, 0], Y0[:, -1])
  for X, Y in data.seq_data_iter_random(corpus, 4, 10, seed=1):
    np.testing.assert_array_equal(Y[:, :-1], X[:, 1:])


@pytest.mark.parametrize("fn", [data.sequential_epoch, data.random_epoch])
def test_epochs_are_int32_arrays_that_a_seed_or_generator_reproduces(fn):
  corpus = np.random.default_rng(0).integers(0, 28, 500).astype(np.int32)
  Xs, Ys = fn(corpus, 4, 6, seed=7)
  assert Xs.dtype == Ys.dtype == np.int32
  assert Xs.ndim == 3 and Xs.shape == Ys.shape and Xs.shape[1:] == (4, 6)
  # Same seed, same epoch; a Generator seed is used as is.
  np.testing.assert_array_equal(fn(corpus, 4, 6, seed=7)[0], Xs)
  np.testing.assert_array_equal(fn(corpus, 4, 6, np.random.default_rng(7))[0], Xs)
  assert any(not np.array_equal(fn(corpus, 4, 6, seed=s)[0], Xs) for s in range(8, 12))


@pytest.mark.parametrize("use_random_iter", [False, True])
def test_loader_draws_a_new_offset_each_epoch_and_its_rng_state_replays_the_next(use_random_iter):
  n, batch_size, num_steps = 400, 3, 5
  positions_corpus = np.arange(n, dtype=np.int32)
  loader = data.SeqDataLoader(positions_corpus, batch_size, num_steps, use_random_iter, seed=3)
  epochs = [loader.epoch() for _ in range(30)]
  # A new offset every epoch, drawn anew: over many epochs, many offsets.
  offsets = [int(Xs[:, :, 0].min()) % num_steps if use_random_iter else int(Xs[0, 0, 0])
             for Xs, _ in epochs]
  assert len(set(offsets)) > 2
  assert any(not np.array_equal(a[0], b[0]) for a, b in zip(epochs, epochs[1:]))
  # Same seed, same epochs.
  again = data.SeqDataLoader(positions_corpus, batch_size, num_steps, use_random_iter, seed=3)
  for Xs, Ys in epochs[:5]:
    X2, Y2 = again.epoch()
    np.testing.assert_array_equal(X2, Xs)
    np.testing.assert_array_equal(Y2, Ys)

  # rng_state saved and restored (even into another loader) reproduces the next epoch.
  state = loader.rng_state
  next_X, next_Y = loader.epoch()
  loader.epoch()
  loader.rng_state = state
  np.testing.assert_array_equal(loader.epoch()[0], next_X)
  other = data.SeqDataLoader(positions_corpus, batch_size, num_steps, use_random_iter, seed=99)
  other.rng_state = state
  iterated = stack(list(other))  # Iterating is one epoch, minibatch by minibatch.
  np.testing.assert_array_equal(iterated[0], next_X)
  np.testing.assert_array_equal(iterated[1], next_Y)


@pytest.mark.parametrize("use_random_iter", [False, True])
def test_load_data_time_machine_gives_shifted_32x35_minibatches_of_the_first_10000_tokens(
    use_random_iter, time_machine_corpus):
  loader, vocab = data.load_data_time_machine(32, 35, use_random_iter=use_random_iter)
  assert isinstance(loader, data.SeqDataLoader) and isinstance(vocab, data.Vocab)
  assert len(vocab) == 28
  np.testing.assert_array_equal(loader.corpus, time_machine_corpus[0][:10000])
  batches = list(loader)
  assert len(batches) > 0
  for X, Y in batches:
    assert X.shape == Y.shape == (32, 35) and X.dtype == np.int32
    np.testing.assert_array_equal(Y[:, :-1], X[:, 1:])
    assert X.min() >= 0 and X.max() < len(vocab)
  full, _ = data.load_data_time_machine(2, 5, use_random_iter, max_tokens=-1)
  assert len(full.corpus) == 170_580


def test_split_corpus_holds_out_the_last_fraction_and_refuses_fractions_outside_0_1():
  corpus = np.arange(100, dtype=np.int32)
  train, valid = data.split_corpus(corpus, 0.1)
  np.testing.assert_array_equal(train, np.arange(90))
  np.testing.assert_array_equal(valid, np.arange(90, 100))
  for fraction in (0.0, 0.3, 0.57, 0.99):
    train, valid = data.split_corpus(corpus, fraction)
    np.testing.assert_array_equal(np.concatenate([train, valid]), corpus)
    assert abs(len(valid) - fraction * len(corpus)) <= 0.5
    if len(valid):
      np.testing.assert_array_equal(valid, corpus[-len(valid):])
  assert len(data.split_corpus(corpus, 0.0)[1]) == 0
  for fraction in (1.0, -0.1, 1.5):
    with pytest.raises(UsageError, match="valid fraction"):
      data.split_corpus(corpus, fraction)


# Batch 4, 6 steps. Sequential: at d2l's largest offset, 6, each of the 4 rows holds
# (n - 6 - 1) // 4 tokens and needs 6: n >= 4 * 6 + 6 + 1 = 31. Random: at the largest offset, 5,
# there are (n - 5 - 1) // 6 subsequences and a minibatch needs 4: n >= 4 * 6 + 6 = 30.
@pytest.mark.parametrize("use_random_iter,fn,it,need", [
    (False, data.sequential_epoch, data.seq_data_iter_sequential, 31),
    (True, data.random_epoch, data.seq_data_iter_random, 30),
], ids=["sequential", "random"])
def test_a_corpus_one_token_short_of_a_minibatch_at_every_offset_is_refused_naming_the_minimum(
    use_random_iter, fn, it, need):
  batch_size, num_steps = 4, 6
  # The minimum is d2l's own: its iterator gives a minibatch at every offset from `need` tokens,
  # and none at some offset from one fewer.
  offsets = reference_offsets(num_steps, use_random_iter)
  assert all(reference_batches(need, batch_size, num_steps, o, use_random_iter) >= 1
             for o in offsets)
  assert any(reference_batches(need - 1, batch_size, num_steps, o, use_random_iter) == 0
             for o in offsets)
  assert data.min_corpus_tokens(batch_size, num_steps, use_random_iter) == need

  short = np.zeros(need - 1, np.int32)
  for call in (lambda: fn(short, batch_size, num_steps, 0),
               lambda: list(it(short, batch_size, num_steps, 0)),
               lambda: data.SeqDataLoader(short, batch_size, num_steps, use_random_iter)):
    with pytest.raises(ValueError) as info:
      call()
    assert isinstance(info.value, DataError)
    assert mentions(str(info.value), need), str(info.value)
  # Exactly enough is enough, whatever the offset.
  for seed in range(10):
    assert len(fn(np.zeros(need, np.int32), batch_size, num_steps, seed)[0]) >= 1


# Batch 32, 35 steps. Sequential: at d2l's largest offset, 35, each of the 32 rows holds
# (n - 35 - 1) // 32 tokens and needs 35: n >= 32 * 35 + 35 + 1 = 1156. Random: at offset 34,
# (n - 34 - 1) // 35 subsequences must fill a minibatch of 32: n >= 32 * 35 + 35 = 1155.
@pytest.mark.parametrize("use_random_iter,need", [(False, 1156), (True, 1155)],
                         ids=["sequential", "random"])
def test_the_time_machine_cut_below_the_minimum_for_batch_32_and_35_steps_is_refused(
    use_random_iter, need, time_machine_path):
  offsets = reference_offsets(35, use_random_iter)
  assert all(reference_batches(need, 32, 35, o, use_random_iter) >= 1 for o in offsets)
  assert any(reference_batches(need - 1, 32, 35, o, use_random_iter) == 0 for o in offsets)

  for max_tokens in (100, need - 1):
    with pytest.raises(DataError) as info:
      data.load_data_time_machine(32, 35, use_random_iter, max_tokens=max_tokens)
    assert mentions(str(info.value), need), str(info.value)
  loader, _ = data.load_data_time_machine(32, 35, use_random_iter, max_tokens=need)
  assert len(loader.corpus) == need


# --------------------------------------------------------------------------------------------
# Property tests.


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 150), batch_size=st.integers(1, 6), num_steps=st.integers(1, 8),
       vocab_size=st.integers(1, 30), seed=st.integers(0, 2**32 - 1),
       use_random_iter=st.booleans())
def test_epochs_are_shifted_windows_of_the_corpus_and_refuse_corpora_too_short_for_one(
    n, batch_size, num_steps, vocab_size, seed, use_random_iter):
  fn = data.random_epoch if use_random_iter else data.sequential_epoch
  corpus = np.random.default_rng(seed).integers(0, vocab_size, n).astype(np.int32)
  need = data.min_corpus_tokens(batch_size, num_steps, use_random_iter)
  offsets = reference_offsets(num_steps, use_random_iter)
  # min_corpus_tokens is exactly the length at which d2l's own iterator gives a minibatch at
  # every offset: it does from `need` tokens, and from `need - 1` it gives none at some offset.
  assert all(reference_batches(need, batch_size, num_steps, o, use_random_iter) >= 1
             for o in offsets)
  assert any(reference_batches(need - 1, batch_size, num_steps, o, use_random_iter) == 0
             for o in offsets)
  worst = min(reference_batches(n, batch_size, num_steps, o, use_random_iter) for o in offsets)
  assert (worst >= 1) == (n >= need)

  if n < need:
    with pytest.raises(DataError) as info:
      fn(corpus, batch_size, num_steps, seed)
    assert mentions(str(info.value), need)
    return

  Xs, Ys = fn(corpus, batch_size, num_steps, seed)
  Px, Py = positions(fn, n, batch_size, num_steps, seed)
  num_batches = Xs.shape[0]
  assert Xs.dtype == Ys.dtype == np.int32
  assert Xs.shape == Ys.shape == Px.shape == (num_batches, batch_size, num_steps)
  assert num_batches >= 1
  # No index out of range: tokens are the corpus's, positions inside it.
  assert Xs.min() >= 0 and Xs.max() < vocab_size and Ys.min() >= 0 and Ys.max() < vocab_size
  assert Px.min() >= 0 and Py.max() <= n - 1
  np.testing.assert_array_equal(Xs, corpus[Px])
  np.testing.assert_array_equal(Ys, corpus[Py])
  # Y is X shifted by one; each row of a minibatch is a contiguous window.
  np.testing.assert_array_equal(Py, Px + 1)
  np.testing.assert_array_equal(Px, Px[..., :1] + np.arange(num_steps))

  if use_random_iter:
    starts = Px[:, :, 0].ravel()
    offset = int(starts.min()) % num_steps
    assert len(set(starts.tolist())) == num_batches * batch_size  # Each at most once.
    assert np.all((starts - offset) % num_steps == 0)  # Non-overlapping, on one grid.
    assert num_batches == reference_batches(n, batch_size, num_steps, offset, True)
  else:
    offset = int(Px[0, 0, 0])
    assert 0 <= offset <= num_steps
    # Minibatch i + 1 continues every row of minibatch i.
    np.testing.assert_array_equal(Px[1:, :, 0], Px[:-1, :, -1] + 1)
    np.testing.assert_array_equal(Xs[1:, :, 0], Ys[:-1, :, -1])
    # Rows are consecutive chunks of the corpus.
    row_len = (n - offset - 1) // batch_size
    np.testing.assert_array_equal(Px[0, :, 0], offset + row_len * np.arange(batch_size))
    assert num_batches == reference_batches(n, batch_size, num_steps, offset, False)


@pytest.mark.parametrize("use_random_iter", [False, True])
@pytest.mark.parametrize("n,batch,steps", [(10000, 32, 35), (2000, 16, 20), (1333, 8, 64),
                                           (900, 4, 7), (301, 3, 5)])
def test_epoch_shapes_are_exactly_the_shapes_epochs_take(n, batch, steps, use_random_iter):
  corpus = np.random.default_rng(0).integers(0, 28, n)
  loader = data.SeqDataLoader(corpus, batch, steps, use_random_iter, seed=1)
  seen = {loader.epoch()[0].shape for _ in range(40 * steps)}  # every offset, almost surely
  assert seen == set(loader.epoch_shapes())
  assert loader.max_batches == max(shape[0] for shape in seen)
