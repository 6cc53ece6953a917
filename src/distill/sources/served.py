"""The student sampled on a server (``train.batches.sampler``, docs/onpolicy.md): what an on-policy source
uses in place of distill's own sampling loop when its section names a server.

Before a step's first sample, when no weights were published yet or ``sync_every`` optimizer steps passed since
the last publication, the student's current weights are written to ``out_dir/sampler/step_XXXXXXXX/`` (an
ordinary Hugging Face checkpoint; a LoRA student's adapters merged in) and the server loads them (:mod:`distill.server.publish`);
with ``publish: lora_adapter`` a LoRA student's adapters alone are written there and loaded with vLLM's
``/v1/load_lora_adapter``, then sampled by the adapter's name. A step then samples
from the weights of step ``p <= step``: its **staleness** is ``step - p`` optimizer steps, logged as
``sampler_staleness`` (the mean over the steps that sampled). ``sync_every: 1`` samples from the current weights,
as the in-process loop does; above 1 the samples come from an older policy, a bias this source does not correct
(docs/onpolicy.md).

Which weights sampled is part of the source's state (``sampler_step``), and the published directory a
checkpoint names is kept, so that ``--resume`` loads the same weights into the server and draws what an
uninterrupted run draws.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from pathlib import Path

import torch

from distill import checkpoint as ckpt
from distill import lora
from distill.config import SamplerSpec
from distill.generation.sampling import SamplingParams
from distill.losses import IGNORE_INDEX
from distill.server.publish import SamplingServer, write_adapter, write_weights
from distill.sources.context import SourceContext

logger = logging.getLogger("distill")


def completion_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict:
    """Prompt + completion per row, right-padded, labels on the completion (``Generation.to_batch``'s layout)."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    labels = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.as_tensor(p + c, dtype=torch.long)
        labels[i, len(p) : n] = torch.as_tensor(c, dtype=torch.long)
        attention[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


class ServedStudent:
    """The student on ``spec.server``: publishes its weights on schedule and samples there (module docstring)."""

    def __init__(self, spec: SamplerSpec, ctx: SourceContext, source: str):
        if ctx.world > 1:
            raise ValueError(f"train.batches.sampler: a sampling server runs with one training process (this run "
                             f"has {ctx.world}); launch one process, or remove train.batches.sampler")
        key = os.environ.get(spec.api_key_env) if spec.api_key_env else None
        if spec.api_key_env and not key:
            raise ValueError(f"train.batches.sampler.api_key_env={spec.api_key_env}: that environment variable "
                             "is not set")
        if spec.publish == "lora_adapter" and not lora.is_lora(ctx.student):
            raise ValueError("train.batches.sampler.publish=lora_adapter publishes a LoRA student's adapters, but "
                             "this student has none (student.lora); set train.batches.sampler.publish=weights")
        self.spec, self.source = spec, source
        # A published adapter is sampled by its name (vLLM: the adapter is a model of its own).
        self.adapter = (spec.model or "student") if spec.publish == "lora_adapter" else None
        self.server = SamplingServer(spec.server, model=self.adapter or spec.model, api_key=key, timeout=spec.timeout,
                                     retries=spec.retries, max_in_flight=spec.max_in_flight)
        self.root = Path(ctx.out_dir) / "sampler"
        self.published: int | None = None  # the optimizer step whose weights the server samples from
        self.kept: set[int] = set()  # published steps a checkpoint names (their directories stay)
        self.loaded = False  # whether this process has made the server load `published`

    def staleness(self, step: int) -> int:
        """Optimizer steps between the weights that sample ``step`` and the weights it trains."""
        return step - self.published

    def sync(self, ctx: SourceContext, step: int) -> None:
        """Before ``step`` samples: publish the current weights when due; after a resume, load the weights
        the interrupted run sampled with (its checkpoint's ``sampler_step``)."""
        due = self.published is None or step - self.published >= self.spec.sync_every
        if not due and not self.loaded:
            directory = ckpt.step_dir(self.root, self.published)
            if directory.is_dir():
                self._load(directory, self.published)
                self.loaded = True
                return
            logger.warning("train.batches.sampler: %s is gone; publishing the weights of step %d instead (the "
                           "samples differ from an uninterrupted run's)", directory, step)
            due = True
        if due:
            self.publish(ctx, step)

    def publish(self, ctx: SourceContext, step: int) -> None:
        final = ckpt.step_dir(self.root, step)
        if self.adapter is not None:  # the adapters alone, in peft's format
            directory = write_adapter(ctx.student, final)
        else:  # a LoRA student with its adapters merged into a copy (the trained model keeps them)
            model = lora.merged(copy.deepcopy(ctx.student)) if lora.is_lora(ctx.student) else ctx.student
            directory = write_weights(model, ctx.tokenizer, final)
        self._load(directory, step)
        old, self.published, self.loaded = self.published, step, True
        if old is not None and old != step and old not in self.kept:
            shutil.rmtree(ckpt.step_dir(self.root, old), ignore_errors=True)

    def _load(self, directory: Path, step: int) -> None:
        if self.adapter is not None:
            self.server.load_adapter(directory, self.adapter)
        else:
            self.server.load(directory, str(step))

    def sample(self, ctx: SourceContext, prompts: list[list[int]], seeds: list[int],
               params: SamplingParams) -> tuple[dict, int]:
        """The prompts' completions as a training batch on the device, and the tokens written."""
        completions = self.server.complete(prompts, seeds, params)
        batch = completion_batch(prompts, completions, ctx.pad_id)
        return {k: v.to(ctx.device) for k, v in batch.items()}, sum(len(c) for c in completions)

    def state_dict(self) -> dict:
        if self.published is None:
            return {}
        self.kept.add(self.published)  # a checkpoint names it: its directory stays for --resume
        return {"sampler_step": self.published}

    def load_state_dict(self, state: dict) -> None:
        self.published = state.get("sampler_step")
        self.kept = {self.published} if self.published is not None else set()
        self.loaded = False
