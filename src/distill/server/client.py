"""Talking to a teacher behind an HTTP server: requests, retries, and the three response shapes.

A server teacher is scored on **token ids, never text**: each sequence is sent as a list of ids with zero
new tokens and asks for the prompt log-probabilities (the log-probability of every token given the ones
before it, plus the top-k alternatives at each position). Three shapes are understood:

* vLLM ``/v1/completions`` with ``echo: true, max_tokens: 0, prompt_logprobs: K`` (vLLM takes
  ``max_tokens: 0`` only with ``echo``; ``distill serve`` answers in vLLM's shape and refuses what vLLM
  refuses): ``choices[0].prompt_logprobs`` is a list over positions, ``null`` first, then
  ``{token_id: {"logprob", "rank", "decoded_token"}}`` holding the top K and always the realized token
  (JSON object keys are strings of the ids).
* SGLang ``/generate`` with ``input_ids``, ``return_logprob``, ``logprob_start_len: 0`` and
  ``top_logprobs_num: K``: ``meta_info.input_token_logprobs`` is a list of ``[logprob, token_id, text]``
  (the first logprob ``null``) and ``meta_info.input_top_logprobs`` a list (``null`` first) of lists of
  ``[logprob, token_id, text]``.
* Endpoints that return no prompt log-probabilities (the OpenAI API, llama.cpp) are recognized and refused
  for token-level distillation: they can still generate text (``distill generate``).

``prompt_logprobs: -1`` asks for the whole vocabulary (vLLM and ``distill serve`` started with
``--max-logprobs -1``). ``distill serve`` also returns a prompt's final hidden states
(``return_hidden_states: true``: ``choices[0].hidden_states``) and its output layer (``GET /v1/output_head``),
each array packed by :func:`encode_array` (base64 of the little-endian bytes, with dtype and shape);
:meth:`Scorer.hidden` and :func:`fetch_output_head` read them back.

Requests run on a bounded pool of threads (``max_in_flight``), are retried with exponential backoff on
timeouts, refused connections and 5xx answers, and fail with :class:`~distill.errors.TeacherServerError`
naming the URL. A 4xx answer is the request's fault: it is raised at once as a :class:`ServerRefusal` (a
``ValueError``) with the server's own message, and :func:`explain` turns the refusals a user can cause (a
log-probs cap, the context length, a temperature above vLLM's 2, greedy ``n > 1``) into what to change: the
distill setting the caller names, or the server's flag.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import orjson
import torch

from distill.errors import TeacherServerError

RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}

# The settings behind a scoring request, named when the server refuses one (distill train and eval's teacher;
# distill cache names its own ``k``).
SCORING_FIELDS = {"logprobs": "teacher.top_k", "length": "data.seq_len", "temperature": "loss.temperature"}


@dataclass
class Client:
    """JSON over HTTP to one server, with retries. ``api_key`` goes in ``Authorization: Bearer``."""

    url: str
    api_key: str | None = None
    timeout: float = 60.0
    retries: int = 5
    backoff: float = 0.5

    def __post_init__(self):
        self.url = self.url.rstrip("/")
        self.received_bytes = 0  # response bodies read, for measurements

    def request(self, method: str, path: str, body: dict | None = None, *, text: bool = False):
        """The server's JSON answer (``text``: its answer as text, for endpoints that answer in plain text, such
        as vLLM's ``/v1/load_lora_adapter``)."""
        data = None if body is None else orjson.dumps(body)
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                self.received_bytes += len(raw)
            except urllib.error.HTTPError as exc:
                text = exc.read().decode(errors="replace")
                if exc.code in RETRYABLE_STATUS:
                    last = f"HTTP {exc.code}: {server_message(text)}"
                    continue
                raise ServerRefusal(self.url, path, exc.code, server_message(text)) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
                # HTTPException: the connection broke mid-response (IncompleteRead, a server killed while
                # writing): as retryable as a refused connection.
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
                continue
            if text:
                return raw.decode(errors="replace")
            try:
                return orjson.loads(raw)
            except ValueError:
                raise TeacherServerError(
                    f"teacher server {self.url}{path} answered something that is not JSON ({raw[:120]!r}); is "
                    "this URL an OpenAI-compatible server (vLLM, SGLang, distill serve)?"
                ) from None
        raise TeacherServerError(
            f"teacher server {self.url} did not answer {path} after {self.retries + 1} tries ({last}). "
            "Check that it is running and reachable; a training run stops here with its last checkpoint intact "
            "(start the server again and rerun with --resume)"
        )


