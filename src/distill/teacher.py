"""Teachers: the one place in distill with several implementations.

A teacher is opened once from its config by :func:`open_teacher` (the only branch on the config's kind),
checks there that it fits the run, and then, for any batch, returns its **signal** for the batch's
next-token positions (``labels[:, 1:]``, flattened to ``B * (T - 1)`` rows):

* :class:`LiveTeacher` (``teacher: {path: DIR}`` or ``{config: ...}``): a Hugging Face model in this
  process. Dense signal: its final hidden states and output layer (:class:`distill.losses.chunked.DenseSignal`);
  the loss forms the logits a chunk of rows at a time.
* :class:`CachedTeacher` (``teacher: {cache: DIR}``): targets captured by ``distill cache``. Sparse signal:
  ids + probabilities, with or without the tail mass (:class:`distill.losses.SparseTarget`).
* :class:`ServerTeacher` (``teacher: {server: URL}``): a model behind an HTTP server, scored on token ids.
  Sparse signal: its top-k and the realized token at the loss temperature, and the tail mass.

Training and evaluation use the same object. What evaluation can say about the student's distance to the
teacher depends on the signal (:attr:`eval_estimates`):

* ``exact`` (live): ``kl_to_teacher`` = KL(p || q) over the vocabulary, ``top1_agreement``.
* ``topk_tail`` (top-k + tail cache, server): KL over the k kept ids + one tail class (by the data-processing
  inequality a lower bound of the full KL; exact when k = V) and ``top1_agreement`` (the teacher's top-1 is
  stored exactly).
* ``topk`` (renormalized top-k cache): KL between teacher and student renormalized over the k ids, and
  ``top1_agreement``.
* ``sampled`` (sampled cache, N draws ``x_i ~ p``, ``p_hat = counts / N``): the KL and the teacher's argmax
  cannot be estimated without bias from N draws. What can: ``ce_to_teacher`` = ``-sum p_hat log q``, an
  unbiased estimate of the cross-entropy H(p, q) = KL(p || q) + H(p) (H(p) does not depend on the student,
  so differences between students are differences in KL), and ``teacher_prob_of_top1`` = ``p_hat(argmax q)``,
  an unbiased estimate of p(argmax q), the chance that a teacher sample equals the student's top-1.

More kinds are built from these (docs/methods.md §9, §11, §13):

* :class:`MixtureTeacher` (``teacher: {teachers: [...], mix: probability | loss}``): several teachers of any
  kind, each with a weight and its own temperature; its signal is a :class:`distill.losses.chunked.MixtureSignal`,
  which the chunked loss forms a chunk of rows of each member at a time.
* :class:`SelfTeacher` (``teacher: {self: ema | snapshot}``): the student itself, as the moving average of
  its weights or a frozen copy taken every N steps; it follows the student after each optimizer step
  (``follow``) and its weights are kept in the run's checkpoints (``state_dict`` / ``load_state_dict``).
* :class:`StudentBaseTeacher` (``teacher: {student_base: true}``): a LoRA student's own base model, its
  adapters switched off for the teacher's pass; it shares the student's weights (no extra memory).

Adding a kind of teacher: a spec in ``config.py`` (a member of ``TeacherSpec``), a class here with the
same attributes and methods as these, and its branch in :func:`open_teacher`. The train and eval
code only calls ``signal``, ``diagnose``, ``covers``, ``check_data``, ``describe``, ``follow``,
``state_dict``, ``load_state_dict``, ``signal_and_states`` (hidden-state loss, ``has_states``) and
(speculative KD) ``corrector``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import replace

import torch

from distill import sharding
from distill.cache.codec import data_fingerprint
from distill.cache.reader import TeacherCache
from distill.config import (
    HiddenLossConfig,
    MixtureTeacherSpec,
    ModelSpec,
    PeersTeacherSpec,
    SelfTeacherSpec,
    ServerTeacherSpec,
    StudentBaseTeacherSpec,
    TeacherCacheSpec,
)
from distill.losses import (
    DenseSignal,
    HiddenStateLoss,
    LinearHead,
    LossSpec,
    MixtureSignal,
    SparseTarget,
    chunked_kd_loss,
    uniform_layer_map,
)
from distill.models import (
    check_tokenizers_agree,
    count_parameters,
    final_hidden,
    flat_positions,
    load_model,
    load_tokenizer,
    max_positions,
    output_head,
    resolve_vocab,
    save_pretrained,
)
from distill.tokenizer import tokenizer_fingerprint

logger = logging.getLogger("distill")


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
        from distill.generation.correction import LiveCorrector

        return LiveCorrector(self.model, temperature)

    @torch.no_grad()
    def diagnose(self, batch: dict) -> str | None:
        """A cause for a non-finite loss that lies with the teacher, or None."""
        if not torch.isfinite(final_hidden(self.model, batch)).all():
            return "the teacher's hidden states are non-finite (a broken teacher checkpoint or fp16 overflow)"
        return None


class CachedTeacher:
    """Targets from ``distill cache``, one :class:`~distill.cache.reader.TeacherCache` per captured split; sparse
    signal. Batches must be dataset examples (``batch["index"]``, ``batch["split"]``): each example is
    checked against the hash the cache stored for it."""

    kind = "cache"
    max_positions = None
    scores_any_text = False

    def __init__(self, spec: TeacherCacheSpec, tokenizer, loss: LossSpec, seq_len: int, device):
        train = TeacherCache(spec.cache, "train", topk_tail=spec.topk_tail)
        self.path, self.device = train.path, device
        self.caches = {"train": train}
        if "eval" in train.manifest["splits"]:
            self.caches["eval"] = TeacherCache(spec.cache, "eval", topk_tail=spec.topk_tail)
        train.check_compatible(tokenizer_fingerprint(tokenizer), len(tokenizer), seq_len)
        if abs(train.temperature - loss.temperature) > 1e-9:
            raise ValueError(
                f"teacher.cache: the targets in {spec.cache} were captured at temperature {train.temperature}, but "
                f"loss.temperature={loss.temperature}; set loss.temperature={train.temperature} or rebuild the cache"
            )
        if loss.divergence == "sampled_reverse_kl":
            raise ValueError("loss.divergence=sampled_reverse_kl needs the teacher's probability of the tokens the "
                             "student samples, which a cache does not hold; use a live teacher or a server teacher")
        if train.mode == "sampled" and not loss.tolerates_zero_teacher_mass:
            setting = f"loss.divergence={loss.divergence}"
            if loss.divergence == "jsd":
                setting += f" with loss.beta={loss.beta:g}"
            elif loss.divergence == "skew_reverse_kl":
                setting += f" with loss.skew={loss.skew:g}"
            raise ValueError(
                f"{setting} is infinite on sampled targets (the teacher puts no mass outside the sampled ids, "
                "and this divergence contains KL(q || p)); use forward_kl, skew_kl, tvd, jsd with loss.beta < 1 "
                "or skew_reverse_kl with loss.skew > 0"
            )
        self.mode = train.mode
        self.eval_temperature = train.temperature
        self.eval_estimates = "sampled" if train.mode == "sampled" else ("topk_tail" if spec.topk_tail else "topk")

    def describe(self) -> str:
        split_note = "" if "eval" in self.caches else " (no eval split: eval reports no KL to the teacher)"
        return f"{self.mode} targets from {self.path}, eval metrics: {self.eval_estimates}{split_note}"

    def check_data(self, train_ds, eval_ds) -> None:
        """Refuse targets of other data before training on them; forget a cached eval split that the run
        does not have."""
        self.caches["train"].check_compatible(data_fingerprint=data_fingerprint(train_ds), num_examples=len(train_ds))
        if "eval" in self.caches:
            if eval_ds is None:
                del self.caches["eval"]
            else:
                self.caches["eval"].check_compatible(data_fingerprint=data_fingerprint(eval_ds),
                                                     num_examples=len(eval_ds))

    def covers(self, split: str) -> bool:
        return split in self.caches

    def signal(self, batch: dict) -> SparseTarget:
        if "index" not in batch:
            raise ValueError(
                "a cached teacher can only score the dataset examples it was captured on; these batches are "
                "not dataset examples (use a live teacher for generated batches)"
            )
        cache = self.caches[batch["split"]]
        ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
        lengths = batch["attention_mask"].sum(1).tolist()  # right-padded (data.collate)
        examples = [{"input_ids": ids[i, :n], "labels": labels[i, :n]} for i, n in enumerate(lengths)]
        target = cache.batch_target(batch["index"], examples, width=ids.shape[1])
        k = target.ids.shape[-1]
        flat = SparseTarget(target.ids.reshape(-1, k), target.probs.reshape(-1, k),
                            None if target.tail is None else target.tail.reshape(-1))
        return flat.to(self.device)

    def diagnose(self, batch: dict) -> str | None:
        return None  # stored targets are checked when they are read

    def corrector(self, temperature: float):
        raise ValueError("a cached teacher cannot check new tokens (speculative KD); use a live or server teacher")

    has_states = False  # no hidden states: the hidden-state loss needs a live teacher

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


class ServerTeacher:
    """A teacher behind an HTTP server, scored on token ids (:mod:`distill.server.client`); sparse signal: the
    top-k and the realized token with their probabilities at the loss temperature, and the tail mass.

    At start it refuses a server that cannot be used: no prompt log-probabilities (OpenAI API, llama.cpp:
    use ``distill generate`` for those), another tokenizer than the student's (``/tokenize`` on probe
    texts), scores that differ between two requests for the same sequence (prefix caching, replicas), or
    log-probabilities that ignore a temperature other than 1 (vLLM's raw mode)."""

    kind = "server"
    eval_estimates = "topk_tail"
    scores_any_text = True

    PROBES = ("def distill(teacher, student):\n    return student", "The quick brown fox, 1234 + 5678 = 6912.",
              "Ünïcödé ✓ and\ttabs")

    def __init__(self, spec: ServerTeacherSpec, tokenizer, loss: LossSpec):
        import os

        from distill.server.client import Client, NoPromptLogprobs, Scorer, max_abs_difference

        key = os.environ.get(spec.api_key_env) if spec.api_key_env else None
        if spec.api_key_env and not key:
            raise ValueError(f"teacher.api_key_env={spec.api_key_env}: that environment variable is not set")
        self.spec, self.url, self.vocab_size = spec, spec.server.rstrip("/"), len(tokenizer)
        self.top_k, self.temperature = spec.top_k, loss.temperature
        self.eval_temperature = loss.temperature
        self.client = Client(self.url, api_key=key, timeout=spec.timeout, retries=spec.retries)
        self.max_positions = None
        self.model = spec.model
        if spec.api != "sglang":
            self._check_model()
        self.scorer = Scorer(self.client, self.model, api="sglang" if spec.api == "sglang" else "vllm",
                             max_in_flight=spec.max_in_flight)
        if spec.check_tokenizer:
            self._check_tokenizer(tokenizer)
        probe = list(tokenizer(" ".join(self.PROBES), add_special_tokens=False)["input_ids"])[:64]
        if tokenizer.bos_token_id is not None:
            probe = [tokenizer.bos_token_id, *probe]
        try:
            first = self.scorer.score_one(probe, self.top_k, self.temperature)
        except NoPromptLogprobs:
            raise ValueError(
                f"teacher.server={self.url} returns no prompt log-probabilities (the OpenAI API and llama.cpp do "
                "not), which token-level distillation needs. Distill from its text instead: `distill generate` "
                "with this server, then train on the output (sequence-level KD)"
            ) from None
        second = self.scorer.score_one(probe, self.top_k, self.temperature)
        drift = max_abs_difference(first, second)
        if drift > spec.determinism_tolerance:
            raise ValueError(
                f"teacher.server={self.url} scored the same sequence twice and the log-probs differ by up to {drift:.3g} "
                f"(> teacher.determinism_tolerance={spec.determinism_tolerance:g}): prefix caching or several replicas "
                "disagree by more than the distillation signal. Disable prefix caching / pin one replica, or raise "
                "the tolerance if you accept the noise"
            )
        if self.temperature != 1.0:
            at_one = self.scorer.score_one(probe, self.top_k, 1.0)
            if max_abs_difference(first, at_one) < 1e-6:
                raise ValueError(
                    f"teacher.server={self.url} returns log-probs at T=1 whatever the request's temperature (vLLM's "
                    f"default raw mode), but loss.temperature={self.temperature:g}. Start vLLM with --logprobs-mode "
                    "processed_logprobs (distill serve --logprobs-mode processed), or set loss.temperature=1"
                )

    def _check_model(self) -> None:
        try:
            listed = self.client.request("GET", "/v1/models").get("data", [])
        except ValueError:
            return  # no model list on this server: the completions request names the model or not
        names = [m.get("id") for m in listed]
        if self.model is None and len(names) > 1:
            raise ValueError(f"teacher.server={self.url} serves several models ({', '.join(names)}); set teacher.model")
        if self.model is not None and names and self.model not in names:
            raise ValueError(f"teacher.model={self.model} is not served by {self.url} (it serves {', '.join(names)})")
        served = next((m for m in listed if self.model in (None, m.get("id"))), None)
        if served is not None:
            self.model = served.get("id")
            self.max_positions = served.get("max_model_len")

    def _check_tokenizer(self, tokenizer) -> None:
        for text in self.PROBES:
            want = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            body = {"prompt": text, "add_special_tokens": False, **({"model": self.model} if self.model else {})}
            try:
                got = self.client.request("POST", "/tokenize", body).get("tokens")
            except ValueError as exc:
                raise ValueError(
                    f"teacher.server={self.url} has no usable /tokenize ({exc}); the student's tokenizer cannot be "
                    "compared with the server's. Set teacher.check_tokenizer=false if you are sure they are the same"
                ) from None
            if got != want:
                raise ValueError(
                    f"teacher.server={self.url} tokenizes differently from the student's tokenizer (probe {text!r}: "
                    f"server {got[:8]}..., student {want[:8]}...). Token-level distillation needs one tokenizer; "
                    "use the teacher's tokenizer for the student, or sequence-level distillation (`distill generate`)"
                )

    def describe(self) -> str:
        realized = " + realized token" if self.spec.realized_token else ""
        return f"server {self.url} ({self.model or 'default model'}), top-{self.top_k}{realized} + tail"

    def check_data(self, train_ds, eval_ds) -> None:
        """Nothing to check: the server scores whatever it is sent."""

    def covers(self, split: str) -> bool:
        return True

    def signal(self, batch: dict) -> SparseTarget:
        ids = batch["input_ids"].cpu()
        lengths = batch["attention_mask"].sum(1).tolist()  # right-padded (data.collate)
        seqs = [ids[i, :n].tolist() for i, n in enumerate(lengths)]
        scored = self.scorer.score(seqs, self.top_k, self.temperature)
        b, t = ids.shape
        width = max((len(e[0]) for rows in scored for e in rows if e is not None), default=1)
        out_ids = torch.zeros(b, t - 1, width, dtype=torch.long)
        out_probs = torch.zeros(b, t - 1, width, dtype=torch.float32)
        k = self.top_k
        for i, rows in enumerate(scored):
            for pos, entry in enumerate(rows[1:]):  # entry pos + 1 scores token pos + 1: position pos predicts it
                if entry is None:
                    continue
                tid, lp = entry
                if not self.spec.realized_token and len(tid) > k:  # the top k only; the rest is tail
                    keep = sorted(range(len(tid)), key=lambda j, lp=lp: -lp[j])[:k]
                    tid, lp = [tid[j] for j in keep], [lp[j] for j in keep]
                out_ids[i, pos, : len(tid)] = torch.as_tensor(tid)
                out_probs[i, pos, : len(lp)] = torch.as_tensor(lp, dtype=torch.float64).exp().float()
        # The tail is what the server's entries leave; none when they cover the vocabulary (rounding aside).
        tail = (1.0 - out_probs.double().sum(-1)).clamp_min(0.0)
        tail = tail.masked_fill((out_probs > 0).sum(-1) >= self.vocab_size, 0.0).float()
        return SparseTarget(out_ids.reshape(-1, width), out_probs.reshape(-1, width), tail.reshape(-1)).to(
            batch["input_ids"].device)

    def diagnose(self, batch: dict) -> str | None:
        return None

    def corrector(self, temperature: float):
        from distill.server.client import ServerCorrector

        return ServerCorrector(self.client, self.model, temperature, self.spec.max_in_flight)

    has_states = False  # no hidden states: the hidden-state loss needs a live teacher

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


def layer_states(model, batch: dict) -> tuple[torch.Tensor, ...]:
    """Every hidden state (B, T, H) of ``model`` on ``batch``: 0 = the embeddings' output, i = layer i's (the
    last after the final norm); ``logits_to_keep=1`` skips the full logits."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                logits_to_keep=1, use_cache=False)
    return tuple(out.hidden_states)


class SelfTeacher(LiveTeacher):
    """The student as its own teacher (docs/methods.md §11): a copy of its weights that ``follow`` keeps as
    the exponential moving average ``decay * teacher + (1 - decay) * student`` (``self: ema``), or replaces
    by the student's weights every ``every`` steps (``self: snapshot``: born-again networks within one run;
    plain CE until the first copy). Before step ``start`` the loss is plain CE. The copy is kept in
    checkpoints, so a resumed run continues with the same teacher."""

    kind = "self"

    def __init__(self, spec: SelfTeacherSpec, student, vocab_size: int, device=None):
        super().__init__(copy.deepcopy(student).to(device) if device is not None else copy.deepcopy(student),
                         vocab_size)
        self.spec, self.step = spec, 0
        self.has_copy = spec.self_ == "ema"  # a snapshot teacher exists from its first copy on

    def describe(self) -> str:
        if self.spec.self_ == "ema":
            how = f"moving average of the student's weights (decay {self.spec.decay:g})"
        else:
            how = f"the student's weights frozen every {self.spec.every} steps"
        return f"self-distillation: {how}" + (f", from step {self.spec.start}" if self.spec.start else "")

    @property
    def active(self) -> bool:
        return self.has_copy and self.step >= self.spec.start

    def signal(self, batch: dict) -> DenseSignal | None:
        return super().signal(batch) if self.active else None

    def signal_and_states(self, batch: dict):
        return super().signal_and_states(batch) if self.active else (None, None)

    def covers(self, split: str) -> bool:
        return self.active

    @torch.no_grad()
    def follow(self, student, step: int) -> None:
        """After optimizer step ``step`` (1-based): move the teacher toward the student's new weights."""
        self.step = step
        mine, theirs = list(self.model.parameters()), list(student.parameters())
        if self.spec.self_ == "ema":
            torch._foreach_lerp_(mine, [p.detach() for p in theirs], 1.0 - self.spec.decay)
        elif step % self.spec.every == 0:
            torch._foreach_copy_(mine, [p.detach() for p in theirs])
            self.has_copy = True

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"model.{k}": v.detach().clone() for k, v in self.model.state_dict().items()}
        state["step"] = torch.tensor(self.step)
        state["has_copy"] = torch.tensor(self.has_copy)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
        self.step, self.has_copy = int(state["step"]), bool(state["has_copy"])


