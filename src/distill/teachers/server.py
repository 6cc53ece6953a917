"""A server teacher: a model behind an HTTP server, scored on token ids (``teacher: {server: URL}``); sparse
signal."""

from __future__ import annotations

import os

import torch

from distill.config import ServerTeacherSpec
from distill.losses import LossSpec, SparseTarget
from distill.server.client import Client, NoPromptLogprobs, Scorer, ServerCorrector, max_abs_difference


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
