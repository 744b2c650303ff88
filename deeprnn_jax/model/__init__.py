"""The model, with no knowledge of where its tokens come from: the cell equations (``cells``),
the fast recurrence and cuDNN, ``RNNLM``, generation and PyTorch weight conversion."""
