"""Teachers: the one place in distill with several implementations.

A teacher is opened once from its config by :func:`open_teacher` (the only branch on the config's kind),
checks there that it fits the run, and then, for any batch, returns its **signal** for the batch's
next-token positions (``labels[:, 1:]``, flattened to ``B * (T - 1)`` rows):

* :class:`LiveTeacher` (``teacher: {path: DIR}`` or ``{config: ...}``): a Hugging Face model in this
  process. Dense signal: its final hidden states and output layer (:class:`distill.chunked.DenseSignal`);
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

Adding a kind of teacher: a spec in ``config.py`` (a member of ``TeacherSpec``), a class here with the
same attributes and methods as these two, and its branch in :func:`open_teacher`. The train and eval
code only calls ``signal``, ``diagnose``, ``covers``, ``check_data``, ``describe`` and (speculative KD)
``corrector``.
"""

from __future__ import annotations

import logging

import torch

from distill.cache import TeacherCache, data_fingerprint
from distill.chunked import DenseSignal
from distill.config import ModelSpec, ServerTeacherSpec, TeacherCacheSpec
from distill.losses import LossSpec, SparseTarget
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

    @torch.no_grad()
    def signal(self, batch: dict) -> DenseSignal:
        return DenseSignal(flat_positions(final_hidden(self.model, batch)), self.head)

    def corrector(self, temperature: float):
        """Speculative KD's teacher side (:func:`distill.generate.corrected_sample`)."""
        from distill.generate import LiveCorrector

        return LiveCorrector(self.model, temperature)

    @torch.no_grad()
    def diagnose(self, batch: dict) -> str | None:
        """A cause for a non-finite loss that lies with the teacher, or None."""
        if not torch.isfinite(final_hidden(self.model, batch)).all():
            return "the teacher's hidden states are non-finite (a broken teacher checkpoint or fp16 overflow)"
        return None


class CachedTeacher:
    """Targets from ``distill cache``, one :class:`~distill.cache.TeacherCache` per captured split; sparse
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


class ServerTeacher:
    """A teacher behind an HTTP server, scored on token ids (:mod:`distill.remote`); sparse signal: the
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

        from distill.remote import Client, NoPromptLogprobs, Scorer, max_abs_difference

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
        from distill.remote import ServerCorrector

        return ServerCorrector(self.client, self.model, temperature, self.spec.max_in_flight)


Teacher = LiveTeacher | CachedTeacher | ServerTeacher


def open_teacher(
    spec: ModelSpec | TeacherCacheSpec | ServerTeacherSpec | None,
    *,
    tokenizer,
    student_ref: str,
    loss: LossSpec,
    seq_len: int,
    vocab_policy: str,
    device,
) -> Teacher | None:
    """The teacher a config describes, checked against this run (tokenizer, vocabulary, sequence length,
    temperature, divergence), on ``device``; None for ``teacher: null``."""
    if spec is None:
        return None
    if isinstance(spec, TeacherCacheSpec):
        return CachedTeacher(spec, tokenizer, loss, seq_len, device)
    if isinstance(spec, ServerTeacherSpec):
        return ServerTeacher(spec, tokenizer, loss)
    teacher_tok = load_tokenizer(spec, "teacher")
    check_tokenizers_agree(tokenizer, teacher_tok, student_ref, spec.tokenizer or spec.path)
    model = load_model(spec, "teacher", teacher_tok)
    resolve_vocab(model, len(tokenizer), "teacher", vocab_policy)
    return LiveTeacher(model.to(device), len(tokenizer))
