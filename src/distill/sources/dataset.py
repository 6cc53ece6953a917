"""``train.batches: dataset``: micro-batch ``m`` of this process is the data section's rows
:meth:`~distill.sources.context.SourceContext.indices` ``(step, m)``: the data order, a function of (seed, step).

:class:`DatasetSource` is also the shape of every batch source: the training run calls only what it has.
"""

from __future__ import annotations

from collections.abc import Callable

from distill.config import DatasetBatches
from distill.sources.context import SourceContext, TeacherView


class DatasetSource:
    """The dataset's examples. A batch source has these methods and the attribute ``baseline``; the training
    run calls them and nothing else:

    * ``check_teacher(settings, teacher)`` (static): before the data is read, refuse a teacher that cannot
      score the source's batches.
    * ``Source(settings, ctx)``: once, after the data (its checks of the run, its state at step 0).
    * ``batches(ctx, step)``: the step's micro-batches on this process, ``ctx.grad_accum`` of them, each a dict
      of ``input_ids``, ``labels`` (``IGNORE_INDEX`` where unsupervised) and ``attention_mask`` on the device
      (a dataset example also carries ``index`` and ``split``). A function of (seed, step) and of the state
      below, so a resumed run draws what an uninterrupted one does and every process makes the same choices.
    * ``baseline``: sampled_reverse_kl's running baseline (:class:`distill.sources.onpolicy.RunningBaseline`)
      when the source's batches can be the student's own samples, else None.
    * ``ahead``: True when ``batches(ctx, step)`` is a function of (seed, step) alone, the student playing no
      part: the run then forms the next step's batches while this one trains, so that a teacher with
      ``prefetch`` (a cache) prepares their signal meanwhile.
    * ``observe_eval(metrics)``: after each evaluation (``val_loss``, ...), the same on every process.
    * ``log_fields(step, steps, reduce)``: what the source adds to the train log for the ``steps`` steps up to
      ``step``; ``reduce(values)`` sums a list of floats over the processes (every process calls it alike).
    * ``state_dict()`` / ``load_state_dict(state)``: what a checkpoint keeps of this process's source (JSON);
      an empty dict writes nothing.
    """

    baseline = None
    ahead = True

    @staticmethod
    def check_teacher(settings: DatasetBatches, teacher: TeacherView | None) -> None:
        pass  # any teacher scores dataset examples, and no teacher is plain CE

    def __init__(self, settings: DatasetBatches, ctx: SourceContext):
        self.settings = settings

    def batches(self, ctx: SourceContext, step: int) -> list[dict]:
        return [ctx.dataset_batch(step, m) for m in range(ctx.grad_accum)]

    def observe_eval(self, metrics: dict) -> None:
        pass

    def log_fields(self, step: int, steps: int, reduce: Callable[[list[float]], list[float]]) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
