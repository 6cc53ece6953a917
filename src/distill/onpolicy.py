"""On-policy batch sources of the training run: the student writes the completions it is trained on.

Each source takes the step's dataset examples (their prompts: the tokens before the first supervised label)
and returns the step's micro-batches; the loss is then the configured one (``loss``) over the completion
tokens, with the teacher scoring every one of them. A source is a pure function of (run, step) and of the
state below, which checkpoints carry, so a resumed run draws the same samples as an uninterrupted one.

* ``gkd`` (Agarwal et al., generalized KD): with probability lambda (``onpolicy.student_fraction``) a
  step's completions are sampled from the student's *current* weights (at ``onpolicy.temperature``),
  otherwise the dataset's own. The choice is a function of (seed, step): the same on every process.
  lambda = 0 is supervised KD; lambda = 1 is fully on-policy. Everything after the first EOS is masked; the
  EOS is a label.
* ``skd`` (Xu et al., speculative KD): every step, the student proposes each token; the teacher keeps it
  when it is among the teacher's top-K at that position (ranked on the teacher's own distribution, the same
  at any temperature: no nucleus warping) and otherwise replaces it by a sample of its own (at
  ``onpolicy.skd_teacher_temperature``, by default the loss temperature; 0 = its argmax); generation goes
  on from the corrected prefix. K = ``skd_top_k``, optionally moving linearly to ``skd_top_k_final``.
  K = V never replaces (on-policy); K = 1 with an argmax teacher writes the teacher's greedy continuation.
* ``distillm`` (Ko et al., DistiLLM's adaptive off-policy schedule, as its reference code does it): a
  threshold phi starts at ``adaptive_init``; after each evaluation, when the eval loss is at least
  ``adaptive_loss_eps`` above the last loss that raised phi, phi grows by ``adaptive_step`` (at most 1)
  and that loss is remembered. Each step draws r ~ U(0, 1) from (seed, step): if r < phi (1 - step / steps),
  or r < phi while the replay buffer is not full, the student writes the completions (kept in the buffer,
  ``replay_capacity`` sequences per process, the oldest dropped) and the step trains on them; else if
  r < phi, the step trains on sequences drawn from the buffer; else on the dataset's. Meant with
  ``skew_kl`` / ``skew_reverse_kl``.

With ``loss.divergence: sampled_reverse_kl`` and ``loss.baseline: running`` (docs/methods.md §8), the state
also holds the baseline: a running mean of the per-token reward f = log q(x) - log p(x) over the steps the
student wrote (gkd's on-policy steps, distillm's fresh ones), decayed by ``loss.baseline_decay`` per step and
updated only after a step's loss, so the value a step uses never depends on that step's samples. Steps on
other text (the dataset, distillm's replay buffer, skd's corrected completions) use no baseline: for tokens
not drawn from the student, E[grad log q(x)] is not 0 and a baseline would bias the gradient.

Student generation is one function (:meth:`OnPolicy.student_completions`): a generation engine fed the
current weights (vLLM) can take its place.
"""

from __future__ import annotations

import json
import random
import time

import numpy as np

from distill.data import collate
from distill.generation.correction import corrected_sample
from distill.generation.sampling import SamplingParams, row_seed, sample, uniforms
from distill.losses import IGNORE_INDEX

SOURCES = ("gkd", "skd", "distillm")


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


def check_teacher(source: str, teacher) -> None:
    """An on-policy source needs a teacher that can score text nobody has seen before."""
    if teacher is None:
        raise ValueError(f"train.batches={source} trains on completions the teacher scores: set a teacher")
    if not teacher.scores_any_text:
        raise ValueError(
            f"train.batches={source}: a cached teacher cannot score text the student writes during training "
            "(its targets exist only for the dataset's examples); use a live teacher or a server teacher"
        )


class AdaptiveThreshold:
    """DistiLLM's threshold phi: it grows by ``step`` (at most 1) after an evaluation whose loss is at least
    ``eps`` above the loss that last raised it (the first evaluation's loss to begin with)."""

    def __init__(self, init: float, step: float, eps: float):
        self.value, self.step, self.eps = init, step, eps
        self.last_raise: float | None = None

    def observe(self, eval_loss: float) -> None:
        if self.last_raise is None:
            self.last_raise = eval_loss
        elif eval_loss >= self.last_raise + self.eps:
            self.value = min(1.0, self.value + self.step)
            self.last_raise = eval_loss