class StudentBaseTeacher(LiveTeacher):
    """The LoRA student's own base model (``teacher: {student_base: true}``): the student's forward pass with its
    adapters switched off (``peft``'s ``disable_adapter``) and dropout off. It shares every weight with the
    student, so it costs no memory beyond its activations; since the base weights are frozen it stays the
    model the student started from."""

    kind = "student_base"

    def __init__(self, student, vocab_size: int):
        self.model, self.vocab_size = student, vocab_size  # not frozen or put in eval mode: the student trains

    @property
    def head(self):
        with self._base():
            return output_head(self.model, self.vocab_size)

    def describe(self) -> str:
        return f"the student's base model without its adapters, {count_parameters(self.model) / 1e6:.2f}M parameters"

    @contextlib.contextmanager
    def _base(self):
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.model.disable_adapter():
                yield
        finally:
            self.model.train(training)

    def signal(self, batch: dict) -> DenseSignal:
        with self._base():
            return DenseSignal(flat_positions(final_hidden(self.model, batch)), output_head(self.model, self.vocab_size))

    def signal_and_states(self, batch: dict):
        with self._base():
            states = layer_states(self.model, batch)
            return DenseSignal(flat_positions(states[-1]), output_head(self.model, self.vocab_size)), states

    def diagnose(self, batch: dict) -> str | None:
        with self._base():
            if not torch.isfinite(final_hidden(self.model, batch)).all():
                return "the student's base model (the teacher) has non-finite hidden states"
        return None

    def corrector(self, temperature: float):
        raise ValueError("speculative KD (train.batches=skd) with teacher.student_base is not supported; use a live "
                         "teacher (teacher: {path: ...})")