class ServerRefusal(ValueError):
    """A 4xx answer: the request's fault. ``message`` is the server's own text."""

    def __init__(self, url: str, path: str, status: int, message: str):
        super().__init__(f"teacher server {url}{path} refused the request (HTTP {status}): {message}")
        self.url, self.path, self.status, self.message = url, path, status, message


# The refusals a user's settings can cause, as vLLM and SGLang word them (tests/test_engine_contract.py cites
# where each message comes from).
_LOGPROBS_CAP = re.compile(r"(?:logprobs|top_logprobs_num)[^0-9]*? of (\d+),? which is greater than max allowed:? *(\d+)",
                           re.IGNORECASE)
_CONTEXT = (re.compile(r"context length is only (\d+) tokens"), re.compile(r"maximum context length is (\d+)"),
            re.compile(r"model's context length \((\d+) tokens\)"), re.compile(r"max_model_len=(\d+)"))
_TEMPERATURE = re.compile(r"temperature must be in \[0, 2\]")
_GREEDY_N = re.compile(r"n must be 1 when using greedy sampling")


def explain(exc: ValueError, fields: dict[str, str]) -> ValueError:
    """``exc`` (a server's refusal) as what to change, when it is a cap a user's settings hit; else ``exc``.
    ``fields``: the distill setting behind each part of the request (``logprobs``, ``length``,
    ``temperature``, ``n``), as this path's config spells it."""
    if not isinstance(exc, ServerRefusal):
        return exc
    msg, url = exc.message, exc.url
    if (cap := _LOGPROBS_CAP.search(msg)) and "logprobs" in fields:
        want, most = cap.groups()
        if fields.get("whole_vocabulary"):
            return ValueError(
                f"{fields['logprobs']}=all asks for the whole vocabulary ({want} log-probs per position), above the "
                f"server's cap of {most} ({url}); restart the server with --max-logprobs -1 (vLLM and distill "
                f"serve: no cap), or set {fields['logprobs']} to {most} or less")
        return ValueError(
            f"{fields['logprobs']}={want} is above the server's cap of {most} log-probs per position ({url}); lower "
            f"{fields['logprobs']} to {most} or less, or restart the server with --max-logprobs {want} (vLLM and "
            "distill serve: its default is 20)")
    if (ctx := next((m for r in _CONTEXT if (m := r.search(msg))), None)) and "length" in fields:
        return ValueError(
            f"a request does not fit the server's context of {ctx.group(1)} tokens ({url}): lower {fields['length']}, "
            f"or restart the server with a longer context (vLLM: --max-model-len; SGLang: --context-length). The "
            f"server said: {msg}")
    if _TEMPERATURE.search(msg) and "temperature" in fields:
        return ValueError(f"{fields['temperature']} is above 2, which vLLM refuses ({url}): set "
                          f"{fields['temperature']} in [0, 2]")
    if _GREEDY_N.search(msg) and "n" in fields:
        return ValueError(f"{fields['n']} > 1 at temperature 0 asks for identical samples, which vLLM refuses ({url}): "
                          f"set {fields['n']}=1 or a temperature above 0")
    return exc


def server_message(text: str) -> str:
    """The message of an OpenAI-style error body, or the text itself."""
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:300]
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if "detail" in body:
            return str(body["detail"])
    return text.strip()[:300]


# ------------------------------------------------------------------------------------------- parsing

# Per position of a scored sequence: the token ids and their log-probabilities (top-k and the realized
# token, no duplicates), or None for the first position (nothing precedes it).
PositionLogprobs = tuple[list[int], list[float]] | None


