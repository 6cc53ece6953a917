"""``train.batches: {source: skd, ...}`` (Xu et al., speculative KD): every step, the student proposes each
token; the teacher keeps it when it is among the teacher's top-K at that position (ranked on the teacher's own
distribution, the same at any temperature: no nucleus warping) and otherwise replaces it by a sample of its
own (at ``skd_teacher_temperature``, by default the loss temperature; 0 = its argmax); generation goes on from
the corrected prefix. K = ``skd_top_k``, optionally moving linearly to ``skd_top_k_final``. K = V never
replaces (on-policy); K = 1 with an argmax teacher writes the teacher's greedy continuation. The corrected
completions are not the student's own samples: no sampled_reverse_kl baseline is used on them."""

from __future__ import annotations

from collections.abc import Callable

from distill.config import SkdBatches
from distill.generation.correction import corrected_sample
from distill.sources.context import SourceContext, TeacherView
from distill.sources.onpolicy import OnPolicy, check_teacher


class SkdSource:
    """The student's completions, corrected by the teacher as they are written (module docstring)."""

    ahead = False  # its batches are the student's own samples, drawn when the step comes

    @staticmethod
    def check_teacher(settings: SkdBatches, teacher: TeacherView | None) -> None:
        check_teacher(settings.source, teacher)
        if teacher.corrector is None:
            raise ValueError("train.batches=skd: this teacher cannot correct the student's tokens as they are "
                             "written; use a live teacher or a server teacher")

    def __init__(self, settings: SkdBatches, ctx: SourceContext):
        self.settings, self.max_steps = settings, ctx.max_steps
        self.temperature = (settings.skd_teacher_temperature if settings.skd_teacher_temperature is not None
                            else ctx.loss.temperature)
        self.op = OnPolicy(settings, ctx, own_samples=False, counters=("skd_replaced", "skd_proposed"))
        self.baseline = self.op.baseline

    def top_k(self, step: int) -> int:
        """K at ``step`` (0-based): ``skd_top_k``, moving linearly to ``skd_top_k_final`` when given."""
        s = self.settings
        if s.skd_top_k_final is None or self.max_steps <= 1:
            return s.skd_top_k
        frac = step / (self.max_steps - 1)
        return max(1, round(s.skd_top_k + (s.skd_top_k_final - s.skd_top_k) * frac))

    def batches(self, ctx: SourceContext, step: int) -> list[dict]:
        self.op.count("on_policy_steps", 1.0)
        self.op.own(False)
        k = self.top_k(step)

        def corrected(prompts: list[list[int]], seeds: list[int]):
            gen, replaced, proposed = corrected_sample(ctx.student, ctx.teacher.corrector(self.temperature), prompts,
                                                       self.op.params, k, pad_id=ctx.pad_id, seeds=seeds)
            self.op.count("skd_replaced", replaced)
            self.op.count("skd_proposed", proposed)
            return gen

        return self.op.student_batches(ctx, step, corrected)

    def observe_eval(self, metrics: dict) -> None:
        pass

    def log_fields(self, step: int, steps: int, reduce: Callable[[list[float]], list[float]]) -> dict:
        sums = self.op.take(reduce)
        return {**self.op.log_fields(sums, steps),
                "skd_replacement_rate": sums["skd_replaced"] / max(sums["skd_proposed"], 1.0),
                "skd_k": self.top_k(step - 1), **self.op.baseline_field(sums, steps)}

    def state_dict(self) -> dict:
        return self.op.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.op.load_state_dict(state)