class MixtureTeacher:
    """Several teachers at once (docs/methods.md §9): each member a live, cached or server teacher checked on
    its own against the run (tokenizer, vocabulary, temperature); the signal holds every member's, and the
    chunked loss forms a chunk of rows of each at a time. Weights are normalized to sum to 1; a member of
    weight 0 only has its KL logged."""

    kind = "mixture"

    def __init__(self, spec: MixtureTeacherSpec, members: list, temperatures: list[float], loss: LossSpec):
        self.spec, self.members, self.temperatures = spec, members, temperatures
        self.names = spec.names()
        total = sum(m.weight for m in spec.teachers)
        self.weights = [m.weight / total for m in spec.teachers]
        if spec.mix == "probability":
            for i, (member, w) in enumerate(zip(members, self.weights, strict=True)):
                if w > 0 and member.kind not in ("live", "self"):
                    raise ValueError(
                        f"teacher.mix=probability mixes the teachers' full distributions, but teacher.teachers[{i}] "
                        f"({self.names[i]}) is a {member.kind} teacher with top-k or sampled targets; use "
                        "teacher.mix=loss (the weighted sum of the divergences to each teacher)")
        self.scores_any_text = all(m.scores_any_text for m in members)
        self.has_states = False
        limits = [m.max_positions for m in members if m.max_positions]
        self.max_positions = min(limits) if limits else None
        kinds = {m.eval_estimates for m in members}
        self.eval_estimates = kinds.pop() if len(kinds) == 1 else ("sampled" if "sampled" in kinds else "topk_tail")
        self.eval_temperature = loss.temperature  # the mixture as trained (members at their own temperatures)

    def describe(self) -> str:
        parts = [f"{n} (weight {w:.3g}, T={t:g}): {m.describe()}"
                 for n, w, t, m in zip(self.names, self.weights, self.temperatures, self.members, strict=True)]
        return f"{len(self.members)} teachers mixed in {self.spec.mix} space: " + "; ".join(parts)

    def check_data(self, train_ds, eval_ds) -> None:
        for m in self.members:
            m.check_data(train_ds, eval_ds)

    def covers(self, split: str) -> bool:
        return all(m.covers(split) for m in self.members)

    def signal(self, batch: dict) -> MixtureSignal:
        return MixtureSignal([m.signal(batch) for m in self.members], self.weights, self.temperatures,
                             self.spec.mix)

    def diagnose(self, batch: dict) -> str | None:
        for name, m in zip(self.names, self.members, strict=True):
            cause = m.diagnose(batch)
            if cause:
                return f"teacher {name}: {cause}"
        return None

    def corrector(self, temperature: float):
        raise ValueError("speculative KD (train.batches=skd) corrects with one teacher; several teachers "
                         "(teacher.teachers) cannot")

    def follow(self, student, step: int) -> None:
        for m in self.members:
            m.follow(student, step)

    def begin_step(self, batches: list[dict], num_tokens, step: int) -> None:
        for m in self.members:
            m.begin_step(batches, num_tokens, step)

    def save_models(self, out_dir, tokenizer) -> None:
        for m in self.members:
            m.save_models(out_dir, tokenizer)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


