"""Co-distillation (``teacher: {peers: [...]}``, docs/methods.md §13): the student's peers train beside it and
are its teachers.

The peers' training is the training run's loop hook (:class:`distill.training_hooks.PeersHook`: before each
optimizer step every peer takes its own step toward the others' pre-step predictions, the student's
included); this teacher is what the student reads of them.
"""

from __future__ import annotations

import torch

from distill.config import PeersTeacherSpec
from distill.models import count_parameters, final_hidden, flat_positions, max_positions, output_head
from distill.training_hooks import PeersHook


class PeersTeacher:
    """The student's signal from its peers: for the step's micro-batches, the mixture of the peers' predictions
    from before their update (all models distill from the same, pre-step predictions); none (plain CE) during
    ``burn_in``; for other batches (evaluation), the peers' current predictions. No hidden states, no model
    of its own, no corrections of new tokens (speculative KD corrects with one teacher)."""

    kind = "peers"
    eval_estimates = "exact"
    eval_temperature = 1.0
    scores_any_text = True
    states = corrector = model = check_data = prefetch = None  # the peers score whatever they are given

    def __init__(self, spec: PeersTeacherSpec, hook: PeersHook):
        self.spec, self.hook, self.names = spec, hook, hook.names
        limits = [max_positions(m) for m in hook.models if max_positions(m)]
        self.max_positions = min(limits) if limits else None

    def describe(self) -> str:
        sizes = ", ".join(f"{count_parameters(m) / 1e6:.2f}M" for m in self.hook.models)
        return (f"co-distillation with {len(self.hook.models)} peer(s) ({sizes} parameters)"
                + (f", plain CE for {self.spec.burn_in} steps" if self.spec.burn_in else ""))

    def covers(self, split: str) -> bool:
        return True

    @torch.no_grad()
    def signal(self, batch: dict):
        hook = self.hook
        if id(batch) in hook.pending:
            return hook.pending[id(batch)]
        if hook.step < hook.burn_in:
            return None
        was = [m.training for m in hook.models]
        for m in hook.models:
            m.eval()
        hidden = [flat_positions(final_hidden(m, batch)) for m in hook.models]
        for m, w in zip(hook.models, was, strict=True):
            m.train(w)
        return hook.mixture(hidden, [output_head(m, hook.vocab_size) for m in hook.models])

    def diagnose(self, batch: dict) -> str | None:
        for name, m in zip(self.names, self.hook.models, strict=True):
            with torch.no_grad():
                if not torch.isfinite(final_hidden(m, batch)).all():
                    return f"the hidden states of {name} are non-finite"
        return None
