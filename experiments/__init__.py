"""Training programs built on jlstm: ``python -m experiments.mnist``, ``experiments.regression``."""
