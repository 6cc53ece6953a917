"""Batch sources: where a training step's micro-batches come from (``train.batches``), one module each.

* ``dataset`` (:mod:`~distill.sources.dataset`): the data section's examples, in an order that is a function of
  (seed, step).
* ``gkd``, ``skd``, ``distillm`` (:mod:`~distill.sources.gkd`, :mod:`~distill.sources.skd`,
  :mod:`~distill.sources.distillm`): completions the student writes for the examples' prompts, what they share
  in :mod:`~distill.sources.onpolicy`.

A source sees the run through a :class:`~distill.sources.context.SourceContext` (the student, the tokenizer,
the teacher's capabilities, the training split, the data order, the process), never the training run itself;
its methods are :class:`~distill.sources.dataset.DatasetSource`'s. Its settings are its section of
``train.batches`` (``config.py``: ``BatchesSpec``). Adding a source: a module here and its line in
:data:`SOURCES`; one with settings of its own also has its section in ``config.py``.
"""

from __future__ import annotations

from distill.config import Section
from distill.errors import ConfigError
from distill.sources.context import SourceContext, TeacherView, example_indices
from distill.sources.dataset import DatasetSource
from distill.sources.distillm import DistillmSource
from distill.sources.gkd import GkdSource
from distill.sources.skd import SkdSource

__all__ = ["SOURCES", "SourceContext", "TeacherView", "example_indices", "source_type"]

# train.batches.source -> the source.
SOURCES: dict[str, type] = {
    "dataset": DatasetSource,
    "gkd": GkdSource,
    "skd": SkdSource,
    "distillm": DistillmSource,
}


def source_type(settings: Section) -> type:
    """The source that ``train.batches`` names; a name that is not in :data:`SOURCES` is refused."""
    if settings.source not in SOURCES:
        raise ConfigError(f"train.batches.source={settings.source!r} is not a batch source: give one of "
                          f"{', '.join(SOURCES)}")
    return SOURCES[settings.source]
