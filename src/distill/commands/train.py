"""``distill train``: a student from a teacher (token-level KD), or from data alone when there is no teacher.

    distill train configs/tiny/train.yaml out_dir=runs/tiny            # tiny CPU run, < 1 minute
    distill train my.yaml loss.divergence=jsd loss.beta=0.9 --resume   # continue the latest checkpoint
    accelerate launch --multi_gpu --num_processes 2 -m distill train my.yaml   # data parallel (CPU too: gloo)

The run itself (the loop, its batch sources, evaluation, checkpoints, what it writes) is
:mod:`distill.training`, which other commands (``distill quickstart``) run as well.
"""

from __future__ import annotations

from distill import training
from distill.config import TrainConfig


def main(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train ``cfg`` (``resume``: from its latest checkpoint); returns the run's summary
    (:func:`distill.training.train`)."""
    return training.train(cfg, resume=resume)
