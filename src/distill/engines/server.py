"""An engine behind an OpenAI-compatible server (vLLM, SGLang, ``distill serve``), through
:mod:`distill.server.client`: scored on token ids (sparse: top-k + the realized token + the tail mass; with
``top_k: all`` every id and no tail; with ``signal: hidden``, ``distill serve``'s final hidden states and its
output layer, the dense signal of a teacher in this process), sampled with ``/v1/completions`` or
``/v1/chat/completions``, and SKD's corrections one request per token."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from distill.config import ServerTeacherSpec
from distill.errors import TeacherServerError
from distill.generation.sampling import SamplingParams, row_seed
from distill.losses import DenseSignal, LinearHead, SparseTarget
from distill.models import flat_positions
from distill.server.client import (
    SCORING_FIELDS,
    Client,
    NoHiddenStates,
    NoPromptLogprobs,
    PositionLogprobs,
    Scorer,
    ServerRefusal,
    explain,
    fetch_output_head,
    max_abs_difference,
)

# The settings behind each request, named when a server refuses it (client.explain).
CACHE_FIELDS = {**SCORING_FIELDS, "logprobs": "k", "temperature": "temperature"}
GENERATE_FIELDS = {"logprobs": "logprobs (distill generate asks for each sampled token's log-prob)",
                   "length": "sampling.max_new_tokens or the prompts' length", "temperature": "sampling.temperature",
                   "n": "n"}
SKD_FIELDS = {"logprobs": "train.batches.skd_top_k", "length": "data.seq_len or train.batches.max_new_tokens",
              "temperature": "train.batches.skd_teacher_temperature (default: loss.temperature)"}


class ServerEngine:
    """A model behind a server (:mod:`distill.engines.base` for what an engine does). Opened for scoring (a
    ``temperature``), it first refuses a server that cannot be used: no prompt log-probabilities (OpenAI API,
    llama.cpp: use ``distill generate`` for those), another tokenizer than ``tokenizer`` (``/tokenize`` on
    probe texts), scores that differ between two requests for the same sequence (prefix caching, replicas),
    or log-probabilities that ignore a temperature other than 1 (vLLM's raw mode). Opened to sample only
    (``temperature=None``), it checks nothing: an API without prompt log-probabilities still generates.

    ``top_k: all`` asks for every id (``prompt_logprobs: -1``; SGLang: the vocabulary's size): the signal is
    then the whole distribution at the engine's temperature, with no tail. ``signal: hidden`` (``distill
    serve`` only) makes it dense: the output layer is downloaded once at start (``GET /v1/output_head``,
    checked against the student's vocabulary) and each batch's final hidden states come back packed
    (``return_hidden_states``), so the loss forms the logits chunk by chunk as for a teacher in this process."""

    hidden_states = False  # only the final ones: no hidden-state loss
    model = None  # nothing in this process

    PROBES = ("def distill(teacher, student):\n    return student", "The quick brown fox, 1234 + 5678 = 6912.",
              "Ünïcödé ✓ and\ttabs")

    def __init__(self, spec: ServerTeacherSpec, tokenizer, *, temperature: float | None = None,
                 top_k: int | None = None):
        key = os.environ.get(spec.api_key_env) if spec.api_key_env else None
        if spec.api_key_env and not key:
            raise ValueError(f"teacher.api_key_env={spec.api_key_env}: that environment variable is not set")
        self.spec, self.url = spec, spec.server.rstrip("/")
        self.vocab_size = len(tokenizer) if tokenizer is not None else None
        # top_k given: distill cache's k; else the teacher spec's top_k (training, evaluation).
        self.whole = top_k is None and spec.top_k == "all"
        self.top_k = top_k if top_k is not None else (self.vocab_size if self.whole else spec.top_k)
        self.dense = temperature is not None and spec.signal == "hidden"
        self.max_top_k = self.vocab_size if self.dense else self.top_k
        # The whole vocabulary is prompt_logprobs -1 (vLLM, distill serve); SGLang takes a count.
        self.request_k = -1 if self.whole and spec.api != "sglang" else self.top_k
        self.temperature = temperature
        self._head: LinearHead | None = None
        self.client = Client(self.url, api_key=key, timeout=spec.timeout, retries=spec.retries)
        self.max_positions = None
        self.served = spec.model  # the model name requests carry (the server's only one when not given)
        if temperature is not None and spec.api != "sglang":
            self._check_model()
        fields = dict(SCORING_FIELDS if top_k is None else CACHE_FIELDS, whole_vocabulary=self.whole)
        self.scorer = Scorer(self.client, self.served, api="sglang" if spec.api == "sglang" else "vllm",
                             max_in_flight=spec.max_in_flight, fields=fields)
        if temperature is not None:
            self._check_scoring(tokenizer)

    # ---- the start-up checks

    def _check_model(self) -> None:
        try:
            listed = self.client.request("GET", "/v1/models").get("data", [])
        except ValueError:
            return  # no model list on this server: the completions request names the model or not
        names = [m.get("id") for m in listed]
        if self.served is None and len(names) > 1:
            raise ValueError(f"teacher.server={self.url} serves several models ({', '.join(names)}); set teacher.model")
        if self.served is not None and names and self.served not in names:
            raise ValueError(f"teacher.model={self.served} is not served by {self.url} (it serves {', '.join(names)})")
        served = next((m for m in listed if self.served in (None, m.get("id"))), None)
        if served is not None:
            self.served = served.get("id")
            self.max_positions = served.get("max_model_len")

    def _check_scoring(self, tokenizer) -> None:
        """The tokenizer probe, prompt log-probabilities, determinism and the temperature (class docstring)."""
        if self.spec.check_tokenizer:
            self._check_tokenizer(tokenizer)
        probe = list(tokenizer(" ".join(self.PROBES), add_special_tokens=False)["input_ids"])[:64]
        if tokenizer.bos_token_id is not None:
            probe = [tokenizer.bos_token_id, *probe]
        if self.dense:
            self._check_hidden(probe)
            return
        try:
            first = self.scorer.score_one(probe, self.request_k, self.temperature)
        except NoPromptLogprobs:
            raise ValueError(
                f"teacher.server={self.url} returns no prompt log-probabilities (the OpenAI API and llama.cpp do "
                "not), which token-level distillation needs. Distill from its text instead: `distill generate` "
                "with this server, then train on the output (sequence-level KD)"
            ) from None
        second = self.scorer.score_one(probe, self.request_k, self.temperature)
        self._check_drift(max_abs_difference(first, second))
        if self.temperature != 1.0:
            at_one = self.scorer.score_one(probe, self.request_k, 1.0)
            if max_abs_difference(first, at_one) < 1e-6:
                raise ValueError(
                    f"teacher.server={self.url} returns log-probs at T=1 whatever the request's temperature (vLLM's "
                    f"default raw mode), but loss.temperature={self.temperature:g}. Start vLLM with --logprobs-mode "
                    "processed_logprobs (distill serve --logprobs-mode processed), or set loss.temperature=1"
                )

    def _check_drift(self, drift: float) -> None:
        tolerance = self.spec.determinism_tolerance
        if drift > tolerance:
            raise ValueError(
                f"teacher.server={self.url} scored the same sequence twice and the log-probs differ by up to {drift:.3g} "
                f"(> teacher.determinism_tolerance={tolerance:g}): prefix caching or several replicas "
                "disagree by more than the distillation signal. Disable prefix caching / pin one replica, or raise "
                "the tolerance if you accept the noise"
            )

    def _check_hidden(self, probe: list[int]) -> None:
        """``signal: hidden``: the output layer (downloaded once, its classes the student's vocabulary), then two
        scorings of the probe whose log-probs through it agree within the tolerance."""
        try:
            got = fetch_output_head(self.client, self.served)
            first = self.scorer.hidden_one(probe)
        except NoHiddenStates:
            raise ValueError(
                f"teacher.server={self.url} returns no hidden states or output layer (vLLM and SGLang do not; distill "
                "serve does): set teacher.signal=logprobs, with teacher.top_k=all for the whole vocabulary (the "
                "server started with --max-logprobs -1)") from None
        if got["vocab_size"] != self.vocab_size:
            raise ValueError(
                f"teacher.server={self.url} has an output layer of {got['vocab_size']} classes, the tokenizer it is "
                f"read with (the student's, or teacher.tokenizer with loss.crosstok) {self.vocab_size} ids: "
                "set teacher.tokenizer to the served model's own tokenizer (with loss.crosstok), or use the "
                "teacher's tokenizer for the student")
        self._head = LinearHead(got["weight"], got["bias"], logit_scale=got["logit_scale"], softcap=got["softcap"],
                                vocab_size=got["vocab_size"])
        if first.shape[-1] != got["weight"].shape[1]:
            raise TeacherServerError(f"teacher server {self.url}: hidden states of width {first.shape[-1]} for an "
                                     f"output layer of width {got['weight'].shape[1]}")
        second = self.scorer.hidden_one(probe)
        lp_a, lp_b = (torch.log_softmax(self._head.logits(h).float(), -1) for h in (first, second))
        self._check_drift(float((lp_a - lp_b).abs().max()))

    def _check_tokenizer(self, tokenizer) -> None:
        for text in self.PROBES:
            want = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            body = {"prompt": text, "add_special_tokens": False, **({"model": self.served} if self.served else {})}
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

    # ---- scoring

    def describe(self) -> str:
        what = f"server {self.url} ({self.served or 'default model'})"
        if self.temperature is None:  # it only samples
            return what
        if self.dense:
            return what + f", final hidden states + output layer ({self.vocab_size} classes, exact)"
        if self.whole:
            return what + f", whole vocabulary ({self.vocab_size} log-probs per position, no tail)"
        return what + f", top-{self.top_k}{' + realized token' if self.spec.realized_token else ''} + tail"

    @property
    def head(self) -> LinearHead:
        """The teacher's output layer (``signal: hidden``), as downloaded at start."""
        return self._head

    def hidden(self, batch: dict) -> torch.Tensor:
        """The final hidden states (B, T, H) of the batch from the server (zeros past each row's length)."""
        ids = batch["input_ids"].cpu()
        lengths = batch["attention_mask"].sum(1).tolist()  # right-padded (data.collate)
        states = self.scorer.hidden([ids[i, :n].tolist() for i, n in enumerate(lengths)])
        out = torch.zeros(*ids.shape, states[0].shape[-1], dtype=states[0].dtype)
        for i, (row, n) in enumerate(zip(states, lengths, strict=True)):
            out[i, :n] = row
        return out.to(batch["input_ids"].device)

    def top_logprobs(self, seqs: list[list[int]], k: int, temperature: float) -> list[list[PositionLogprobs]]:
        """Per sequence and position: the top-``k`` ids and the realized token with their log-probs at
        ``temperature`` (None at the first position)."""
        return self.scorer.score(seqs, k, temperature)

    def score(self, batch: dict) -> SparseTarget | DenseSignal:
        """The top-k and the realized token with their probabilities at the engine's temperature, and the tail
        (none with every id); ``signal: hidden``: the hidden states and the output layer."""
        if self.dense:
            device = batch["input_ids"].device
            if self._head.weight.device != device:
                self._head = LinearHead(self._head.weight.to(device), None if self._head.bias is None else
                                        self._head.bias.to(device), self._head.logit_scale, self._head.softcap,
                                        self._head.vocab_size)
            return DenseSignal(flat_positions(self.hidden(batch)), self._head)
        ids = batch["input_ids"].cpu()
        lengths = batch["attention_mask"].sum(1).tolist()  # right-padded (data.collate)
        scored = self.top_logprobs([ids[i, :n].tolist() for i, n in enumerate(lengths)], self.request_k,
                                   self.temperature)
        b, t = ids.shape
        width = max((len(e[0]) for rows in scored for e in rows if e is not None), default=1)
        out_ids = torch.zeros(b, t - 1, width, dtype=torch.long)
        out_probs = torch.zeros(b, t - 1, width, dtype=torch.float32)
        counts = torch.zeros(b, t - 1, dtype=torch.long)
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
                counts[i, pos] = len(tid)
        # The tail is what the server's entries leave; none when they cover the vocabulary (rounding aside).
        tail = (1.0 - out_probs.double().sum(-1)).clamp_min(0.0)
        tail = tail.masked_fill(counts >= self.vocab_size, 0.0).float()
        return SparseTarget(out_ids.reshape(-1, width), out_probs.reshape(-1, width), tail.reshape(-1)).to(
            batch["input_ids"].device)

    # ---- sampling and correction

    def sample(self, rows: list[dict], keys: list[str], params: SamplingParams, *, n: int, seed: int,
               logprobs: bool, batch_size: int, on_batch=None) -> list[list[dict]]:
        """One request per prompt (``n`` samples, a seed from the prompt's key), ``max_in_flight`` at a time;
        token ids when the row has them, else text (chat prompts through /v1/chat/completions)."""
        with ThreadPoolExecutor(max_workers=self.spec.max_in_flight) as pool:
            futures = [pool.submit(self._samples_of, row, key, params, n, seed, logprobs)
                       for row, key in zip(rows, keys, strict=True)]
            out = []
            for f in futures:
                out.append(f.result())
                if on_batch is not None:
                    on_batch(sum(s["response_tokens"] or 0 for s in out[-1]))
        return out

    def _samples_of(self, row: dict, key: str, p: SamplingParams, n: int, seed: int, logprobs: bool) -> list[dict]:
        body = {"n": n, "seed": row_seed(seed, key) & 0x7FFFFFFF, "temperature": p.temperature, "top_p": p.top_p,
                "max_tokens": p.max_new_tokens, **({"model": self.served} if self.served else {})}
        if p.top_k:
            body["top_k"] = p.top_k
        if row["ids"] is None and row["format"] == "messages":
            body.update(messages=row["value"], logprobs=logprobs)
            resp = self._request("/v1/chat/completions", body)
        else:
            body.update(prompt=row["ids"] if row["ids"] is not None else row["value"],
                        stop_token_ids=list(p.stop_ids) if row["ids"] is not None else [])
            if logprobs:
                body["logprobs"] = 1
            resp = self._request("/v1/completions", body)
        out = []
        for j, choice in enumerate(sorted(resp.get("choices", []), key=lambda c: c.get("index", 0))):
            if "message" in choice:
                text = choice["message"].get("content") or ""
                lps = [t["logprob"] for t in ((choice.get("logprobs") or {}).get("content") or [])]
            else:
                text = choice.get("text", "")
                lps = (choice.get("logprobs") or {}).get("token_logprobs") or []
            out.append({"sample": j, "response": text, "response_tokens": len(lps) or None,
                        "finished": choice.get("finish_reason") == "stop",
                        "_mean_logprob": sum(lps) / len(lps) if lps else None})
        if len(out) != n:
            raise TeacherServerError(f"teacher server {self.spec.server} returned {len(out)} samples, not n={n}")
        return out

    def _request(self, path: str, body: dict) -> dict:
        try:
            return self.client.request("POST", path, body)
        except ServerRefusal as exc:
            raise explain(exc, GENERATE_FIELDS) from None

    def corrector(self, temperature: float) -> Correction:
        return Correction(self.client, self.served, temperature, self.spec.max_in_flight)


class Correction:
    """Speculative KD's teacher side behind a server (:class:`~distill.engines.base.Corrector`): for each
    sequence still being written, one request per token (the prefix as ids, ``max_tokens: 1``, ``logprobs: K``)
    gives the teacher's top-K at the next position and a sample of its own (seeded from the row's uniform).
    The answer's ``top_logprobs`` hold the top K and the sampled token (vLLM adds it, ranked K + 1, when it is
    outside them): the K most probable of them are the top K. Requests run ``max_in_flight`` at a time. Needs
    ``return_tokens_as_token_ids`` (vLLM, distill serve)."""

    def __init__(self, client: Client, model: str | None, temperature: float, max_in_flight: int = 8):
        self.client, self.model, self.temperature, self.max_in_flight = client, model, temperature, max_in_flight
        self.prefixes: list[list[int]] = []

    def prefill(self, ids_BP, mask_BP) -> None:
        self.prefixes = [row[m.bool()].tolist() for row, m in zip(ids_BP.cpu(), mask_BP.cpu(), strict=True)]

    def _one(self, prefix: list[int], k: int, seed: int) -> tuple[set[int], int]:
        body = {"prompt": prefix, "max_tokens": 1, "temperature": self.temperature, "logprobs": k, "seed": seed,
                "return_tokens_as_token_ids": True, "ignore_eos": True, **({"model": self.model} if self.model else {})}
        try:
            choice = self.client.request("POST", "/v1/completions", body)["choices"][0]
        except ServerRefusal as exc:
            raise explain(exc, SKD_FIELDS) from None
        lp = choice.get("logprobs") or {}
        tokens, tops = lp.get("tokens") or [], lp.get("top_logprobs") or []
        if not tokens or not tops or tops[0] is None:
            raise TeacherServerError(f"teacher server {self.client.url}: no token ids / top log-probs in the answer "
                                     "(it needs return_tokens_as_token_ids and logprobs)")
        as_id = lambda t: int(str(t).rsplit(":", 1)[-1])  # noqa: E731  "token_id:123"
        top_k = sorted(tops[0].items(), key=lambda kv: -kv[1])[:k]
        return {as_id(t) for t, _ in top_k}, as_id(tokens[0])

    def check(self, proposed_B, k: int, u_B, active_B=None):
        b = len(self.prefixes)
        active = [True] * b if active_B is None else active_B.tolist()
        seeds = [int(u * 2**31) for u in u_B.tolist()]
        rows = [i for i in range(b) if active[i]]
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_in_flight, len(rows)))) as pool:
            answers = dict(zip(rows, pool.map(lambda i: self._one(self.prefixes[i], k, seeds[i]), rows), strict=True))
        proposed = proposed_B.tolist()
        inside = [i not in answers or proposed[i] in answers[i][0] for i in range(b)]
        sample = [answers[i][1] if i in answers else proposed[i] for i in range(b)]
        return (torch.tensor(inside, device=proposed_B.device), torch.tensor(sample, device=proposed_B.device))

    def step(self, tokens_B) -> None:
        for prefix, tok in zip(self.prefixes, tokens_B.tolist(), strict=True):
            prefix.append(tok)