def _frozen_head(head: LinearHead) -> LinearHead:
    """A copy of an output layer that later updates of the model do not change."""
    return replace(head, weight=head.weight.detach().clone(),
                   bias=None if head.bias is None else head.bias.detach().clone())


class PeersTeacher:
    """Co-distillation (docs/methods.md §13): the student's teachers are its peers, which train in the same
    run. Before each optimizer step (``begin_step``) every model's predictions on the step's micro-batches are
    taken (no gradient; the output layers copied), then each peer takes its own optimizer step toward the
    mixture of the others' (the student included) with the run's loss, and the student's signal for those
    batches is the mixture of the peers' predictions from before their update: all models distill from the
    same, pre-step predictions. Plain CE for every model during ``burn_in`` steps. Batches other than the
    step's (evaluation) get the peers' current predictions. Runs in one process (the peers' gradients are
    not reduced across processes)."""

    kind = "peers"
    eval_estimates = "exact"
    eval_temperature = 1.0
    scores_any_text = True
    has_states = False

    def __init__(self, spec: PeersTeacherSpec, student, models: list, vocab_size: int, loss: LossSpec,
                 optimizer_for, max_grad_norm: float | None, chunk_size: int | None):
        self.spec, self.student, self.models, self.vocab_size, self.loss = spec, student, models, vocab_size, loss
        self.names = [f"peer{i}" for i in range(len(models))]
        self.optimizers = [optimizer_for(m) for m in models]
        self.max_grad_norm, self.chunk_size = max_grad_norm, chunk_size
        self.step = 0
        self.pending: dict[int, object] = {}  # id(batch) -> the student's signal for this step's batches
        for m in models:
            m.train()
        limits = [max_positions(m) for m in models if max_positions(m)]
        self.max_positions = min(limits) if limits else None

    def describe(self) -> str:
        sizes = ", ".join(f"{count_parameters(m) / 1e6:.2f}M" for m in self.models)
        return (f"co-distillation with {len(self.models)} peer(s) ({sizes} parameters)"
                + (f", plain CE for {self.spec.burn_in} steps" if self.spec.burn_in else ""))

    def check_data(self, train_ds, eval_ds) -> None:
        """Nothing to check: the peers score whatever they are given."""

    def covers(self, split: str) -> bool:
        return True

    def _signal_of(self, hidden: list, heads: list, skip: int | None) -> DenseSignal | MixtureSignal:
        """The mixture (equal weights, probability space, the loss temperature) of every model but ``skip``."""
        sigs = [DenseSignal(h, hd) for i, (h, hd) in enumerate(zip(hidden, heads, strict=True)) if i != skip]
        if len(sigs) == 1:
            return sigs[0]
        return MixtureSignal(sigs, [1.0 / len(sigs)] * len(sigs), [self.loss.temperature] * len(sigs),
                             "probability")

    @torch.no_grad()
    def signal(self, batch: dict):
        if id(batch) in self.pending:
            return self.pending[id(batch)]
        if self.step < self.spec.burn_in:
            return None
        was = [m.training for m in self.models]
        for m in self.models:
            m.eval()
        hidden = [flat_positions(final_hidden(m, batch)) for m in self.models]
        for m, w in zip(self.models, was, strict=True):
            m.train(w)
        return self._signal_of(hidden, [output_head(m, self.vocab_size) for m in self.models], None)

    def begin_step(self, batches: list[dict], num_tokens, step: int) -> None:
        """Train every peer one step on ``batches`` toward the others' pre-step predictions; keep the
        peers' pre-step predictions for the student's loss on the same batches."""
        self.pending = {}
        distill = step >= self.spec.burn_in
        everyone = [self.student, *self.models]  # index 0 is the student
        if distill:
            with torch.no_grad():
                heads = [_frozen_head(output_head(m, self.vocab_size)) for m in everyone]
                per_batch = [[flat_positions(final_hidden(m, b)) for m in everyone] for b in batches]
            for b, hidden in zip(batches, per_batch, strict=True):
                self.pending[id(b)] = self._signal_of(hidden[1:], heads[1:], None)
        for k, (model, (optimizer, scheduler)) in enumerate(zip(self.models, self.optimizers, strict=True)):
            for i, b in enumerate(batches):
                teacher = self._signal_of(per_batch[i], heads, k + 1) if distill else None
                labels = b["labels"][:, 1:].reshape(-1)
                hidden = flat_positions(final_hidden(model, b))
                loss, _ = chunked_kd_loss(hidden, output_head(model, self.vocab_size), labels, teacher, num_tokens,
                                          self.loss, chunk_size=self.chunk_size, top1_stats=False)
                loss.backward()
            if self.max_grad_norm is not None and num_tokens > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_grad_norm)
            if num_tokens > 0:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

    def follow(self, student, step: int) -> None:
        self.step, self.pending = step, {}

    def diagnose(self, batch: dict) -> str | None:
        for name, m in zip(self.names, self.models, strict=True):
            with torch.no_grad():
                if not torch.isfinite(final_hidden(m, batch)).all():
                    return f"the hidden states of {name} are non-finite"
        return None

    def corrector(self, temperature: float):
        raise ValueError("speculative KD (train.batches=skd) corrects with one teacher; co-distillation's peers "
                         "cannot")

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"step": torch.tensor(self.step)}
        for k, (model, (optimizer, scheduler)) in enumerate(zip(self.models, self.optimizers, strict=True)):
            state.update({f"peer{k}.model.{n}": t.detach().clone() for n, t in model.state_dict().items()})
            for pid, entry in optimizer.state_dict()["state"].items():
                state.update({f"peer{k}.opt.{pid}.{key}": t.detach().clone() for key, t in entry.items()})
            state[f"peer{k}.last_epoch"] = torch.tensor(scheduler.last_epoch)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.step = int(state["step"])
        for k, (model, (optimizer, scheduler)) in enumerate(zip(self.models, self.optimizers, strict=True)):
            prefix = f"peer{k}.model."
            model.load_state_dict({n[len(prefix):]: t for n, t in state.items() if n.startswith(prefix)})
            opt: dict[int, dict] = {}
            prefix = f"peer{k}.opt."
            for n, t in state.items():
                if n.startswith(prefix):
                    pid, key = n[len(prefix):].split(".", 1)
                    opt.setdefault(int(pid), {})[key] = t
            optimizer.load_state_dict({"state": opt, "param_groups": optimizer.state_dict()["param_groups"]})
            scheduler.last_epoch = int(state[f"peer{k}.last_epoch"])
            for group, base, lam in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
                group["lr"] = base * lam(scheduler.last_epoch)
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]

    def save_models(self, out_dir, tokenizer) -> None:
        """Each peer as an ordinary Hugging Face checkpoint with the tokenizer: ``OUT/peers/peer<i>``."""
        import shutil
        from pathlib import Path

        from distill.checkpoint import commit_dir, tmp_dir_for

        for name, model in zip(self.names, self.models, strict=True):
            final = Path(out_dir) / "peers" / name
            tmp = tmp_dir_for(final)
            shutil.rmtree(tmp, ignore_errors=True)
            save_pretrained(model, tokenizer, tmp)
            commit_dir(tmp, final)


