"""An OpenAI-compatible HTTP server for any Hugging Face causal LM (``distill serve MODEL_DIR``).

It exists so that a teacher can live in another process or on other machines and still be distilled from:
its answers have vLLM's shape, so the same client (``teacher: {server: URL}``) talks to ``distill serve``,
vLLM and SGLang alike.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /tokenize``, ``POST /v1/completions`` (prompt as
text or token ids, one or several; ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``n``, ``seed``,
``logprobs``, ``echo``, and vLLM's extensions ``prompt_logprobs``, ``return_tokens_as_token_ids`` and
``return_token_ids``), ``POST /v1/chat/completions`` (``messages``, ``logprobs``, ``top_logprobs``), and
SGLang's native ``POST /generate`` for scoring (``input_ids`` or ``text``, ``return_logprob``,
``logprob_start_len``, ``top_logprobs_num``, ``sampling_params: {max_new_tokens: 0}``; the answer's
``meta_info`` in SGLang's shape), what the client's SGLang path (``teacher.api: sglang``) sends.

* **vLLM's rules.** A request is checked as vLLM checks it, and refused with vLLM's status and error body, so
  that a client that works with ``distill serve`` works with vLLM: ``max_tokens`` is at least 1, except
  ``max_tokens: 0`` with ``echo: true`` (score the prompt only: the choice holds the prompt's text and its
  ``prompt_logprobs``); temperature in [0, 2]; top_p in (0, 1]; ``n`` 1 when greedy; log-prob counts >= 0 or
  -1 (the vocabulary) and at most ``--max-logprobs``; the prompt plus ``max_tokens`` within the context.
  Each rule names the vLLM source it follows where it is checked; ``tests/test_engine_contract.py`` holds one
  request per rule.
* **Log-probabilities.** ``prompt_logprobs: K`` gives, for every prompt position after the first, the K
  most probable tokens, and always the prompt's own token, as ``{token_id: {logprob, rank, decoded_token}}``
  (the first position is ``null``), like vLLM. With ``--logprobs-mode raw`` (the default, vLLM's default too)
  they are the model's at T = 1 whatever the request's temperature; with ``processed`` they are at the
  request's ``temperature``. ``K`` and ``logprobs`` are capped by ``--max-logprobs`` (20 by default, as vLLM;
  -1, as vLLM's, lifts the cap: ``prompt_logprobs: -1`` then returns the whole vocabulary).
* **Hidden states** (distill serve's own, not vLLM's): ``return_hidden_states: true`` on ``/v1/completions``
  adds ``hidden_states`` to each choice, the prompt's final (post-norm) hidden states (T, H) in the model's
  dtype, packed by :func:`distill.server.client.encode_array` (base64 of the little-endian bytes, with dtype
  and shape); ``GET /v1/output_head`` returns the output layer once (``weight``, ``bias``, ``logit_scale``,
  ``softcap``, ``vocab_size``), so a client forms every logit itself (``teacher: {server: URL, signal:
  hidden}``).
* **Batching.** Requests from many clients are queued and run together on the model: every scoring request
  waiting joins one forward pass, every generation request with the same sampling settings joins one
  decoding batch (``distill.generation.sampling.sample``, per-sequence seeds: a request with ``seed`` gets the same
  samples whoever else is in its batch).
* **Errors** come back in vLLM's shape (``{"error": {"message", "type", "param", "code"}}``, ``code`` the
  HTTP status) with a 4xx: malformed JSON, unknown fields' types, an unknown model name (404), a request vLLM
  refuses (400, the parameter and value after the message, as vLLM writes them), a missing or wrong API key
  (401). The server keeps serving.

Binds to 127.0.0.1 unless ``--host`` says otherwise; ``--api-key-env VAR`` requires ``Authorization: Bearer
$VAR``. Built on FastAPI + uvicorn (the ``serve`` extra).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from distill.config import ModelSpec
from distill.generation.sampling import SamplingParams, row_seed, sample
from distill.models import (
    final_hidden,
    has_accelerator,
    load_model,
    load_tokenizer,
    max_positions,
    output_head,
    resolve_vocab,
)
from distill.server.client import encode_array
from distill.server.weights import add_weight_routes

logger = logging.getLogger("distill")


class ServeError(Exception):
    """A request the server refuses, answered as vLLM answers: the HTTP status and ``{"error": {"message",
    "type", "param", "code"}}`` with the status as ``code`` and vLLM's type for it (``BadRequestError``, ...;
    vllm/entrypoints/serve/exception_handling/error_response.py, ``create_error_response``)."""

    TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | int | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = status if code is None else code
        self.kind = kind or self.TYPES.get(status, "BadRequestError")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _invalid(message: str, param: str, value: Any = None) -> ServeError:
    """vLLM's ``VLLMValidationError`` as it reaches the client: 400, the parameter and value after the message
    (vllm/exceptions.py, ``VLLMValidationError.__str__``)."""
    extras = [f"parameter={param}", *([f"value={value}"] if value is not None else [])]
    return ServeError(400, f"{message} ({', '.join(extras)})", param)


# ------------------------------------------------------------------------------------------- the engine


@dataclass
class _Job:
    kind: Literal["score", "hidden", "generate"]  # hidden: each sequence's final hidden states (T, H), on the CPU
    sequences: list[list[int]]
    k: int = 0  # top log-probs per position (score)
    temperature: float = 1.0  # score: the temperature of the returned log-probs
    params: SamplingParams | None = None  # generate
    seeds: list[int] | None = None
    future: Future = field(default_factory=Future)


class ServedModel:
    """A model, its tokenizer and the worker thread that runs queued requests in batches."""

    def __init__(self, model, tokenizer, name: str, *, max_logprobs: int = 20, logprobs_mode: str = "raw",
                 max_batch_tokens: int = 16384, max_batch_sequences: int = 64):
        self.model, self.tokenizer, self.name = model.eval().requires_grad_(False), tokenizer, name
        self.vocab = len(tokenizer)
        self.head = output_head(model, self.vocab)
        self.max_len = max_positions(model) or 2**31
        # -1: no cap, the vocabulary (vllm/sampling_params.py, SamplingParams._validate_logprobs).
        self.max_logprobs = self.vocab if max_logprobs == -1 else max_logprobs
        self.logprobs_mode = logprobs_mode
        self.max_batch_tokens, self.max_batch_sequences = max_batch_tokens, max_batch_sequences
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.device = next(model.parameters()).device
        self.stats = {"batches": 0, "jobs": 0, "sequences": 0}
        self._decoded: list[str] | None = None
        # Held while a batch runs: what changes the model (a weight swap) takes it to wait for the batch's end.
        self.weights_lock = threading.Lock()
        # LoRA adapters loaded at run time (vLLM's /v1/load_lora_adapter): their names answer as the model does,
        # with the adapter merged into the served weights (server/weights.py).
        self.adapters: dict[str, str] = {}
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="distill-serve-engine", daemon=True)
        self._worker.start()

    def submit(self, job: _Job) -> Future:
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._queue.put(None)

    # ---- the worker

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job]
            # Everything already waiting joins this round (up to the batch limits).
            while len(jobs) < self.max_batch_sequences:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                jobs.append(nxt)
            self.stats["batches"] += 1
            self.stats["jobs"] += len(jobs)
            scoring = [j for j in jobs if j.kind in ("score", "hidden")]
            groups: dict[SamplingParams, list[_Job]] = {}
            for j in jobs:
                if j.kind == "generate":
                    groups.setdefault(j.params, []).append(j)
            for batch in self._split(scoring):
                self._guard(batch, self._score_jobs)
            for params, group in groups.items():
                for batch in self._split(group):
                    self._guard(batch, lambda b, p=params: self._generate_jobs(b, p))

    def _split(self, jobs: list[_Job]) -> list[list[_Job]]:
        out, cur, tokens = [], [], 0
        for j in jobs:
            size = sum(len(s) for s in j.sequences)
            if cur and (tokens + size > self.max_batch_tokens or len(cur) >= self.max_batch_sequences):
                out.append(cur)
                cur, tokens = [], 0
            cur.append(j)
            tokens += size
        if cur:
            out.append(cur)
        return out

    def _guard(self, batch: list[_Job], fn) -> None:
        try:
            with self.weights_lock:
                results = fn(batch)
            for job, res in zip(batch, results, strict=True):
                job.future.set_result(res)
        except Exception as exc:  # a failing batch answers its requests with the error; the worker goes on
            logger.exception("batch failed")
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)

    @torch.no_grad()
    def _score_jobs(self, jobs: list[_Job]) -> list[list[list[dict | None]]]:
        seqs = [s for j in jobs for s in j.sequences]
        self.stats["sequences"] += len(seqs)
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):  # right-padded: positions start at 0 for every row
            ids[i, : len(s)] = torch.as_tensor(s)
            mask[i, : len(s)] = 1
        hidden = final_hidden(self.model, {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)})
        out, row = [], 0
        for j in jobs:
            per_job = []
            for s in j.sequences:
                if j.kind == "hidden":
                    per_job.append(hidden[row, : len(s)].cpu())
                else:
                    per_job.append(self._position_logprobs(hidden[row, : len(s) - 1], s, j.k, j.temperature))
                row += 1
            out.append(per_job)
        return out

    def _position_logprobs(self, hidden_TH: torch.Tensor, seq: list[int], k: int, temperature: float,
                           chunk: int = 256) -> list[dict | None]:
        """vLLM's prompt_logprobs for one sequence: None, then per position the top-k and the realized token."""
        result: list[dict | None] = [None]
        targets = torch.as_tensor(seq[1:], device=hidden_TH.device)
        temp = temperature if self.logprobs_mode == "processed" else 1.0
        for c0 in range(0, hidden_TH.shape[0], chunk):
            z = self.head.logits(hidden_TH[c0 : c0 + chunk]).float()
            lp = torch.log_softmax(z / temp if temp != 1.0 else z, dim=-1)  # (C, V)
            tgt = targets[c0 : c0 + chunk]
            real = lp.gather(-1, tgt.unsqueeze(-1))
            ranks = (lp > real).sum(-1) + 1
            # One .tolist() per chunk: per-element tensor access costs more than the forward at these sizes.
            top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
            if not (torch.isfinite(top_v).all() and torch.isfinite(real).all()):
                raise ValueError("the model gave non-finite log-probs (NaN or infinite logits)")
            decoded = self._decoded_tokens()
            for row_i, row_v, t, real_lp, rank_t in zip(top_i.tolist(), top_v.tolist(), tgt.tolist(),
                                                       real.squeeze(-1).tolist(), ranks.tolist(), strict=True):
                entry = {tid: {"logprob": val, "rank": rank, "decoded_token": decoded[tid]}
                         for rank, (tid, val) in enumerate(zip(row_i, row_v, strict=True), 1)}
                if t not in entry:
                    entry[t] = {"logprob": real_lp, "rank": rank_t, "decoded_token": decoded[t]}
                result.append(entry)
        return result

    def _decoded_tokens(self) -> list[str]:
        # Decoded once per id: responses name tens of thousands of tokens, and decode is slow per call.
        if self._decoded is None:
            self._decoded = [self.tokenizer.decode([i]) for i in range(self.vocab)]
        return self._decoded


    @torch.no_grad()
    def _generate_jobs(self, jobs: list[_Job], params: SamplingParams) -> list[Any]:
        prompts = [s for j in jobs for s in j.sequences]
        self.stats["sequences"] += len(prompts)
        seeds = None if params.greedy else [s for j in jobs for s in j.seeds]
        gen = sample(self.model, prompts, params, pad_id=self.pad_id, seeds=seeds, device=self.device)
        comps, fins = gen.completions(), gen.finished.tolist()
        lps = [row[mask].tolist() for row, mask in zip(gen.model_logprobs, gen.completion_mask, strict=True)]
        out, i = [], 0
        for j in jobs:
            n = len(j.sequences)
            out.append([{"tokens": comps[i + r], "finished": fins[i + r], "logprobs": lps[i + r]} for r in range(n)])
            i += n
        return out