class OnPolicy:
    """The state of an on-policy source: the student's sampling settings, the teacher's corrector (skd), the
    replay buffer and threshold (distillm), and the metrics of the steps since the last log line."""

    def __init__(self, run):
        cfg, teacher = run.cfg, run.teacher
        self.source, self.op, self.max_steps = cfg.train.batches, cfg.onpolicy, cfg.train.max_steps
        check_teacher(self.source, teacher)
        tok = run.tokenizer
        eos = tok.eos_token_id
        self.params = SamplingParams(temperature=self.op.temperature, top_p=self.op.top_p,
                                     max_new_tokens=self.op.max_new_tokens, stop_ids=(eos,) if eos is not None else ())
        limits = [m for m in (getattr(run.accelerator.unwrap_model(run.model).config, "max_position_embeddings", None),
                              teacher.max_positions) if m]
        if limits and cfg.data.seq_len + self.op.max_new_tokens > min(limits):
            raise ValueError(
                f"onpolicy.max_new_tokens={self.op.max_new_tokens} after prompts of up to data.seq_len={cfg.data.seq_len} "
                f"tokens exceeds the models' {min(limits)} positions; lower onpolicy.max_new_tokens or data.seq_len"
            )
        self.skd_temperature = (self.op.skd_teacher_temperature if self.op.skd_teacher_temperature is not None
                                else cfg.loss.temperature)
        self.buffer: list[tuple[list[int], list[int]]] = []  # distillm: (input_ids, labels) per sequence
        self.adaptive = AdaptiveThreshold(self.op.adaptive_init, self.op.adaptive_step, self.op.adaptive_loss_eps)
        self.stats: dict[str, float] = {}
        # sampled_reverse_kl's running baseline (docs/methods.md §8): the decayed mean of f over the steps the
        # student wrote, None before the first; own_samples: whether the current step's batches are the
        # student's unmodified samples from its current weights (the only text a baseline is unbiased on).
        loss = cfg.loss
        self.baseline_on = loss.divergence == "sampled_reverse_kl" and loss.baseline == "running"
        self.baseline_decay = loss.baseline_decay
        self.reward_mean: float | None = None
        self.own_samples = False
        if self.baseline_on and self.source != "skd" and (
                abs(self.op.temperature - loss.temperature) > 1e-12 or self.op.top_p < 1.0):
            raise ValueError(
                f"loss.baseline=running: the baseline is unbiased only on tokens drawn from the student's q_T, but "
                f"the student samples at onpolicy.temperature={self.op.temperature:g}, top_p={self.op.top_p:g} and "
                f"the loss is at loss.temperature={loss.temperature:g}; set onpolicy.temperature={loss.temperature:g} "
                "and onpolicy.top_p=1, or loss.baseline=none"
            )

    @property
    def threshold(self) -> float:
        return self.adaptive.value

    # ---- the student's completions

    def _add(self, key: str, value: float) -> None:
        self.stats[key] = self.stats.get(key, 0.0) + value

    def skd_k(self, step: int, max_steps: int) -> int:
        if self.op.skd_top_k_final is None or max_steps <= 1:
            return self.op.skd_top_k
        frac = step / (max_steps - 1)
        return max(1, round(self.op.skd_top_k + (self.op.skd_top_k_final - self.op.skd_top_k) * frac))

    def student_completions(self, run, examples: list[dict], seeds: list[int], step: int) -> dict:
        """The student's completions of the examples' prompts as a training batch (right-padded; labels on
        what the student wrote, its EOS included). With ``skd`` the teacher corrects them as they are written."""
        prompts = [example_prompt(ex, self.source, run.tokenizer.bos_token_id) for ex in examples]
        student = run.accelerator.unwrap_model(run.model)
        pad_id = run.pad_id
        t0 = time.perf_counter()
        if self.source == "skd":
            k = self.skd_k(step, run.cfg.train.max_steps)
            gen, replaced, proposed = corrected_sample(student, run.teacher.corrector(self.skd_temperature), prompts,
                                                       self.params, k, pad_id=pad_id, seeds=seeds)
            self._add("skd_replaced", replaced)
            self._add("skd_proposed", proposed)
            self._add("skd_k", k)
        else:
            gen = sample(student, prompts, self.params, pad_id=pad_id, seeds=seeds, model_logprobs=False)
        self._add("gen_seconds", time.perf_counter() - t0)
        self._add("gen_tokens", float(gen.completion_mask.sum()))
        self._add("gen_sequences", len(prompts))
        batch = gen.to_batch(pad_id)
        return {k: v.to(run.accelerator.device) for k, v in batch.items()}

    # ---- distillm's buffer and threshold

    def remember(self, batch: dict) -> None:
        for ids, labels, mask in zip(batch["input_ids"].cpu(), batch["labels"].cpu(), batch["attention_mask"].cpu(),
                                     strict=True):
            n = int(mask.sum())
            self.buffer.append((ids[:n].tolist(), labels[:n].tolist()))
        del self.buffer[: max(0, len(self.buffer) - self.op.replay_capacity)]

    def replay(self, run, step: int, micro: int, count: int) -> dict:
        rng = random.Random(row_seed(run.cfg.train.seed, "replay", step, micro, run.accelerator.process_index))
        chosen = rng.sample(self.buffer, k=min(count, len(self.buffer)))
        batch = collate([{"input_ids": ids, "labels": labels} for ids, labels in chosen], run.pad_id)
        return {k: v.to(run.accelerator.device) for k, v in batch.items()}

    def observe_eval(self, eval_loss: float) -> None:
        self.adaptive.observe(eval_loss)

    # ---- sampled_reverse_kl's running baseline

    def baseline(self) -> float:
        """The baseline b of the current step: the running mean of f over earlier steps the student wrote, on
        a step whose batches the student wrote; 0 otherwise (and at the first such step)."""
        if not (self.baseline_on and self.own_samples) or self.reward_mean is None:
            return 0.0
        return self.reward_mean

    def observe_rewards(self, f_sum: float, count: float) -> None:
        """After a step's loss: fold its mean f (summed over all micro-batches and processes, so the same on
        every process) into the running mean, when the student wrote the step's batches."""
        self._add("baseline", self.baseline())  # the value this step used, for the train log
        if not (self.baseline_on and self.own_samples) or count <= 0:
            return
        mean = f_sum / count
        d = self.baseline_decay
        self.reward_mean = mean if self.reward_mean is None else d * self.reward_mean + (1.0 - d) * mean

    # ---- checkpoints and metrics

    def state_dict(self) -> dict:
        return {"buffer": self.buffer, "threshold": self.adaptive.value, "last_raise": self.adaptive.last_raise,
                "reward_mean": self.reward_mean}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = [(list(a), list(b)) for a, b in state["buffer"]]
        self.adaptive.value, self.adaptive.last_raise = state["threshold"], state["last_raise"]
        self.reward_mean = state.get("reward_mean")  # absent in checkpoints written before the baseline

    def to_json(self) -> str:
        return json.dumps(self.state_dict())

    def take_stats(self) -> dict[str, float]:
        out, self.stats = self.stats, {}
        return out


