"""Evaluation: what ``distill eval`` and the training run's periodic evaluation report.

* :mod:`distill.evaluation.metrics`: held-out loss, perplexity, bits per byte, calibration, the distance to a
  teacher (whatever its kind can estimate), each model as a speculative draft.
* :mod:`distill.evaluation.harness`: downstream tasks through lm-evaluation-harness (the ``lm-eval`` extra).
* :mod:`distill.evaluation.tables`: ``distill eval``'s results as markdown.
"""