def parse_vllm(choice: dict, seq: list[int]) -> list[PositionLogprobs]:
    """vLLM / ``distill serve``: ``choice["prompt_logprobs"]``."""
    entries = choice.get("prompt_logprobs")
    if entries is None:
        raise NoPromptLogprobs("the response has no prompt_logprobs")
    if len(entries) != len(seq):
        raise TeacherServerError(f"the server scored {len(entries)} positions for a sequence of {len(seq)} tokens")
    out: list[PositionLogprobs] = []
    for pos, entry in enumerate(entries):
        if entry is None:
            out.append(None)
            continue
        ids, lps = [], []
        for key, value in entry.items():
            ids.append(int(key))
            lps.append(float(value["logprob"] if isinstance(value, dict) else value))
        if seq[pos] not in ids:
            raise TeacherServerError(f"the server's log-probs at position {pos} do not include the sequence's token")
        out.append((ids, lps))
    return out


def parse_sglang(body: dict, seq: list[int]) -> list[PositionLogprobs]:
    """SGLang ``/generate``: ``meta_info.input_token_logprobs`` + ``input_top_logprobs``."""
    meta = body.get("meta_info", {})
    realized, tops = meta.get("input_token_logprobs"), meta.get("input_top_logprobs")
    if realized is None or tops is None:
        raise NoPromptLogprobs("the response has no meta_info.input_token_logprobs / input_top_logprobs")
    if len(realized) != len(seq):
        raise TeacherServerError(f"the server scored {len(realized)} positions for a sequence of {len(seq)} tokens")
    out: list[PositionLogprobs] = []
    for pos, (real, top) in enumerate(zip(realized, tops, strict=True)):
        if pos == 0 or real is None or real[0] is None:
            out.append(None)
            continue
        pairs = {int(t[1]): float(t[0]) for t in (top or [])}
        pairs.setdefault(int(real[1]), float(real[0]))
        out.append((list(pairs), list(pairs.values())))
    return out


class NoPromptLogprobs(TeacherServerError):
    """The endpoint does not return prompt log-probabilities."""


class NoHiddenStates(TeacherServerError):
    """The endpoint does not return hidden states (vLLM, SGLang's OpenAI API; ``distill serve`` does)."""


# ------------------------------------------------------------------------------------------- packed arrays

# The dtypes an array travels in, by name: float32 as is, bfloat16 / float16 as their 2-byte patterns.
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def encode_array(t: torch.Tensor) -> dict:
    """A tensor as ``{"dtype", "shape", "byteorder": "little", "data": base64}`` (its bytes, not a list of
    floats: 4 or 2 bytes a value, a third more as base64, against ~10 as JSON text)."""
    name = next((n for n, d in _DTYPES.items() if d == t.dtype), None)
    if name is None:
        t, name = t.float(), "float32"
    flat = t.detach().cpu().contiguous().reshape(-1)
    bits = flat.view(torch.int16 if flat.element_size() == 2 else torch.int32).numpy()
    little = bits.astype(bits.dtype.newbyteorder("<"), copy=False)
    return {"dtype": name, "shape": list(t.shape), "byteorder": "little",
            "data": base64.b64encode(little.tobytes()).decode("ascii")}


def decode_array(packed: dict) -> torch.Tensor:
    """:func:`encode_array`'s tensor back (in its own dtype)."""
    dtype = _DTYPES.get(packed.get("dtype"))
    if dtype is None or packed.get("byteorder") != "little":
        raise TeacherServerError(f"an array in dtype {packed.get('dtype')!r}, byte order {packed.get('byteorder')!r}: "
                                 f"the client reads {', '.join(_DTYPES)} in little-endian order")
    raw = base64.b64decode(packed["data"])
    shape = [int(x) for x in packed["shape"]]
    width = 4 if dtype == torch.float32 else 2
    if len(raw) != math.prod(shape) * width:
        raise TeacherServerError(f"an array of shape {shape} in {packed['dtype']} has {len(raw)} bytes, not "
                                 f"{math.prod(shape) * width}")
    bits = np.frombuffer(raw, dtype="<i4" if width == 4 else "<i2").astype(np.int32 if width == 4 else np.int16)
    return torch.from_numpy(bits).view(dtype).reshape(shape)


# ------------------------------------------------------------------------------------------- scoring


