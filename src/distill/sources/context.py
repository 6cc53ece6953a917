"""What a batch source sees of the training run: :class:`SourceContext` (the training run builds it) and the
data order, a step's dataset rows as a pure function of (seed, step)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from distill.config import LossConfig


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def example_indices(step: int, micro: int, rank: int, world: int, batch_size: int, grad_accum: int, seed: int,
                    n: int) -> list[int]:
    """Dataset rows of one micro-batch: step ``s`` uses global examples ``[s*G, (s+1)*G)`` of a per-epoch
    permutation of the ``n`` rows, ``G = batch_size * grad_accum * world``. A pure function of the step, so
    resume needs no iterator, and 1 process with ``grad_accum=2`` sees the batches of 2 processes with 1."""
    global_batch = batch_size * grad_accum * world
    start = step * global_batch + (micro * world + rank) * batch_size
    out = []
    for k in range(start, start + batch_size):
        epoch, offset = divmod(k, n)
        out.append(_epoch_permutation(n, seed, epoch)[offset])
    return out


@dataclass(frozen=True)
class TeacherView:
    """The teacher as a batch source sees it: what it can do, never its signal (the loss asks for that)."""

    scores_any_text: bool  # it scores text that is no dataset example (the student's completions)
    max_positions: int | None  # the longest sequence it scores (None: no known limit)
    corrector: Callable[[float], Any] | None  # speculative KD: corrector(temperature), the teacher's side

    @classmethod
    def of(cls, teacher) -> TeacherView | None:
        if teacher is None:
            return None
        return cls(teacher.scores_any_text, teacher.max_positions, teacher.corrector)


@dataclass(frozen=True)
class SourceContext:
    """Everything a batch source may use (the training run builds it after the data)."""

    student: torch.nn.Module  # the student itself (unwrapped from accelerate's wrapper): its current weights
    tokenizer: Any  # the student's (bos / eos ids)
    pad_id: int
    teacher: TeacherView | None
    loss: LossConfig  # the loss a step is trained with
    train_ds: Any  # the training split, rows of {input_ids, labels}
    collate: Callable[[Any, list[int], str], dict]  # (dataset, rows, split) -> a batch on the device
    seq_len: int  # data.seq_len: the longest example
    seed: int  # train.seed
    max_steps: int
    batch_size: int  # examples per micro-batch per process
    grad_accum: int  # micro-batches per step per process
    rank: int  # this process among `world`
    world: int
    device: torch.device
    out_dir: str  # the run's directory (a sampling server's published weights go under it)

    def indices(self, step: int, micro: int) -> list[int]:
        """The dataset rows of micro-batch ``micro`` of ``step`` on this process (:func:`example_indices`)."""
        return example_indices(step, micro, self.rank, self.world, self.batch_size, self.grad_accum, self.seed,
                               len(self.train_ds))

    def dataset_batch(self, step: int, micro: int) -> dict:
        """Micro-batch ``micro`` of ``step`` from the dataset: its rows, with ``index`` and ``split`` (a cached
        teacher finds its targets by them)."""
        return self.collate(self.train_ds, self.indices(step, micro), "train")
