"""What the on-policy batch sources (``gkd``, ``skd``, ``distillm``) share: the student writes the completions
it is trained on.

Such a source takes the step's dataset examples (their prompts: the tokens before the first supervised label)
and returns the step's micro-batches; the loss is then the configured one (``loss``) over the completion
tokens, with the teacher scoring every one of them. Everything after the first EOS is masked; the EOS is a
label. The student samples at ``train.batches.temperature`` and ``top_p``, at most ``max_new_tokens`` tokens,
each row with its own seed from (seed, source, step, row).

With ``loss.divergence: sampled_reverse_kl`` and ``loss.baseline: running`` (docs/methods.md §8), a source
whose batches can be the student's own samples (gkd's on-policy steps, distillm's fresh ones) keeps the
baseline (:class:`RunningBaseline`): a running mean of the per-token reward f = log q(x) - log p(x) over the
steps the student wrote, decayed by ``loss.baseline_decay`` per step and updated only after a step's loss, so
the value a step uses never depends on that step's samples. Steps on other text (the dataset, distillm's
replay buffer, skd's corrected completions) use no baseline: for tokens not drawn from the student,
E[grad log q(x)] is not 0 and a baseline would bias the gradient. The baseline is part of the source's state,
which checkpoints carry.

Student generation is one method (:meth:`OnPolicy.completions`): with ``train.batches.sampler`` a server
running the student (``distill serve``, SGLang) takes its place, fed the student's weights every ``sync_every``
optimizer steps (:mod:`distill.sources.served`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from distill.config import LossConfig, OnPolicyBatches
from distill.generation.sampling import SamplingParams, row_seed, sample, uniforms
from distill.losses import IGNORE_INDEX
from distill.sources.context import SourceContext, TeacherView
from distill.sources.served import ServedStudent


def coin(seed: int, step: int, salt: str) -> float:
    """A uniform in [0, 1) from (seed, step, salt): the same on every process and after a resume."""
    return float(uniforms(np.asarray([row_seed(seed, salt)], dtype=np.uint64), step)[0])


def example_prompt(example: dict, source: str, bos_id: int | None = None) -> list[int]:
    """The prompt of a dataset example: its tokens before the first supervised label (more than a bos)."""
    labels, ids = list(example["labels"]), list(example["input_ids"])
    first = next((t for t, lab in enumerate(labels) if lab != IGNORE_INDEX), None)
    content = ids[:first] if first is not None else []
    if content and content[0] == bos_id:
        content = content[1:]
    if not content:
        raise ValueError(
            f"train.batches={source} needs prompts: examples whose labels start after a prompt (data.format "
            "prompt_response or messages, data.packing=false); this dataset supervises from the first token"
        )
    return ids[:first]


def check_teacher(source: str, teacher: TeacherView | None) -> None:
    """An on-policy source needs a teacher that can score text nobody has seen before."""
    if teacher is None:
        raise ValueError(f"train.batches={source} trains on completions the teacher scores: set a teacher")
    if not teacher.scores_any_text:
        raise ValueError(
            f"train.batches={source}: a cached teacher cannot score text the student writes during training "
            "(its targets exist only for the dataset's examples); use a live teacher or a server teacher"
        )


class RunningBaseline:
    """sampled_reverse_kl's running baseline (module docstring): the decayed mean of f over the steps the
    student wrote, None before the first. ``own``: whether the current step's batches are the student's
    unmodified samples from its current weights (the only text a baseline is unbiased on); the source sets it
    with each step's batches. The training run asks :meth:`value` before the step's loss and gives
    :meth:`observe` its f after it."""

    def __init__(self, decay: float):
        self.decay = decay
        self.mean: float | None = None
        self.own = False
        self.used = 0.0  # the values the steps since the last log line used, summed (the train log's `baseline`)

    def value(self) -> float:
        """The baseline b of the current step: the running mean of f over earlier steps the student wrote, on
        a step whose batches the student wrote; 0 otherwise (and at the first such step)."""
        return self.mean if self.own and self.mean is not None else 0.0

    def observe(self, f_sum: float, count: float) -> None:
        """After a step's loss: fold its mean f (summed over all micro-batches and processes, so the same on
        every process) into the running mean, when the student wrote the step's batches."""
        self.used += self.value()
        if not self.own or count <= 0:
            return
        mean = f_sum / count
        self.mean = mean if self.mean is None else self.decay * self.mean + (1.0 - self.decay) * mean


