"""An engine in this process: a Hugging Face causal LM run under ``torch.no_grad`` (dense: its final hidden
states and output layer, every hidden state, full logits, samples and SKD's corrections on the KV cache)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import replace

import torch

from distill import sharding
from distill.generation.sampling import Decoder, SamplingParams, pick, row_seed, sample
from distill.losses import DenseSignal, LinearHead
from distill.models import count_parameters, final_hidden, flat_positions, max_positions, output_head


class LocalEngine:
    """A causal LM in this process (:mod:`distill.engines.base` for what an engine does). ``context``: a
    factory of the context every forward pass runs in (a LoRA student's base: its adapters off); such an
    engine shares its weights with the model being trained, so it is neither frozen nor able to decode
    beside it (``corrector`` is None). ``tokenizer`` (for the samples' text; its length is the vocabulary) or
    ``vocab_size`` (an engine that only scores)."""

    dense = True
    hidden_states = True

    def __init__(self, model, tokenizer=None, *, vocab_size: int | None = None, device=None,
                 context: Callable | None = None):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.vocab_size = self.max_top_k = vocab_size if vocab_size is not None else len(tokenizer)
        self.context = context if context is not None else contextlib.nullcontext
        if context is None:
            model.eval().requires_grad_(False)
        self.corrector = self._corrector if context is None else None

    @property
    def max_positions(self) -> int | None:
        return max_positions(self.model)

    @property
    def layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    def describe(self) -> str:
        return f"live model, {count_parameters(self.model) / 1e6:.2f}M parameters"

    @property
    def head(self) -> LinearHead:
        """The output layer; a sharded (FSDP) one gathered whole (a temporary, for one step's loss)."""
        with self.context():
            return self._head()

    def _head(self) -> LinearHead:
        head = output_head(self.model, self.vocab_size)
        if head.weight is sharding.full_weight(head.weight):
            return head
        return replace(head, weight=sharding.full_weight(head.weight), bias=sharding.full_weight(head.bias))

    @torch.no_grad()
    def hidden(self, batch: dict) -> torch.Tensor:
        """The final hidden states (B, T, H) of the batch."""
        with self.context():
            return final_hidden(self.model, batch)

    @torch.no_grad()
    def score(self, batch: dict) -> DenseSignal:
        with self.context():
            return DenseSignal(flat_positions(final_hidden(self.model, batch)), self._head())

    @torch.no_grad()
    def states(self, batch: dict) -> tuple[DenseSignal, tuple[torch.Tensor, ...]]:
        """The signal and every hidden state (B, T, H) of one forward pass (the hidden-state loss)."""
        with self.context():
            states = layer_states(self.model, batch)
            return DenseSignal(flat_positions(states[-1]), self._head()), states

    def _corrector(self, temperature: float) -> Correction:
        return Correction(self.model, temperature)

    def sample(self, rows: list[dict], keys: list[str], params: SamplingParams, *, n: int, seed: int,
               logprobs: bool, batch_size: int, on_batch=None) -> list[list[dict]]:
        """(prompt, sample) sequences in batches of ``batch_size`` (:class:`~distill.engines.base.Engine`)."""
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        jobs = [(r, key, j) for r, key in enumerate(keys) for j in range(n)]
        out: list[list[dict]] = [[] for _ in rows]
        stop = set(params.stop_ids)
        for b0 in range(0, len(jobs), batch_size):
            batch = jobs[b0 : b0 + batch_size]
            with self.context():
                gen = sample(self.model, [rows[r]["ids"] for r, _, _ in batch], params, pad_id=pad_id,
                             device=self.device, seeds=[row_seed(seed, key, j) for _, key, j in batch],
                             model_logprobs=logprobs)
            for (r, _key, j), ids, lp, fin in zip(batch, gen.completions(), _mean_logprobs(gen),
                                                 gen.finished.tolist(), strict=True):
                text_ids = ids[:-1] if fin and ids and ids[-1] in stop else ids
                out[r].append({"sample": j, "response": tok.decode(text_ids, skip_special_tokens=False),
                               "response_tokens": len(ids), "finished": bool(fin), "_mean_logprob": lp})
            if on_batch is not None:
                on_batch(int(gen.completion_mask.sum()))
        return out


def _mean_logprobs(gen) -> list[float]:
    """Each row's mean model log-prob over the tokens it wrote."""
    total = (gen.model_logprobs * gen.completion_mask).sum(1)
    count = gen.completion_mask.sum(1).clamp_min(1)
    return (total / count).tolist()


def layer_states(model, batch: dict) -> tuple[torch.Tensor, ...]:
    """Every hidden state (B, T, H) of ``model`` on ``batch``: 0 = the embeddings' output, i = layer i's (the
    last after the final norm); ``logits_to_keep=1`` skips the full logits."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                logits_to_keep=1, use_cache=False)
    return tuple(out.hidden_states)


class Correction:
    """Speculative KD's teacher side in this process (:class:`~distill.engines.base.Corrector`): the model's own
    incremental state over the same sequences, its top-K at each position, and a sample to replace a rejected
    token."""

    def __init__(self, model, temperature: float):
        self.decoder, self.temperature = Decoder(model), temperature
        self.logits: torch.Tensor | None = None

    def prefill(self, ids_BP: torch.Tensor, mask_BP: torch.Tensor) -> None:
        self.logits = self.decoder.prefill(ids_BP, mask_BP)

    def check(self, proposed_B: torch.Tensor, k: int, u_B: torch.Tensor, active_B: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.logits.float()
        top = z.topk(min(k, z.shape[-1]), dim=-1).indices  # the ranking is the same at every temperature
        inside = (top == proposed_B.unsqueeze(-1)).any(-1)
        if self.temperature == 0.0:
            return inside, z.argmax(-1)
        sample_B, _ = pick(z, SamplingParams(temperature=self.temperature), u_B)
        return inside, sample_B

    def step(self, tokens_B: torch.Tensor) -> None:
        self.logits = self.decoder.step(tokens_B)
