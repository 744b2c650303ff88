"""Exercise 1: a 2-layer RNN language model from scratch, in jax.numpy, lax.scan and jax.grad.

No Flax and no Optax: the parameters are a dict, the chapter's equations

    H_t^(1) = tanh(X_t W_xh^(1) + H_{t-1}^(1) W_hh^(1) + b_h^(1))
    H_t^(l) = tanh(H_t^(l-1) W_xh^(l) + H_{t-1}^(l) W_hh^(l) + b_h^(l))
    O_t     = H_t^(L) W_hq + b_q

run under ``lax.scan`` over time, the loss is written out, ``jax.grad`` differentiates it, and a
hand-written step clips the gradients to global norm θ and applies SGD. Before training, the
script loads the weights of the library's ``RNNLM(impl="scan")`` into the dict and checks equal
logits, equal gradients and an equal update step; then it trains on The Time Machine and prints
d2l's lines.

  python experiments/ex1_scratch.py --quick      # the checks, and 20 epochs of a small model
  python experiments/ex1_scratch.py              # the checks, 500 epochs of a 2x256 RNN: 3-4 min
"""

from __future__ import annotations

import time

import _common
import jax
import jax.numpy as jnp

from deeprnn_jax.base.errors import UsageError
from deeprnn_jax.fit import training
from deeprnn_jax.model.models import RNNLM
from deeprnn_jax.text import data

# ---------------------------------------------------------------------------------------------
# The model: parameters, forward pass, loss.


def init_params(key, vocab_size: int, num_hiddens: int, num_layers: int) -> dict:
  """``{"layers": [{W_xh, W_hh, b_h}] * L, "W_hq", "b_q"}``, all ``U(±1/√num_hiddens)``."""
  bound = num_hiddens**-0.5
  u = lambda k, shape: jax.random.uniform(k, shape, jnp.float32, -bound, bound)
  keys = iter(jax.random.split(key, 3 * num_layers + 2))
  layers = [{"W_xh": u(next(keys), (vocab_size if l == 0 else num_hiddens, num_hiddens)),
             "W_hh": u(next(keys), (num_hiddens, num_hiddens)),
             "b_h": u(next(keys), (num_hiddens,))} for l in range(num_layers)]
  return {"layers": layers, "W_hq": u(next(keys), (num_hiddens, vocab_size)),
          "b_q": u(next(keys), (vocab_size,))}


def forward(params: dict, X, H):
  """``X <int32>[batch, steps]``, ``H <float32>[L, batch, hiddens]`` ->
  ``(logits <float32>[batch, steps, vocab], H <float32>[L, batch, hiddens])``."""
  vocab_size = params["W_hq"].shape[1]
  inputs = jax.nn.one_hot(X.T, vocab_size)  # <float32>[steps, batch, vocab]: time first

  def step(H, x):  # one time step through all L layers
    new_H = []
    for l, p in enumerate(params["layers"]):
      x = jnp.tanh(x @ p["W_xh"] + H[l] @ p["W_hh"] + p["b_h"])  # H_t^(l)
      new_H.append(x)
    return jnp.stack(new_H), x

  H, outputs = jax.lax.scan(step, H, inputs)  # outputs <float32>[steps, batch, hiddens]
  logits = outputs @ params["W_hq"] + params["b_q"]
  return jnp.swapaxes(logits, 0, 1), H


def loss_fn(params: dict, X, Y, H):
  """Mean cross-entropy per token, and the state after the minibatch."""
  logits, H = forward(params, X, H)
  log_p = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(log_p, Y[..., None], axis=-1).mean(), H


def sgd_clipped(params: dict, grads: dict, lr: float, theta: float) -> dict:
  """d2l's ``grad_clipping`` then ``sgd``: g <- min(1, θ / ||g||) g; p <- p - lr g."""
  norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(grads)))
  scale = jnp.minimum(1.0, theta / norm)
  return jax.tree_util.tree_map(lambda p, g: p - lr * scale * g, params, grads)


