"""A training run as a user starts it: the run loop (``runs``) and several models in one program
(``sweeps``), what each epoch shows and records, the run folder, checkpoints, plots, signals and
several processes."""
