"""The text a model reads: corpus files, the vocabulary, d2l's cleaning and partitioning
(``data``), d2l 1.0's windows, and the two editions (``editions``), which alone join the text to
the model and fit layers (how each book scores and loads PyTorch weights)."""