def make_epoch(lr: float, theta: float):
  """A jitted ``(params, Xs, Ys) -> (params, losses <float32>[num_batches])`` over
  ``Xs, Ys <int32>[num_batches, batch, steps]``, sequential partitioning: the state carries from
  one minibatch to the next, detached."""

  @jax.jit
  def epoch(params, Xs, Ys):
    L, hiddens = len(params["layers"]), params["W_hq"].shape[0]
    H0 = jnp.zeros((L, Xs.shape[1], hiddens), jnp.float32)

    def body(carry, batch):
      params, H = carry
      (loss, H), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *batch, H)
      return (sgd_clipped(params, grads, lr, theta), jax.lax.stop_gradient(H)), loss

    (params, _), losses = jax.lax.scan(body, (params, H0), (Xs, Ys))
    return params, losses

  return epoch


def predict(prefix: str, num_preds: int, params: dict, vocab) -> str:
  """d2l's ``predict_ch8``: warm the state up on the prefix, then feed back the argmax."""
  step = jax.jit(lambda params, x, H: forward(params, x.reshape(1, 1), H))
  H = jnp.zeros((len(params["layers"]), 1, params["W_hq"].shape[0]), jnp.float32)
  outputs = [vocab[prefix[0]]]
  for y in prefix[1:]:
    _, H = step(params, jnp.int32(outputs[-1]), H)
    outputs.append(vocab[y])
  for _ in range(num_preds):
    logits, H = step(params, jnp.int32(outputs[-1]), H)
    outputs.append(int(jnp.argmax(logits[0, -1])))
  return "".join(vocab.to_tokens(outputs))


# ---------------------------------------------------------------------------------------------
# The same weights in the library's model.


def from_flax(params: dict, num_layers: int) -> dict:
  """``RNNLM`` parameters -> this script's dict; the chapter's b_h is PyTorch's b_xh + b_hh."""
  layers = []
  for l in range(num_layers):
    p = params["rnn"][f"layer_{l}"]
    layers.append({"W_xh": p["W_xh"], "W_hh": p["W_hh"], "b_h": p["b_xh"] + p["b_hh"]})
  return {"layers": layers, "W_hq": params["W_hq"], "b_q": params["b_q"]}