Teacher = (LiveTeacher | CachedTeacher | ServerTeacher | MixtureTeacher | SelfTeacher | PeersTeacher
           | StudentBaseTeacher)


def open_teacher(
    spec: ModelSpec | TeacherCacheSpec | ServerTeacherSpec | MixtureTeacherSpec | SelfTeacherSpec
    | StudentBaseTeacherSpec | None,
    *,
    tokenizer,
    student_ref: str,
    loss: LossSpec,
    seq_len: int,
    vocab_policy: str,
    device,
    student=None,
    field: str = "teacher",
    optimizer_for=None,
    max_grad_norm: float | None = None,
    chunk_size: int | None = None,
) -> Teacher | None:
    """The teacher a config describes, checked against this run (tokenizer, vocabulary, sequence length,
    temperature, divergence), on ``device``; None for ``teacher: null``. ``student``: the model being trained
    (the teacher of self-distillation is a copy of it; co-distillation's peers train beside it, each with
    ``optimizer_for(model) -> (optimizer, scheduler)``, ``max_grad_norm`` and the loss's ``chunk_size``)."""
    if spec is None:
        return None
    if isinstance(spec, PeersTeacherSpec):
        if student is None or optimizer_for is None:
            raise ValueError(f"{field}.peers: co-distillation trains its peers with the student (distill train)")
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise ValueError(f"{field}.peers: co-distillation runs in one process (the peers' gradients are not "
                             "averaged across processes); launch it without accelerate's --num_processes")
        models = []
        for i, peer in enumerate(spec.peers):
            where = f"{field}.peers[{i}]"
            peer_tok = load_tokenizer(peer, where)
            try:
                check_tokenizers_agree(tokenizer, peer_tok, student_ref, peer.tokenizer or peer.path)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
            model = load_model(peer, where, peer_tok)
            resolve_vocab(model, len(tokenizer), where, vocab_policy)
            models.append(model.to(device))
        return PeersTeacher(spec, student, models, len(tokenizer), loss, optimizer_for, max_grad_norm, chunk_size)
    if isinstance(spec, MixtureTeacherSpec):
        members, temps = [], []
        for i, (name, member) in enumerate(zip(spec.names(), spec.teachers, strict=True)):
            t = member.temperature if member.temperature is not None else loss.temperature
            where = f"teacher.teachers[{i}]"
            try:
                members.append(open_teacher(member, tokenizer=tokenizer, student_ref=student_ref,
                                            loss=replace(loss, temperature=t), seq_len=seq_len,
                                            vocab_policy=vocab_policy, device=device, field=where))
            except ValueError as exc:
                raise ValueError(f"{where} ({name}): {exc}") from None
            temps.append(t)
        return MixtureTeacher(spec, members, temps, loss)
    if isinstance(spec, SelfTeacherSpec):
        if student is None:
            raise ValueError(f"{field}.self: self-distillation needs the student being trained (distill train)")
        return SelfTeacher(spec, student, len(tokenizer), device)
    if isinstance(spec, StudentBaseTeacherSpec):
        if student is None or not hasattr(student, "disable_adapter"):
            raise ValueError(f"{field}.student_base: the teacher is the base model of a LoRA student being trained "
                             "(distill train with student.lora)")
        return StudentBaseTeacher(student, len(tokenizer))
    if isinstance(spec, TeacherCacheSpec):
        return CachedTeacher(spec, tokenizer, loss, seq_len, device)
    if isinstance(spec, ServerTeacherSpec):
        return ServerTeacher(spec, tokenizer, loss)
    teacher_tok = load_tokenizer(spec, field)
    check_tokenizers_agree(tokenizer, teacher_tok, student_ref, spec.tokenizer or spec.path)
    model = load_model(spec, field, teacher_tok)
    resolve_vocab(model, len(tokenizer), field, vocab_policy)
    model = model.to(device)
    if sharding.is_sharded():  # an FSDP run: the teacher is sharded too, never whole on one process
        model = sharding.shard_for_inference(model.requires_grad_(False))
    return LiveTeacher(model, len(tokenizer))


