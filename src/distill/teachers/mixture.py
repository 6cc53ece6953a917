"""Several teachers at once (``teacher: {teachers: [...], mix: probability | loss}``, docs/methods.md §9)."""

from __future__ import annotations

from distill.config import MixtureTeacherSpec
from distill.losses import LossSpec, MixtureSignal


class MixtureTeacher:
    """Several teachers at once (docs/methods.md §9): each member a live, cached or server teacher checked on
    its own against the run (tokenizer, vocabulary, temperature); the signal holds every member's, and the
    chunked loss forms a chunk of rows of each at a time. Weights are normalized to sum to 1; a member of
    weight 0 only has its KL logged. It has no hidden states, no model of its own and corrects no tokens
    (speculative KD corrects with one teacher)."""

    kind = "mixture"
    states = corrector = model = prefetch = None

    def __init__(self, spec: MixtureTeacherSpec, members: list, temperatures: list[float], loss: LossSpec):
        self.spec, self.members, self.temperatures = spec, members, temperatures
        self.names = spec.names()
        total = sum(m.weight for m in spec.teachers)
        self.weights = [m.weight / total for m in spec.teachers]
        if spec.mix == "probability":
            for i, (member, w) in enumerate(zip(members, self.weights, strict=True)):
                if w > 0 and member.eval_estimates != "exact":  # not its whole distribution
                    raise ValueError(
                        f"teacher.mix=probability mixes the teachers' full distributions, but teacher.teachers[{i}] "
                        f"({self.names[i]}) is a {member.kind} teacher with top-k or sampled targets; use "
                        "teacher.mix=loss (the weighted sum of the divergences to each teacher)")
        self.scores_any_text = all(m.scores_any_text for m in members)
        limits = [m.max_positions for m in members if m.max_positions]
        self.max_positions = min(limits) if limits else None
        kinds = {m.eval_estimates for m in members}
        self.eval_estimates = kinds.pop() if len(kinds) == 1 else ("sampled" if "sampled" in kinds else "topk_tail")
        self.eval_temperature = loss.temperature  # the mixture as trained (members at their own temperatures)
        self.diagnose = self._diagnose if any(m.diagnose is not None for m in members) else None
        self.check_data = self._check_data if any(m.check_data is not None for m in members) else None

    def describe(self) -> str:
        parts = [f"{n} (weight {w:.3g}, T={t:g}): {m.describe()}"
                 for n, w, t, m in zip(self.names, self.weights, self.temperatures, self.members, strict=True)]
        return f"{len(self.members)} teachers mixed in {self.spec.mix} space: " + "; ".join(parts)

    def _check_data(self, train_ds, eval_ds) -> None:
        for m in self.members:
            if m.check_data is not None:
                m.check_data(train_ds, eval_ds)

    def covers(self, split: str) -> bool:
        return all(m.covers(split) for m in self.members)

    def signal(self, batch: dict) -> MixtureSignal:
        return MixtureSignal([m.signal(batch) for m in self.members], self.weights, self.temperatures,
                             self.spec.mix)

    def _diagnose(self, batch: dict) -> str | None:
        for name, m in zip(self.names, self.members, strict=True):
            cause = m.diagnose(batch) if m.diagnose is not None else None
            if cause:
                return f"teacher {name}: {cause}"
        return None