def onpolicy_batches(run, step: int) -> list[dict]:
    """The step's micro-batches for ``gkd``, ``skd`` and ``distillm`` (see the module docstring)."""
    op, cfg = run.onpolicy, run.cfg
    seed = cfg.train.seed
    examples_per_micro = [[run.train_ds[i] for i in run.indices(step, m)] for m in range(cfg.train.grad_accum)]
    indices = [run.indices(step, m) for m in range(cfg.train.grad_accum)]

    def dataset() -> list[dict]:
        return [run.collate(run.train_ds, idx, "train") for idx in indices]

    def students() -> list[dict]:
        return [op.student_completions(run, exs, [row_seed(seed, op.source, step, i) for i in idx], step)
                for exs, idx in zip(examples_per_micro, indices, strict=True)]

    op.own_samples = False  # skd's completions are corrected by the teacher: not the student's own samples
    if op.source == "skd":
        op._add("on_policy_steps", 1.0)
        return students()
    if op.source == "gkd":
        on = coin(seed, step, "gkd") < cfg.onpolicy.student_fraction
        op._add("on_policy_steps", float(on))
        op.own_samples = on
        return students() if on else dataset()
    # distillm
    r = coin(seed, step, "distillm")
    phi = op.threshold
    fresh = phi * (1.0 - step / cfg.train.max_steps)
    full = len(op.buffer) >= cfg.onpolicy.replay_capacity
    if r < fresh or (r < phi and not full):
        batches = students()
        for b in batches:
            op.remember(b)
        op._add("on_policy_steps", 1.0)
        op.own_samples = True
        return batches
    if r < phi and op.buffer:
        op._add("replay_steps", 1.0)
        return [op.replay(run, step, m, cfg.train.batch_size) for m in range(cfg.train.grad_accum)]
    return dataset()
