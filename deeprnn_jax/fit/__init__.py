"""Fitting a model to token arrays: the optimiser, the jitted step and epoch, evaluation
(``training``), epochs dispatched ahead of the host (``dispatch``) and the batch split over
devices (``parallel``)."""