def check_against_library(vocab_size: int, num_hiddens: int, num_layers: int, X, Y,
                          lr: float, theta: float, tol: float = 1e-5) -> list[str]:
  """Compares logits and gradients with ``RNNLM(impl="scan")`` on the same weights, and the
  hand-written clipped SGD step with ``training.make_optimizer``'s; returns the report lines and
  raises where one differs."""
  model = RNNLM(vocab_size, num_hiddens, num_layers, cell="rnn", impl="scan")
  optimizer = training.make_optimizer(lr, theta)
  ts = training.init_train_state(model, optimizer, jax.random.PRNGKey(1))
  mine = from_flax(ts.params, num_layers)
  H = model.begin_state(X.shape[0])

  logits_lib, _ = model.apply({"params": ts.params}, X)
  logits_mine, _ = forward(mine, X, H)
  lib_loss = lambda p: training.cross_entropy(model.apply({"params": p}, X)[0], Y)
  g_lib = from_flax(jax.grad(lib_loss)(ts.params), num_layers)
  g_mine = jax.grad(lambda p: loss_fn(p, X, Y, H)[0])(mine)
  # d/db_xh = d/db_hh = d/db_h, so the sum of the library's two bias gradients is twice ours.
  for layer in g_lib["layers"]:
    layer["b_h"] = layer["b_h"] / 2
  # The hand-written step against the library's optimiser (Optax's clip, then SGD) on our dict.
  updates, _ = optimizer.update(g_mine, optimizer.init(mine), mine)
  after_lib = jax.tree_util.tree_map(lambda p, u: p + u, mine, updates)
  after_mine = sgd_clipped(mine, g_mine, lr, theta)

  diff = lambda a, b: max(float(jnp.max(jnp.abs(x - y))) for x, y in
                          zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
  checks = [("logits", diff(logits_lib, logits_mine)), ("gradients", diff(g_lib, g_mine)),
            ("one clipped SGD step", diff(after_lib, after_mine))]
  lines = [f"check: {name} equal to the library's, max |difference| {d:.1e}"
           for name, d in checks]
  bad = [name for name, d in checks if not d <= tol]
  if bad:
    raise UsageError(f"from-scratch model differs from the library in {', '.join(bad)}: "
                     + "; ".join(lines))
  return lines


def main(argv=None) -> int:
  p = _common.parser(__doc__, seeds=False, run_folders=False)
  p.add_argument("--num-epochs", type=int, default=None, help="default 500 (quick: 20)")
  p.add_argument("--lr", type=float, default=1.0, help="SGD learning rate (default 1)")
  p.add_argument("--clip", type=float, default=1.0, help="gradient norm bound θ (default 1)")
  args = p.parse_args(argv)
  num_epochs = args.num_epochs or (20 if args.quick else 500)
  if num_epochs < 1 or not args.lr > 0 or not args.clip > 0:
    raise UsageError("--num-epochs, --lr and --clip must be positive")
  t0 = time.perf_counter()
  num_hiddens, num_layers = (32, 2) if args.quick else (256, 2)
  batch_size, num_steps = (8, 16) if args.quick else (32, 35)
  loader, vocab = data.load_data_time_machine(batch_size, num_steps,
                                              max_tokens=2000 if args.quick else 10_000)
  Xs, Ys = loader.epoch()
  checks = check_against_library(len(vocab), num_hiddens, num_layers, Xs[0], Ys[0],
                                 args.lr, args.clip)
  print("\n".join(checks))

  params = init_params(jax.random.PRNGKey(0), len(vocab), num_hiddens, num_layers)
  epoch = make_epoch(args.lr, args.clip)
  log, tokens, seconds = [], 0, 0.0
  for e in range(1, num_epochs + 1):
    Xs, Ys = loader.epoch()
    start = time.perf_counter()
    params, losses = epoch(params, Xs, Ys)
    ppl = training.perplexity(losses.mean())  # reading the losses waits for the epoch
    if e > 1:
      tokens, seconds = tokens + Xs.size, seconds + time.perf_counter() - start
    log.append((e, ppl))
    if e % 10 == 0 or e == num_epochs:
      print(f"epoch {e}, perplexity {ppl:.1f}: {predict('time traveller', 50, params, vocab)}",
            flush=True)
  speed = tokens / seconds if seconds else float("nan")
  final = [f"perplexity {ppl:.1f}, {speed:.1f} tokens/sec on cpu",
           predict("time traveller", 50, params, vocab), predict("traveller", 50, params, vocab)]
  print("\n".join(final))

  out = _common.results_path(args, "ex1_scratch")
  if out is not None:
    png = out.with_name(out.stem + ".png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(*zip(*log))
    ax.set(xlabel="epoch", ylabel="training perplexity", yscale="log",
           title=f"{num_layers}-layer RNN from scratch, {num_hiddens} hidden units")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    body = ("The model is the chapter's deep RNN (tanh, one-hot inputs, linear head) written in "
            "`jax.numpy` with `lax.scan` over time, trained by `jax.grad` and a hand-written "
            f"clipped SGD step (lr {args.lr:g}, θ {args.clip:g}), {num_layers}×{num_hiddens}, "
            f"batch {batch_size}×{num_steps}, sequential partitioning, the first 10,000 "
            f"characters of The Time Machine, {num_epochs} epochs.\n\n## Checks\n\n"
            + "\n".join(f"- {line}" for line in checks)
            + "\n\n## Training\n\nEvery 50th epoch's perplexity, then d2l's last lines:\n\n"
            + "```console\n"
            + "\n".join(f"epoch {e}, perplexity {p:.1f}" for e, p in log if e % 50 == 0)
            + "\n" + "\n".join(final) + f"\n```\n\n![curve]({png.name})\n")
    _common.write_results(out, "Exercise 1: a deep RNN from scratch", body,
                          time.perf_counter() - t0)
  return 0


if __name__ == "__main__":
  _common.main(main, "ex1_scratch")