# ------------------------------------------------------------------------------------------- the app


# vLLM's request rules, each where vLLM has it (tests/test_engine_contract.py sends a request against each):
# distill serve refuses what vLLM refuses, so that a client request vLLM would reject fails the suite.


def _check_model(engine: ServedModel, name: str | None) -> None:
    # vllm/entrypoints/openai/engine/serving.py, OpenAIServing._check_model: 404 NotFoundError.
    if name is not None and name != engine.name and name not in engine.adapters:
        raise ServeError(404, f"The model `{name}` does not exist.", "model")


def _check_count(value: int | None, param: str) -> None:
    """A log-probs count is an integer >= 0 or -1 (the whole vocabulary): CompletionRequest.check_logprobs and
    ChatCompletionRequest.check_logprobs (vllm/entrypoints/openai/{completion,chat_completion}/protocol.py)."""
    if value is not None and value < 0 and value != -1:
        raise _invalid(f"`{param}` must be a positive value or -1.", param, value)


def _check_logprobs(engine: ServedModel, value: int | None, kind: str = "sample") -> int:
    """The count to return, -1 as the vocabulary, at most the server's cap (vllm/sampling_params.py,
    SamplingParams._validate_logprobs; the cap is --max-logprobs)."""
    if not value:
        return 0
    count = engine.vocab if value == -1 else value
    if count > engine.max_logprobs:
        raise _invalid(f"Requested {kind} logprobs of {count}, which is greater than max allowed: "
                       f"{engine.max_logprobs}", "prompt_logprobs" if kind == "prompt" else "logprobs", count)
    return count