def hidden_state_loss(hidden: HiddenLossConfig, student, teacher, seed: int = 0) -> HiddenStateLoss:
    """The hidden-state loss term (docs/methods.md §12) between ``student`` and a teacher with hidden states,
    its layer map checked against both models and its projections (where the widths differ) initialized
    from ``seed``."""
    if teacher is None or not teacher.has_states:
        what = "no teacher" if teacher is None else f"a {teacher.kind} teacher, which has no hidden states"
        raise ValueError(f"loss.hidden needs the hidden states of a live teacher (teacher: {{path: ...}} or "
                         f"{{config: ...}} or self-distillation), but the run has {what}; set loss.hidden=null or "
                         "use a live teacher")
    s_layers, t_layers = student.config.num_hidden_layers, teacher.model.config.num_hidden_layers
    s_width, t_width = student.config.hidden_size, teacher.model.config.hidden_size
    pairs = uniform_layer_map(s_layers, t_layers) if hidden.layers == "uniform" else dict(hidden.layers)
    for s_i, t_i in pairs.items():
        for who, i, n in (("student", s_i, s_layers), ("teacher", t_i, t_layers)):
            if not 0 <= i <= n:
                raise ValueError(
                    f"loss.hidden.layers: {s_i}: {t_i} names {who} hidden state {i}, but the {who} has hidden states "
                    f"0..{n} (0 = the embeddings' output, {n} = the last layer's, after the final norm)")
    if hidden.projection == "none" and s_width != t_width:
        raise ValueError(f"loss.hidden.projection=none, but the student's hidden states have width {s_width} and the "
                         f"teacher's {t_width}; use projection: auto (a learned linear map) or a teacher of the "
                         "student's width")
    project = hidden.projection == "linear" or s_width != t_width
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = HiddenStateLoss(sorted(pairs.items()), s_width, t_width, distance=hidden.distance,
                                 weight=hidden.weight, final_weight=hidden.final_weight, project=project)
    if not math.isfinite(hidden.weight + hidden.final_weight) or hidden.weight + hidden.final_weight == 0:
        logger.warning("loss.hidden: weight and final_weight are both 0; the term is computed but adds nothing")
    return module
