"""deeprnn-jax: d2l's deep recurrent neural networks chapter in JAX and Flax."""

__version__ = "0.1.0"