class OnPolicy:
    """The part of an on-policy source that every one has: the student's sampling settings, its completions
    of a step's prompts, the counters they add to the train log, and the running baseline (``baseline``, when
    the loss has one and ``own_samples``: the source's batches can be the student's own samples). ``counters``:
    the source's own per-process counters, summed over processes with these."""

    COUNTERS = ("gen_seconds", "gen_tokens", "gen_sequences", "on_policy_steps")

    def __init__(self, settings: OnPolicyBatches, ctx: SourceContext, own_samples: bool,
                 counters: tuple[str, ...] = ()):
        self.name, self.world = settings.source, ctx.world
        eos = ctx.tokenizer.eos_token_id
        self.params = SamplingParams(temperature=settings.temperature, top_p=settings.top_p,
                                     max_new_tokens=settings.max_new_tokens, stop_ids=(eos,) if eos is not None else ())
        limits = [m for m in (getattr(ctx.student.config, "max_position_embeddings", None),
                              ctx.teacher.max_positions) if m]
        if limits and ctx.seq_len + settings.max_new_tokens > min(limits):
            raise ValueError(
                f"train.batches.max_new_tokens={settings.max_new_tokens} after prompts of up to data.seq_len="
                f"{ctx.seq_len} tokens exceeds the models' {min(limits)} positions; lower train.batches.max_new_tokens "
                "or data.seq_len"
            )
        self.baseline = running_baseline(ctx.loss, settings, own_samples)
        self.served = ServedStudent(settings.sampler, ctx, self.name) if settings.sampler is not None else None
        served = ("staleness", "sampled_steps") if self.served is not None else ()
        self.names = (*self.COUNTERS, *counters, *served, *(("baseline",) if self.baseline is not None else ()))
        self.sums = dict.fromkeys(self.names, 0.0)

    def count(self, key: str, value: float) -> None:
        self.sums[key] += value

    def own(self, flag: bool) -> None:
        """Whether this step's batches are the student's own samples (what the baseline may be used on)."""
        if self.baseline is not None:
            self.baseline.own = flag

    # ---- the student's completions

    def completions(self, ctx: SourceContext, examples: list[dict], seeds: list[int],
                    write: Callable | None = None) -> dict:
        """The student's completions of the examples' prompts as a training batch (right-padded; labels on
        what the student wrote, its EOS included). ``write(prompts, seeds) -> Generation`` writes them another
        way (skd: corrected by the teacher as they are written); by default the student samples them."""
        prompts = [example_prompt(ex, self.name, ctx.tokenizer.bos_token_id) for ex in examples]
        t0 = time.perf_counter()
        if write is None and self.served is not None:
            batch, tokens = self.served.sample(ctx, prompts, seeds, self.params)
        else:
            if write is None:
                gen = sample(ctx.student, prompts, self.params, pad_id=ctx.pad_id, seeds=seeds, model_logprobs=False)
            else:
                gen = write(prompts, seeds)
            batch, tokens = gen.to_batch(ctx.pad_id), float(gen.completion_mask.sum())
        self.count("gen_seconds", time.perf_counter() - t0)
        self.count("gen_tokens", float(tokens))
        self.count("gen_sequences", len(prompts))
        return {k: v.to(ctx.device) for k, v in batch.items()}

    def student_batches(self, ctx: SourceContext, step: int, write: Callable | None = None) -> list[dict]:
        """The step's micro-batches written by the student: the completions of each micro-batch's examples,
        row ``i`` seeded from (seed, source, step, i). A sampling server first gets the weights due."""
        if self.served is not None and write is None:
            t0 = time.perf_counter()
            self.served.sync(ctx, step)
            self.count("gen_seconds", time.perf_counter() - t0)  # publishing is part of sampling's cost
            self.count("staleness", float(self.served.staleness(step)))
            self.count("sampled_steps", 1.0)
        rows = [ctx.indices(step, m) for m in range(ctx.grad_accum)]
        examples = [[ctx.train_ds[i] for i in idx] for idx in rows]
        return [self.completions(ctx, exs, [row_seed(ctx.seed, self.name, step, i) for i in idx], write)
                for exs, idx in zip(examples, rows, strict=True)]

    # ---- the train log

    def take(self, reduce: Callable[[list[float]], list[float]]) -> dict[str, float]:
        """The counters since the last log line, summed over the processes; then starts again from 0."""
        if self.baseline is not None:
            self.sums["baseline"], self.baseline.used = self.baseline.used, 0.0
        totals = dict(zip(self.names, reduce([self.sums[k] for k in self.names]), strict=True))
        self.sums = dict.fromkeys(self.names, 0.0)
        return totals

    def log_fields(self, sums: dict[str, float], steps: int) -> dict:
        """``gen_seconds`` (per step and process), ``on_policy`` (the share of steps the student wrote),
        ``gen_length`` (tokens per completion) and, with a sampling server, ``sampler_staleness`` (optimizer steps
        between the weights that sampled and the weights trained, the mean over the steps that sampled)."""
        out = {"gen_seconds": sums["gen_seconds"] / self.world / steps,
               "on_policy": sums["on_policy_steps"] / self.world / steps}
        if sums["gen_sequences"]:
            out["gen_length"] = sums["gen_tokens"] / sums["gen_sequences"]
        if self.served is not None and sums["sampled_steps"]:
            out["sampler_staleness"] = sums["staleness"] / sums["sampled_steps"]
        return out

    def baseline_field(self, sums: dict[str, float], steps: int) -> dict:
        """``baseline``: the baseline's value averaged over the steps (when the loss has one)."""
        return {"baseline": sums["baseline"] / self.world / steps} if self.baseline is not None else {}

    def state_dict(self) -> dict:
        out = {"reward_mean": self.baseline.mean} if self.baseline is not None else {}
        return {**out, **(self.served.state_dict() if self.served is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        if self.baseline is not None:
            self.baseline.mean = state.get("reward_mean")  # absent in checkpoints written before the baseline
        if self.served is not None:
            self.served.load_state_dict(state)


def running_baseline(loss: LossConfig, settings: OnPolicyBatches, own_samples: bool) -> RunningBaseline | None:
    """The running baseline when the loss has one (sampled_reverse_kl, ``loss.baseline: running``). A source
    whose batches are never the student's own samples (skd) keeps one that is always 0 (the train log shows
    it); one whose batches can be is refused when the student does not sample from the loss's q_T."""
    if loss.divergence != "sampled_reverse_kl" or loss.baseline != "running":
        return None
    if own_samples and (abs(settings.temperature - loss.temperature) > 1e-12 or settings.top_p < 1.0):
        raise ValueError(
            f"loss.baseline=running: the baseline is unbiased only on tokens drawn from the student's q_T, but the "
            f"student samples at train.batches.temperature={settings.temperature:g}, top_p={settings.top_p:g} and "
            f"the loss is at loss.temperature={loss.temperature:g}; set train.batches.temperature="
            f"{loss.temperature:g} and train.batches.top_p=1, or loss.baseline=none"
        )
    return RunningBaseline(loss.baseline_decay)
