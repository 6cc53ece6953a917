"""A live teacher: a causal LM in this process (``teacher: {path: DIR}`` or ``{config: ...}``); dense signal."""

from __future__ import annotations

from dataclasses import replace

import torch

from distill import sharding
from distill.generation.correction import LiveCorrector
from distill.losses import DenseSignal
from distill.models import count_parameters, final_hidden, flat_positions, max_positions, output_head


class LiveTeacher:
    """A causal LM run in this process under ``torch.no_grad``; dense signal."""

    kind = "live"
    eval_estimates = "exact"
    eval_temperature = 1.0
    scores_any_text = True  # can score batches that are not dataset examples (generated text)

    def __init__(self, model, vocab_size: int):
        self.model = model.eval().requires_grad_(False)
        self.head = output_head(model, vocab_size)

    @property
    def max_positions(self) -> int | None:
        return max_positions(self.model)

    def describe(self) -> str:
        return f"live model, {count_parameters(self.model) / 1e6:.2f}M parameters"

    def check_data(self, train_ds, eval_ds) -> None:
        """Nothing to check: a live teacher scores whatever it is given."""

    def covers(self, split: str) -> bool:
        return True

    has_states = True

    def step_head(self):
        """The output layer for one step's loss: a sharded (FSDP) one gathered whole for the step."""
        if self.head.weight is sharding.full_weight(self.head.weight):
            return self.head
        return replace(self.head, weight=sharding.full_weight(self.head.weight), bias=sharding.full_weight(self.head.bias))

    @torch.no_grad()
    def signal(self, batch: dict) -> DenseSignal:
        return DenseSignal(flat_positions(final_hidden(self.model, batch)), self.step_head())

    @torch.no_grad()
    def signal_and_states(self, batch: dict) -> tuple[DenseSignal, tuple[torch.Tensor, ...]]:
        """The signal and every hidden state (B, T, H) of one forward pass (the hidden-state loss)."""
        states = layer_states(self.model, batch)
        return DenseSignal(flat_positions(states[-1]), self.step_head()), states

    def follow(self, student, step: int) -> None:
        """Nothing to do after an optimizer step: this teacher does not depend on the student."""

    def begin_step(self, batches: list[dict], num_tokens, step: int) -> None:
        """Nothing to do before an optimizer step (co-distillation trains its peers here)."""

    def save_models(self, out_dir, tokenizer) -> None:
        """No model of its own to save (co-distillation saves its peers)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}  # nothing to keep in checkpoints

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def corrector(self, temperature: float):
        """Speculative KD's teacher side (:func:`distill.generation.correction.corrected_sample`)."""
        return LiveCorrector(self.model, temperature)

    @torch.no_grad()
    def diagnose(self, batch: dict) -> str | None:
        """A cause for a non-finite loss that lies with the teacher, or None."""
        if not torch.isfinite(final_hidden(self.model, batch)).all():
            return "the teacher's hidden states are non-finite (a broken teacher checkpoint or fp16 overflow)"
        return None


def layer_states(model, batch: dict) -> tuple[torch.Tensor, ...]:
    """Every hidden state (B, T, H) of ``model`` on ``batch``: 0 = the embeddings' output, i = layer i's (the
    last after the final norm); ``logits_to_keep=1`` skips the full logits."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                logits_to_keep=1, use_cache=False)
    return tuple(out.hidden_states)
