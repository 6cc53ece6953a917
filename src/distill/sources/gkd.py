"""``train.batches: {source: gkd, ...}`` (Agarwal et al., generalized KD): with probability lambda
(``student_fraction``) a step's completions are sampled from the student's *current* weights, otherwise the
dataset's own. The choice is a function of (seed, step): the same on every process and after a resume.
lambda = 0 is supervised KD; lambda = 1 is fully on-policy. GKD pairs it with ``loss.divergence: jsd``."""

from __future__ import annotations

from collections.abc import Callable

from distill.config import GkdBatches
from distill.sources.context import SourceContext, TeacherView
from distill.sources.onpolicy import OnPolicy, check_teacher, coin


class GkdSource:
    """The student's samples or the dataset's completions, step by step (module docstring)."""

    ahead = False  # its batches are the student's own samples, drawn when the step comes

    @staticmethod
    def check_teacher(settings: GkdBatches, teacher: TeacherView | None) -> None:
        check_teacher(settings.source, teacher)

    def __init__(self, settings: GkdBatches, ctx: SourceContext):
        self.settings = settings
        self.op = OnPolicy(settings, ctx, own_samples=True)
        self.baseline = self.op.baseline

    def batches(self, ctx: SourceContext, step: int) -> list[dict]:
        on = coin(ctx.seed, step, "gkd") < self.settings.student_fraction
        self.op.count("on_policy_steps", float(on))
        self.op.own(on)
        if on:
            return self.op.student_batches(ctx, step)
        return [ctx.dataset_batch(step, m) for m in range(ctx.grad_accum)]

    def observe_eval(self, metrics: dict) -> None:
        pass

    def log_fields(self, step: int, steps: int, reduce: Callable[[list[float]], list[float]]) -> dict:
        sums = self.op.take(reduce)
        return {**self.op.log_fields(sums, steps), **self.op.baseline_field(sums, steps)}

    def state_dict(self) -> dict:
        return self.op.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.op.load_state_dict(state)