def _check_sampling(engine: ServedModel, *, n: int, temperature: float, top_p: float, top_k: int,
                    max_tokens: int) -> None:
    """vllm/sampling_params.py, SamplingParams._verify_args and _verify_greedy_sampling."""
    if n < 1:
        raise _invalid(f"n must be at least 1, got {n}.", "n", n)
    if temperature < 0.0:
        raise _invalid(f"temperature must be non-negative, got {temperature}.", "temperature", temperature)
    if temperature > 2.0:
        raise _invalid(f"temperature must be in [0, 2], got {temperature}.", "temperature", temperature)
    if not 0.0 < top_p <= 1.0:
        raise _invalid(f"top_p must be in (0, 1], got {top_p}.", "top_p", top_p)
    if top_k < -1:
        raise _invalid(f"top_k must be 0 (disable), or at least 1, got {top_k}.", "top_k", top_k)
    if max_tokens < 1:
        raise _invalid(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens", max_tokens)
    if temperature < 1e-5 and n > 1:
        raise _invalid(f"n must be 1 when using greedy sampling, got {n}.", "n", n)


def _check_length(engine: ServedModel, ids: list[int], max_tokens: int) -> None:
    """The prompt and the tokens asked for fit the context (vllm/renderers/params.py, TokenizeParams:
    __post_init__ and _token_len_check)."""
    if max_tokens > engine.max_len:
        raise _invalid(f"max_tokens={max_tokens} cannot be greater than max_model_len={engine.max_len}. Please "
                       "request fewer output tokens.", "max_tokens", max_tokens)
    if len(ids) > engine.max_len - max_tokens:
        raise _invalid(f"You passed {len(ids)} input tokens and requested {max_tokens} output tokens. However, the "
                       f"model's context length is only {engine.max_len} tokens, resulting in a maximum input "
                       f"length of {engine.max_len - max_tokens} tokens. Please reduce the length of the input "
                       "prompt.", "input_tokens", len(ids))


def _check_completion(engine: ServedModel, req: CompletionRequest) -> tuple[int, int]:
    """A completions request checked as vLLM checks it; the prompt's and the written tokens' top-log-probs
    counts. ``max_tokens: 0`` is allowed only with ``echo`` (vllm/entrypoints/openai/completion/protocol.py,
    CompletionRequest.to_sampling_params: ``echo_without_generation`` samples 1 token it does not return);
    with ``echo``, ``prompt_logprobs`` defaults to ``logprobs`` there too."""
    if req.stream:
        raise ServeError(400, "distill serve does not stream; send stream: false", "stream")
    _check_count(req.prompt_logprobs, "prompt_logprobs")
    _check_count(req.logprobs, "logprobs")
    echo_only = bool(req.echo) and req.max_tokens == 0
    _check_sampling(engine, n=req.n, temperature=_temperature(req.temperature), top_p=_or(req.top_p, 1.0),
                    top_k=_or(req.top_k, 0), max_tokens=1 if echo_only else req.max_tokens)
    k_gen = _check_logprobs(engine, req.logprobs)
    prompt_lp = req.prompt_logprobs if req.prompt_logprobs is not None else (req.logprobs if req.echo else None)
    k_prompt = _check_logprobs(engine, prompt_lp, kind="prompt")
    return k_prompt, k_gen


def _or(value, default):
    return default if value is None else value


def _temperature(value: float | None) -> float:
    return 1.0 if value is None else value


def _prompts(engine: ServedModel, prompt) -> list[list[int]]:
    """A completions prompt (text, ids, or a list of either) as lists of token ids."""
    if isinstance(prompt, str):
        items: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise ServeError(400, "prompt must be a string, a list of token ids, or a non-empty list of either", "prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            ids = engine.tokenizer(item, add_special_tokens=True)["input_ids"]
        elif isinstance(item, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in item):
            ids = list(item)
            bad = [x for x in ids if not 0 <= x < engine.vocab]
            if bad:
                raise ServeError(400, f"token id {bad[0]} is outside the vocabulary [0, {engine.vocab})", "prompt")
        else:
            raise ServeError(400, "each prompt must be a string or a list of token ids", "prompt")
        if not ids:
            raise ServeError(400, "a prompt needs at least one token", "prompt")
        out.append(list(ids))
    return out


def _token_str(engine: ServedModel, tid: int, as_ids: bool) -> str:
    return f"token_id:{tid}" if as_ids else engine.tokenizer.decode([tid])


# Request bodies (module level: FastAPI reads their annotations).
class Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, ...)

class CompletionRequest(Strict):
    # vllm/entrypoints/openai/completion/protocol.py, CompletionRequest: the fields distill serve reads, with
    # vLLM's types and defaults (the ranges are checked as vLLM checks them, _check_completion).
    model: str | None = None
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int = 16
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    seed: int | None = None
    logprobs: int | None = None
    echo: bool = False
    stream: bool = False
    prompt_logprobs: int | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    return_hidden_states: bool = False  # distill serve's own: the prompt's final hidden states, packed
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False

    @model_validator(mode="before")
    @classmethod
    def _null_max_tokens(cls, data):
        # CompletionRequest.normalize_null_max_tokens: null means the default, 16.
        if isinstance(data, dict) and data.get("max_tokens", 16) is None:
            data = {**data, "max_tokens": 16}
        return data

class ChatMessage(BaseModel):
    role: str
    content: str

class ChatRequest(Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

class GenerateRequest(Strict):
    # SGLang's native request (python/sglang/srt/managers/io_struct.py, GenerateReqInput): the fields distill
    # serve reads, with SGLang's types; None takes the default of GenerateReqInput._normalize_single_inputs /
    # _normalize_logprob_params (return_logprob False, logprob_start_len -1, top_logprobs_num 0).
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | None = None
    return_logprob: bool | None = None
    logprob_start_len: int | None = None
    top_logprobs_num: int | None = None
    return_text_in_logprobs: bool = False
    stream: bool = False
    rid: str | None = None

class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True



def build_app(engine: ServedModel, api_key: str | None = None):
    """The FastAPI app of ``distill serve`` on ``engine``: errors in OpenAI's shape, the API key check (when
    ``api_key`` is set), the endpoints."""
    from fastapi import FastAPI

    app = FastAPI(title="distill serve", version="1")
    _add_error_handlers(app)
    _add_auth(app, api_key)
    _add_routes(app, engine)
    add_weight_routes(app, engine)  # POST /update_weights_from_disk (SGLang's), server/weights.py
    return app


def _add_error_handlers(app) -> None:
    """Every error as OpenAI's error object: ours (:class:`ServeError`), an invalid request (400) and a crash
    (500, logged with its traceback)."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    @app.exception_handler(ServeError)
    async def _serve_error(_: Request, exc: ServeError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        # vLLM's validation_exception_handler (vllm/entrypoints/serve/exception_handling/handlers/validation.py):
        # 400, type "Bad Request", param the error's location.
        err = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        where = ".".join(str(x) for x in err.get("loc", ())) or None
        message = "malformed JSON in the request body" if err.get("type") == "json_invalid" else (
            f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return JSONResponse(ServeError(400, message, where, kind="Bad Request").body(), status_code=400)

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception):
        logger.exception("request failed")
        return JSONResponse(ServeError(500, f"internal error: {type(exc).__name__}: {exc}").body(),
                            status_code=500)


def _add_auth(app, api_key: str | None) -> None:
    """With an ``api_key``, every path but ``/health`` needs ``Authorization: Bearer <key>`` (else 401)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path != "/health":
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                err = ServeError(401, "Incorrect or missing API key (send `Authorization: Bearer <key>`).",
                                 code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)


def _add_routes(app, engine: ServedModel) -> None:
    """The endpoints (the module docstring lists them)."""

    @app.get("/health")
    async def health():
        # How many model batches served how many requests: concurrent requests share batches.
        return {"status": "ok", **engine.stats}

    @app.get("/v1/models")
    async def models():
        card = {"object": "model", "created": 0, "owned_by": "distill", "max_model_len": engine.max_len,
                "max_logprobs": engine.max_logprobs, "logprobs_mode": engine.logprobs_mode}
        # An adapter's card names its path as root and the served model as parent, as vLLM's show_available_models.
        adapters = [{"id": name, **card, "root": path, "parent": engine.name} for name, path in engine.adapters.items()]
        return {"object": "list", "data": [{"id": engine.name, **card}, *adapters]}

    @app.get("/v1/output_head")
    async def head(model: str | None = None):
        _check_model(engine, model)
        return _json(_output_head(engine))

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        return _tokenize(engine, req)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await _completions(engine, req)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        return await _chat(engine, req)

    @app.post("/generate")
    async def generate(req: GenerateRequest):
        return await _sglang_generate(engine, req)


async def _run_job(engine: ServedModel, job: _Job):
    """The job's result, once the engine's batch that holds it ran."""
    return await asyncio.wrap_future(engine.submit(job))


def _chat_ids(engine: ServedModel, messages: list[ChatMessage]) -> list[int]:
    """The token ids of ``messages`` in the tokenizer's chat template, ready for the assistant's answer."""
    text = engine.tokenizer.apply_chat_template([m.model_dump() for m in messages], tokenize=False,
                                                add_generation_prompt=True)
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def _tokenize(engine: ServedModel, req: TokenizeRequest) -> dict:
    """``POST /tokenize``: a prompt's or chat's token ids."""
    _check_model(engine, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise ServeError(400, "give exactly one of prompt or messages", "prompt")
    if req.messages is not None:
        ids = _chat_ids(engine, req.messages)
    else:
        ids = engine.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]
    return {"count": len(ids), "max_model_len": engine.max_len, "tokens": list(ids)}


async def _completions(engine: ServedModel, req: CompletionRequest):
    """``POST /v1/completions``: the prompts scored (``prompt_logprobs``, or ``echo`` with ``logprobs``), ``n``
    completions of each (none with ``max_tokens`` 0), and their top alternatives (``logprobs``) from one
    teacher-forced pass."""
    _check_model(engine, req.model)
    k_prompt, k_gen = _check_completion(engine, req)
    prompts = _prompts(engine, req.prompt)
    for ids in prompts:
        _check_length(engine, ids, req.max_tokens)
    want_prompt_lp = req.prompt_logprobs is not None or (req.echo and req.logprobs is not None)
    scored = None
    if want_prompt_lp:
        scored = await _run_job(engine, _Job("score", prompts, k=max(k_prompt, k_gen),
                                             temperature=req.temperature or 1.0))
    states = await _run_job(engine, _Job("hidden", prompts)) if req.return_hidden_states else None
    gens = await _generate_completions(engine, req, prompts)
    gen_scored = None
    if k_gen and req.max_tokens > 0:  # top alternatives at the written positions: one teacher-forced pass
        full = [p + g["tokens"] for p, row in zip(prompts, gens, strict=True) for g in row]
        gen_scored = await _run_job(engine, _Job("score", full, k=k_gen, temperature=req.temperature or 1.0))
    choices, completion_tokens = [], 0
    for i, ids in enumerate(prompts):
        for j, g in enumerate(gens[i]):
            completion_tokens += len(g["tokens"])
            choices.append(_completion_choice(engine, req, i * req.n + j, ids, g,
                                              scored[i] if scored is not None else None,
                                              gen_scored[i * req.n + j] if gen_scored else None, k_prompt, k_gen))
            if states is not None:
                choices[-1]["hidden_states"] = encode_array(states[i])
    prompt_tokens = sum(len(p) for p in prompts)
    return _json({"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": engine.name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}})


async def _generate_completions(engine: ServedModel, req: CompletionRequest, prompts: list[list[int]]) -> list[list[dict]]:
    """``req.n`` completions of each prompt (empty ones when ``max_tokens`` is 0), each row with its own seed
    from the request's ``seed`` (or a random one)."""
    if req.max_tokens <= 0:
        return [[{"tokens": [], "finished": False, "logprobs": []}] * req.n for _ in prompts]
    eos = [] if req.ignore_eos or engine.tokenizer.eos_token_id is None else [engine.tokenizer.eos_token_id]
    params = SamplingParams(temperature=_temperature(req.temperature), top_p=_or(req.top_p, 1.0),
                            top_k=max(_or(req.top_k, 0), 0), max_new_tokens=req.max_tokens,
                            stop_ids=tuple(sorted({*eos, *(req.stop_token_ids or [])})))
    base = req.seed if req.seed is not None else int.from_bytes(os.urandom(8), "little")
    rows = [p for p in prompts for _ in range(req.n)]
    seeds = [row_seed(base, j) for _ in prompts for j in range(req.n)]
    flat = await _run_job(engine, _Job("generate", rows, params=params, seeds=seeds))
    return [flat[i * req.n : (i + 1) * req.n] for i in range(len(prompts))]


def _completion_choice(engine: ServedModel, req: CompletionRequest, index: int, ids: list[int], g: dict,
                       prompt_scored: list | None, gen_scored: list | None, k_prompt: int, k_gen: int) -> dict:
    """One completion choice: its text (the prompt's first with ``echo``; the stop token left out), why it
    ended, its ``logprobs`` and ``prompt_logprobs`` when asked for. ``prompt_scored``: the prompt's scored
    positions; ``gen_scored``: the prompt + completion's, when the top alternatives were asked for."""
    toks = g["tokens"]
    text_ids = toks[:-1] if g["finished"] else toks
    text = engine.tokenizer.decode(text_ids, skip_special_tokens=False)
    choice: dict[str, Any] = {"index": index, "text": text, "logprobs": None,
                              "finish_reason": "stop" if g["finished"] else "length"}
    if req.echo:
        choice["text"] = engine.tokenizer.decode(ids, skip_special_tokens=False) + text
    if req.logprobs is not None:
        choice["logprobs"] = _completion_logprobs(
            engine, ids if req.echo else [], prompt_scored if req.echo else None, toks,
            gen_scored[len(ids):] if gen_scored is not None else [{}] * len(toks), g["logprobs"],
            k_gen, req.return_tokens_as_token_ids)
    if req.prompt_logprobs is not None:
        choice["prompt_logprobs"] = _trim(prompt_scored, ids, k_prompt)
    if req.return_token_ids:  # CompletionResponseChoice's prompt_token_ids / token_ids, only when asked for
        choice.update(prompt_token_ids=ids, token_ids=toks)
    return choice


async def _chat(engine: ServedModel, req: ChatRequest):
    """``POST /v1/chat/completions``: ``n`` answers to the messages in the tokenizer's chat template, with the
    top alternatives at each written position (``logprobs``) from one teacher-forced pass."""
    _check_model(engine, req.model)
    if engine.tokenizer.chat_template is None:
        raise ServeError(400, f"the tokenizer of `{engine.name}` has no chat template; use /v1/completions",
                         "messages")
    _check_count(req.top_logprobs, "top_logprobs")
    if req.top_logprobs is not None and req.top_logprobs != 0 and not req.logprobs:
        # ChatCompletionRequest.check_logprobs (vllm/entrypoints/openai/chat_completion/protocol.py)
        raise _invalid("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
    k = _check_logprobs(engine, req.top_logprobs) if req.logprobs else 0
    ids = _chat_ids(engine, req.messages)
    max_tokens = _or(req.max_completion_tokens, req.max_tokens)
    max_tokens = max(1, min(1024, engine.max_len - len(ids))) if max_tokens is None else max_tokens
    _check_sampling(engine, n=req.n, temperature=_temperature(req.temperature), top_p=_or(req.top_p, 1.0), top_k=0,
                    max_tokens=max_tokens)
    _check_length(engine, ids, max_tokens)
    eos = engine.tokenizer.eos_token_id
    params = SamplingParams(temperature=_temperature(req.temperature), top_p=_or(req.top_p, 1.0),
                            max_new_tokens=max_tokens, stop_ids=(eos,) if eos is not None else ())
    base = req.seed if req.seed is not None else int.from_bytes(os.urandom(8), "little")
    gens = await _run_job(engine, _Job("generate", [ids] * req.n, params=params,
                                   seeds=[row_seed(base, j) for j in range(req.n)]))
    scored = None
    if req.logprobs:
        scored = await _run_job(engine, _Job("score", [ids + g["tokens"] for g in gens], k=k, temperature=1.0))
    choices, completion_tokens = [], 0
    for j, g in enumerate(gens):
        completion_tokens += len(g["tokens"])
        choices.append(_chat_choice(engine, j, g, scored[j][len(ids):] if scored is not None else None, k))
    return _json({"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": engine.name, "choices": choices,
            "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                      "total_tokens": len(ids) + completion_tokens}})


async def _sglang_generate(engine: ServedModel, req: GenerateRequest):
    """``POST /generate``, SGLang's native API, for scoring (``max_new_tokens: 0``): each prompt's log-probs
    from ``logprob_start_len`` on, in SGLang's ``meta_info`` (python/sglang/srt/entrypoints/http_server.py,
    generate_request: one object for a single prompt, a list for a batch; a ValueError is a 400 with
    ``{"error": {"message"}}``). Its scoring runs in the same batched job as /v1/completions'."""
    if req.stream:
        raise ServeError(400, "distill serve does not stream; send stream: false", "stream")
    if (req.text is None) == (req.input_ids is None):
        # GenerateReqInput._validate_inputs (distill serve takes no input_embeds)
        raise ServeError(400, "Either text, input_ids or input_embeds should be provided.", "input_ids")
    single = isinstance(req.text, str) or (req.input_ids is not None and bool(req.input_ids)
                                           and isinstance(req.input_ids[0], int))
    prompts = _prompts(engine, [req.text] if isinstance(req.text, str) else req.text or
                       ([req.input_ids] if single else req.input_ids))
    sp = req.sampling_params or {}
    # python/sglang/srt/sampling/sampling_params.py, SamplingParams: max_new_tokens 128 and temperature 1.0 by
    # default; verify() refuses a negative temperature and max_new_tokens < 0; a temperature under its
    # _SAMPLING_EPS is greedy decoding, and the log-probs are then those at T = 1.
    max_new, temperature = sp.get("max_new_tokens", 128), sp.get("temperature", 1.0)
    if temperature is None or temperature < 0:
        raise ServeError(400, f"temperature must be non-negative, got {temperature}.", "temperature")
    if max_new is None or max_new < 0:
        raise ServeError(400, f"max_new_tokens must be at least 0, got {max_new}.", "max_new_tokens")
    if max_new > 0:
        raise ServeError(400, "distill serve's /generate only scores (max_new_tokens: 0); sample through "
                         "/v1/completions", "max_new_tokens")
    want_lp = bool(req.return_logprob)
    start, k = _or(req.logprob_start_len, -1), _or(req.top_logprobs_num, 0)
    if k < 0:
        raise ServeError(400, f"top_logprobs_num must be >= 0, got {k}.", "top_logprobs_num")
    if want_lp and k > engine.max_logprobs:  # distill serve's own --max-logprobs (SGLang has no such cap)
        raise ServeError(400, f"Requested top_logprobs_num of {k}, which is greater than max allowed: "
                         f"{engine.max_logprobs}", "top_logprobs_num")
    for ids in prompts:
        # TokenizerManager._validate_one_request (python/sglang/srt/managers/tokenizer_manager.py)
        if len(ids) >= engine.max_len:
            raise ServeError(400, f"The input ({len(ids)} tokens) is longer than the model's context length "
                             f"({engine.max_len} tokens).", "input_ids")
        if want_lp and start >= len(ids):
            raise ServeError(400, f"logprob_start_len ({start}) is not smaller than the input length "
                             f"({len(ids)} tokens).", "logprob_start_len")
    scored = None
    if want_lp and start >= 0:
        scored = await _run_job(engine, _Job("score", prompts, k=k, temperature=temperature or 1.0))
    outs = [_sglang_output(engine, req, ids, scored[i] if scored else None, start, k)
            for i, ids in enumerate(prompts)]
    return _json(outs[0] if single else outs)


def _sglang_output(engine: ServedModel, req: GenerateRequest, ids: list[int], entries: list | None, start: int,
                   k: int) -> dict:
    """One prompt's answer: no new text, and ``meta_info`` as TokenizerManager.add_logprob_to_meta_info writes
    it (python/sglang/srt/managers/tokenizer_manager.py): ``input_token_logprobs`` a list of ``[logprob,
    token_id, text]`` from ``logprob_start_len`` on (the first token's logprob null), ``input_top_logprobs``
    (only with ``top_logprobs_num > 0``) the top-k of each position as such lists, null where a position has
    none (detokenize_top_logprobs_tokens); text is null unless ``return_text_in_logprobs``."""
    meta: dict[str, Any] = {"id": req.rid or uuid.uuid4().hex, "finish_reason": {"type": "length", "length": 0},
                            "prompt_tokens": len(ids), "completion_tokens": 0, "cached_tokens": 0}
    if req.return_logprob:
        decoded = engine._decoded_tokens() if req.return_text_in_logprobs else None
        tokens, tops = [], []
        for pos in range(max(start, 0), len(ids)) if entries is not None else ():
            tid, entry = ids[pos], entries[pos]
            tokens.append([None if entry is None else entry[tid]["logprob"], tid, decoded and decoded[tid]])
            ranked = list((entry or {}).items())[:k]  # the scoring job puts the top-k first, in rank order
            tops.append([[v["logprob"], t, decoded and decoded[t]] for t, v in ranked] or None)
        meta.update(input_token_logprobs=tokens, output_token_logprobs=[])
        if k > 0:
            meta.update(input_top_logprobs=tops, output_top_logprobs=[])
    return {"text": "", "output_ids": [], "meta_info": meta}


def _chat_choice(engine: ServedModel, index: int, g: dict, entries: list | None, k: int) -> dict:
    """One chat choice: the assistant's message (the stop token left out), why it ended, and with ``entries``
    (the scored positions of the answer) its ``logprobs`` content."""
    toks = g["tokens"]
    text_ids = toks[:-1] if g["finished"] else toks
    choice: dict[str, Any] = {"index": index, "finish_reason": "stop" if g["finished"] else "length",
                              "message": {"role": "assistant",
                                          "content": engine.tokenizer.decode(text_ids, skip_special_tokens=True)},
                              "logprobs": None}
    if entries is not None:
        choice["logprobs"] = {"content": _chat_logprobs(engine, toks, entries, g["logprobs"], k)}
    return choice


def _chat_logprobs(engine: ServedModel, toks: list[int], entries: list, lps: list[float], k: int) -> list[dict]:
    """OpenAI's chat ``logprobs.content``: per written token its log-prob and its top ``k`` alternatives."""
    content = []
    for pos, tid in enumerate(toks):
        entry = entries[pos] or {}
        tops = sorted(((t, v) for t, v in entry.items() if v["rank"] <= k), key=lambda x: x[1]["rank"])
        tok = engine.tokenizer.decode([tid])
        content.append({"token": tok, "logprob": lps[pos], "bytes": list(tok.encode()),
                        "top_logprobs": [{"token": v["decoded_token"], "logprob": v["logprob"],
                                          "bytes": list(v["decoded_token"].encode())} for _, v in tops]})
    return content


def _json(body: dict):
    """The response as JSON, encoded once: FastAPI's default walks every element of a return value in Python
    first (``jsonable_encoder``), which for a batch of prompt log-probs (tens of thousands of entries) took
    five times as long as ``json.dumps``; orjson encodes a batch's 6 MB of log-probs in a ninth of the time
    ``json.dumps`` takes (`benchmarks/results/serve.json`, ``json_codec``). The body holds only JSON types
    (integer keys become strings) and finite numbers (:meth:`ServedModel._position_logprobs` checks them)."""
    from fastapi.responses import Response

    return Response(orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS), media_type="application/json")


def _output_head(engine: ServedModel) -> dict:
    """``GET /v1/output_head``: the output layer the scores come from, its first ``vocab_size`` rows (the
    tokenizer's ids), packed as the hidden states are."""
    weight, bias = engine.head.sliced()
    return {"model": engine.name, "vocab_size": engine.vocab, "hidden_size": int(weight.shape[1]),
            "logit_scale": engine.head.logit_scale, "softcap": engine.head.softcap, "weight": encode_array(weight),
            "bias": None if bias is None else encode_array(bias)}


def _trim(entries: list[dict | None], seq: list[int], k: int) -> list[dict | None]:
    """Keep the top ``k`` entries of each position and the sequence's own token there."""
    return [None if entry is None else {tid: v for tid, v in entry.items() if v["rank"] <= k or tid == seq[pos]}
            for pos, entry in enumerate(entries)]


def _completion_logprobs(engine: ServedModel, prompt_ids: list[int], prompt_scored, toks: list[int],
                         gen_entries: list[dict], gen_lps: list[float], k: int, as_ids: bool) -> dict:
    """OpenAI's legacy ``logprobs`` object: tokens, token_logprobs, top_logprobs, text_offset. A position's
    top_logprobs hold its top ``k`` and its own token (ranked k + 1 when outside them), as vLLM's (the sampled
    or prompt token comes first from the sampler: vllm/v1/engine/logprobs.py, LogprobsProcessor)."""
    tokens, token_lps, tops, offsets, offset = [], [], [], [], 0
    for pos, tid in enumerate(prompt_ids):
        entry = prompt_scored[pos] if prompt_scored else None
        s = _token_str(engine, tid, as_ids)
        tokens.append(s)
        token_lps.append(None if entry is None else entry[tid]["logprob"])
        tops.append(None if entry is None else {_token_str(engine, t, as_ids): v["logprob"]
                                                 for t, v in entry.items() if v["rank"] <= k or t == tid})
        offsets.append(offset)
        offset += len(engine.tokenizer.decode([tid]))
    for pos, tid in enumerate(toks):
        s = _token_str(engine, tid, as_ids)
        tokens.append(s)
        token_lps.append(gen_lps[pos])
        entry = gen_entries[pos] if pos < len(gen_entries) and gen_entries[pos] else {}
        tops.append({_token_str(engine, t, as_ids): v["logprob"] for t, v in entry.items()
                     if v["rank"] <= k or t == tid})
        offsets.append(offset)
        offset += len(engine.tokenizer.decode([tid]))
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def serve(model_dir: str, *, host: str = "127.0.0.1", port: int = 8000, name: str | None = None,
          api_key_env: str | None = None, max_logprobs: int = 20, logprobs_mode: str = "raw",
          dtype: str = "float32", max_batch_tokens: int = 16384, log_level: str = "warning") -> None:
    """Load the model and serve it until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise ValueError("distill serve needs FastAPI and uvicorn: pip install 'distill[serve]'") from None

    if max_logprobs < -1:  # vllm/config/model.py, ModelConfig: max_logprobs >= -1
        raise ValueError(f"--max-logprobs {max_logprobs}: give a count >= 0, or -1 for no cap (the whole vocabulary)")
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ValueError(f"--api-key-env {api_key_env}: the environment variable {api_key_env} is not set")
    spec = ModelSpec(path=model_dir, dtype=dtype)
    tokenizer = load_tokenizer(spec, "model")
    model = load_model(spec, "model", tokenizer)
    resolve_vocab(model, len(tokenizer), "model", "truncate")  # every token scored, or refused before serving
    if has_accelerator() and torch.cuda.is_available():
        model.to("cuda")
    engine = ServedModel(model, tokenizer, name or os.path.basename(os.path.normpath(model_dir)),
                         max_logprobs=max_logprobs, logprobs_mode=logprobs_mode, max_batch_tokens=max_batch_tokens)
    logger.info("serving %s as `%s` on http://%s:%d (max_logprobs=%d, logprobs_mode=%s%s)", model_dir, engine.name,
                host, port, max_logprobs, logprobs_mode, ", API key required" if api_key else "")
    uvicorn.run(build_app(engine, api_key), host=host, port=port, log_level=log_level)