@dataclass
class Scorer:
    """Scores token sequences on a server: ``api`` is ``vllm`` (vLLM, distill serve: /v1/completions) or
    ``sglang`` (/generate). ``fields``: the settings behind the request, named in a refusal (:func:`explain`)."""

    client: Client
    model: str | None
    api: str = "vllm"
    max_in_flight: int = 8
    fields: dict[str, str] = field(default_factory=lambda: dict(SCORING_FIELDS))

    def score_one(self, seq: list[int], k: int, temperature: float) -> list[PositionLogprobs]:
        if self.api == "sglang":
            body = {"input_ids": seq, "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": k,
                    "sampling_params": {"max_new_tokens": 0, "temperature": temperature}}
            try:
                return parse_sglang(self.client.request("POST", "/generate", body), seq)
            except ServerRefusal as exc:
                raise explain(exc, self.fields) from None
        # vLLM takes max_tokens 0 only with echo (CompletionRequest.to_sampling_params' echo_without_generation;
        # SamplingParams refuses max_tokens < 1 otherwise): the choice then holds the prompt's text and
        # prompt_logprobs, and no generated token.
        body = {"prompt": seq, "max_tokens": 0, "echo": True, "prompt_logprobs": k, "temperature": temperature}
        if self.model:
            body["model"] = self.model
        try:
            resp = self.client.request("POST", "/v1/completions", body)
        except ServerRefusal as exc:
            raise explain(exc, self.fields) from None
        choices = resp.get("choices") or []
        if not choices:
            raise TeacherServerError(f"teacher server {self.client.url}: a completion with no choices")
        return parse_vllm(choices[0], seq)

    def score(self, seqs: list[list[int]], k: int, temperature: float) -> list[list[PositionLogprobs]]:
        return self._each(seqs, lambda s: self.score_one(s, k, temperature))

    def hidden_one(self, seq: list[int]) -> torch.Tensor:
        """The final hidden states (T, H) of one sequence (``distill serve``'s ``return_hidden_states``)."""
        body = {"prompt": seq, "max_tokens": 0, "echo": True, "return_hidden_states": True,
                **({"model": self.model} if self.model else {})}
        try:
            resp = self.client.request("POST", "/v1/completions", body)
        except ServerRefusal as exc:
            raise explain(exc, self.fields) from None
        packed = ((resp.get("choices") or [{}])[0]).get("hidden_states")
        if packed is None:
            raise NoHiddenStates("the response has no choices[0].hidden_states")
        states = decode_array(packed)
        if states.dim() != 2 or states.shape[0] != len(seq):
            raise TeacherServerError(f"teacher server {self.client.url} returned hidden states of shape "
                                     f"{list(states.shape)} for a sequence of {len(seq)} tokens")
        return states

    def hidden(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        return self._each(seqs, self.hidden_one)

    def _each(self, seqs: list, fn) -> list:
        """``fn`` of every sequence, ``max_in_flight`` requests at a time."""
        if len(seqs) == 1:
            return [fn(seqs[0])]
        with ThreadPoolExecutor(max_workers=min(self.max_in_flight, len(seqs))) as pool:
            return list(pool.map(fn, seqs))


def fetch_output_head(client: Client, model: str | None) -> dict:
    """``distill serve``'s ``GET /v1/output_head``: the output layer's ``weight`` (V, H) and ``bias`` (V,) or
    None as tensors, with ``logit_scale``, ``softcap`` and ``vocab_size``."""
    try:
        body = client.request("GET", "/v1/output_head" + (f"?model={urllib.parse.quote(model)}" if model else ""))
    except ServerRefusal as exc:
        if exc.status in (404, 405):
            raise NoHiddenStates(f"{client.url} has no /v1/output_head (HTTP {exc.status})") from None
        raise
    return {"weight": decode_array(body["weight"]),
            "bias": None if body.get("bias") is None else decode_array(body["bias"]),
            "logit_scale": float(body.get("logit_scale", 1.0)), "softcap": body.get("softcap"),
            "vocab_size": int(body["vocab_size"])}


def max_abs_difference(a: list[PositionLogprobs], b: list[PositionLogprobs]) -> float:
    """The largest disagreement between two scorings of one sequence (ids present in both)."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            continue
        ya = dict(zip(*y, strict=True))
        for tid, lp in zip(*x, strict=True):
            if tid in ya:
                worst = max(worst, abs(lp - ya[tid]) if math.isfinite(lp) and math.isfinite(ya[tid]) else math.inf)
    return worst
