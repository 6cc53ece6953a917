"""vLLM's request contract, held by ``distill serve`` and by the client that talks to servers.

``distill serve`` answers in vLLM's shape; if it also accepted what vLLM refuses, every server test would pass
against it while the same requests fail against vLLM (they did: scoring sent ``max_tokens: 0`` without
``echo``). So each rule vLLM checks on a completions or chat request is written out below with the vLLM source
it comes from (paths in the vllm-project/vllm repository), and a request that breaks it must get vLLM's status,
error body and parameter from ``distill serve``. Then every request the client sends (scoring, SKD's next-token
top-K, sampling, tokenize, the model list) runs against it, and each server cap a user can hit comes back as
the setting or server flag to change.
"""

from __future__ import annotations

import json
import threading
from http.server import ThreadingHTTPServer

import pytest
import torch
import yaml
from conftest import TINY_TRAIN, JsonHandler, http, serving_in_process

from distill.config import ModelSpec, ServerTeacherSpec
from distill.engines import ServerEngine
from distill.generation.sampling import SamplingParams
from distill.models import load_model
from distill.server.client import encode_array
from distill.tokenizer import byte_tokenizer

V = 263  # the byte tokenizer's vocabulary
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs (vllm/config/model.py, ModelConfig.max_logprobs)
MAX_LEN = 256  # the tiny teacher's max_position_embeddings


@pytest.fixture(scope="module")
def model():
    spec = ModelSpec(**yaml.safe_load(TINY_TRAIN.read_text())["teacher"])
    return load_model(spec, "teacher", byte_tokenizer()).eval()


@pytest.fixture(scope="module")
def url(model):
    """``distill serve``'s app with vLLM's default cap, in this process (uvicorn on a thread)."""
    with serving_in_process(model, byte_tokenizer(), "tiny", max_logprobs=MAX_LOGPROBS) as address:
        yield address


SEQ = [256, *b"def f(x): return x"]

# (rule, vLLM source, path, request body, status, param, words of vLLM's message)
RULES = [
    ("max_tokens 0 needs echo",
     "vllm/entrypoints/openai/completion/protocol.py CompletionRequest.to_sampling_params (echo_without_generation)"
     " + vllm/sampling_params.py SamplingParams._verify_args",
     "/v1/completions", {"prompt": SEQ, "max_tokens": 0, "prompt_logprobs": 5}, 400, "max_tokens",
     "max_tokens must be at least 1, got 0."),
    ("prompt_logprobs >= 0 or -1", "vllm/entrypoints/openai/completion/protocol.py CompletionRequest.check_logprobs",
     "/v1/completions", {"prompt": SEQ, "max_tokens": 1, "prompt_logprobs": -2}, 400, "prompt_logprobs",
     "`prompt_logprobs` must be a positive value or -1."),
    ("logprobs >= 0 or -1", "vllm/entrypoints/openai/completion/protocol.py CompletionRequest.check_logprobs",
     "/v1/completions", {"prompt": SEQ, "max_tokens": 1, "logprobs": -3}, 400, "logprobs",
     "`logprobs` must be a positive value or -1."),
    ("prompt_logprobs within --max-logprobs", "vllm/sampling_params.py SamplingParams._validate_logprobs",
     "/v1/completions", {"prompt": SEQ, "max_tokens": 0, "echo": True, "prompt_logprobs": 21}, 400,
     "prompt_logprobs", "Requested prompt logprobs of 21, which is greater than max allowed: 20"),
    ("-1 is the whole vocabulary, then capped", "vllm/sampling_params.py SamplingParams._validate_logprobs",
     "/v1/completions", {"prompt": SEQ, "max_tokens": 0, "echo": True, "prompt_logprobs": -1}, 400,
     "prompt_logprobs", f"Requested prompt logprobs of {V}, which is greater than max allowed: 20"),
    ("logprobs within --max-logprobs", "vllm/sampling_params.py SamplingParams._validate_logprobs",
     "/v1/completions", {"prompt": SEQ, "max_tokens": 1, "logprobs": 25}, 400, "logprobs",
     "Requested sample logprobs of 25, which is greater than max allowed: 20"),
    ("echo scoring with logprobs: the sample count is checked first", "vllm/entrypoints/openai/completion/"
     "protocol.py CompletionRequest.to_sampling_params (prompt_logprobs = logprobs with echo) + "
     "vllm/sampling_params.py SamplingParams._validate_logprobs (sample logprobs before prompt logprobs)",
     "/v1/completions", {"prompt": SEQ, "max_tokens": 0, "echo": True, "logprobs": 21}, 400, "logprobs",
     "Requested sample logprobs of 21"),
    ("temperature <= 2", "vllm/sampling_params.py SamplingParams._verify_args",
     "/v1/completions", {"prompt": SEQ, "max_tokens": 1, "temperature": 2.5}, 400, "temperature",
     "temperature must be in [0, 2], got 2.5."),
    ("temperature >= 0", "vllm/sampling_params.py SamplingParams._verify_args",
     "/v1/completions", {"prompt": SEQ, "max_tokens": 1, "temperature": -0.5}, 400, "temperature",
     "temperature must be non-negative"),
    ("top_p in (0, 1]", "vllm/sampling_params.py SamplingParams._verify_args",
     "/v1/completions", {"prompt": SEQ, "max_tokens": 1, "top_p": 0}, 400, "top_p", "top_p must be in (0, 1]"),
    ("top_k 0, -1 or >= 1", "vllm/sampling_params.py SamplingParams._verify_args",
     "/v1/completions", {"prompt": SEQ, "max_tokens": 1, "top_k": -2}, 400, "top_k",
     "top_k must be 0 (disable), or at least 1, got -2."),
    ("greedy means n = 1", "vllm/sampling_params.py SamplingParams._verify_greedy_sampling",
     "/v1/completions", {"prompt": SEQ, "max_tokens": 1, "temperature": 0, "n": 2}, 400, "n",
     "n must be 1 when using greedy sampling, got 2."),
    ("prompt + max_tokens within the context", "vllm/renderers/params.py TokenizeParams._token_len_check",
     "/v1/completions", {"prompt": [256] * 250, "max_tokens": 10}, 400, "input_tokens",
     "You passed 250 input tokens and requested 10 output tokens. However, the model's context length is only 256"),
    ("max_tokens within the context", "vllm/renderers/params.py TokenizeParams.__post_init__",
     "/v1/completions", {"prompt": SEQ, "max_tokens": 300}, 400, "max_tokens", "cannot be greater than"),
    ("an unknown model is 404", "vllm/entrypoints/openai/engine/serving.py OpenAIServing._check_model",
     "/v1/completions", {"model": "gpt-9", "prompt": SEQ, "max_tokens": 1}, 404, "model",
     "The model `gpt-9` does not exist."),
    ("top_logprobs needs logprobs", "vllm/entrypoints/openai/chat_completion/protocol.py "
     "ChatCompletionRequest.check_logprobs",
     "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "top_logprobs", "when using `top_logprobs`, `logprobs` must be set to true."),
    ("chat top_logprobs within --max-logprobs", "vllm/sampling_params.py SamplingParams._validate_logprobs",
     "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 21}, 400, "logprobs",
     "Requested sample logprobs of 21, which is greater than max allowed: 20"),
]

# The error body (vllm/entrypoints/serve/engine/protocol.py ErrorResponse / ErrorInfo; the type per status and
# the status as code: vllm/entrypoints/serve/exception_handling/error_response.py create_error_response; the
# parameter and value after the message: vllm/exceptions.py VLLMValidationError.__str__).
TYPES = {400: "BadRequestError", 404: "NotFoundError"}


@pytest.mark.parametrize(("rule", "source", "path", "body", "status", "param", "words"), RULES,
                         ids=[r[0] for r in RULES])
def test_distill_serve_refuses_what_vllm_refuses(url, rule, source, path, body, status, param, words):
    got, resp = http(url + path, body)
    assert got == status, (rule, source, resp)
    err = resp["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["code"], err["type"], err["param"]) == (status, TYPES[status], param), (rule, err)
    assert words in err["message"], (rule, err["message"])
    if status == 400:
        assert f"(parameter={param}" in err["message"]


def test_what_vllm_accepts_is_answered_in_its_shape(url, model):
    """Scoring: ``echo`` with ``max_tokens: 0`` gives the prompt as the choice's text, its prompt_logprobs (the
    cap itself is allowed) and no generated token; with ``logprobs`` the legacy object covers the prompt
    (vllm/entrypoints/openai/completion/serving.py, request_output_to_completion_response)."""
    status, resp = http(url + "/v1/completions", {"prompt": SEQ, "max_tokens": 0, "echo": True,
                                                  "prompt_logprobs": MAX_LOGPROBS})
    assert status == 200
    choice = resp["choices"][0]
    # Only the prompt's text (vLLM samples one token it does not return, and counts it in usage: not compared).
    assert choice["text"] == byte_tokenizer().decode(SEQ)
    entries = choice["prompt_logprobs"]
    assert len(entries) == len(SEQ) and entries[0] is None and "prompt_token_ids" not in choice
    assert all(len(e) in (MAX_LOGPROBS, MAX_LOGPROBS + 1) and str(t) in e for e, t in zip(entries[1:], SEQ[1:],
                                                                                          strict=True))
    status, resp = http(url + "/v1/completions", {"prompt": SEQ, "max_tokens": 0, "echo": True, "logprobs": 2,
                                                  "return_tokens_as_token_ids": True, "return_token_ids": True})
    assert status == 200
    lp, choice = resp["choices"][0]["logprobs"], resp["choices"][0]
    assert lp["tokens"] == [f"token_id:{t}" for t in SEQ] and lp["token_logprobs"][0] is None
    assert choice["prompt_token_ids"] == SEQ and choice["token_ids"] == []


def test_completion_top_logprobs_hold_the_written_token(url):
    """vLLM's sampler puts the sampled token in front of the top-K, and a position's top_logprobs keep it
    (ranked K + 1) when it is outside them (vllm/v1/engine/logprobs.py, LogprobsProcessor._update_sample_logprobs
    and _make_pos_logprob_dict). On a random tiny model at T = 2 most samples are outside the top 1."""
    status, resp = http(url + "/v1/completions", {"prompt": SEQ, "max_tokens": 4, "n": 8, "temperature": 2.0,
                                                  "seed": 3, "logprobs": 1, "return_tokens_as_token_ids": True,
                                                  "ignore_eos": True})
    assert status == 200
    outside = 0
    for choice in resp["choices"]:
        lp = choice["logprobs"]
        for tok, tops in zip(lp["tokens"], lp["top_logprobs"], strict=True):
            assert tok in tops and len(tops) in (1, 2)
            outside += len(tops) == 2
    assert outside > 0


def _engine(url: str, **kw) -> ServerEngine:
    return ServerEngine(ServerTeacherSpec(server=url, top_k=kw.pop("spec_top_k", 20)), byte_tokenizer(), **kw)


def test_the_clients_requests_are_valid_and_skd_gets_the_teachers_top_k(url, model):
    """The start-up checks (model list, /tokenize, two scorings), a scoring, samples and SKD's next-token top-K
    all pass vLLM's rules on distill serve; the top-K SKD reads is the model's, not the top-K plus the teacher's
    own sample."""
    engine = _engine(url, temperature=1.0)  # the start-up checks
    seqs = [SEQ, [256, *b"print(1 + 2)"]]
    scored = engine.top_logprobs(seqs, 20, 1.0)
    assert [len(s) for s in scored] == [len(s) for s in seqs]
    rows = [{"ids": SEQ, "format": "text", "value": None}]
    samples = engine.sample(rows, ["a"], SamplingParams(temperature=1.0, max_new_tokens=4), n=2, seed=0,
                            logprobs=True, batch_size=1)
    assert len(samples[0]) == 2
    corrector = engine.corrector(2.0)  # at T = 2 the teacher's sample is often outside its top 5
    prefix = torch.tensor([SEQ])
    corrector.prefill(prefix, torch.ones_like(prefix))
    k = 5
    inside, _ = corrector.check(torch.tensor([0]), k, torch.tensor([0.25]))
    with torch.no_grad():
        want = set(model(input_ids=prefix).logits[0, -1, :V].topk(k).indices.tolist())
    assert bool(inside[0]) == (0 in want)
    for seed in range(10):
        got, sampled = corrector._one(SEQ, k, seed)
        assert got == want, (seed, sampled)


def test_every_cap_names_what_to_change(url):
    """Scoring (training's teacher.top_k, distill cache's k), SKD's corrections and sampling: a request past a
    cap of the server comes back as the setting or the server flag to change, not the server's raw text."""
    with pytest.raises(ValueError, match=r"teacher.top_k=25 is above the server's cap of 20 .*--max-logprobs 25"):
        _engine(url, temperature=1.0, spec_top_k=25)
    with pytest.raises(ValueError, match=r"^k=25 is above the server's cap of 20"):
        _engine(url, temperature=1.0, top_k=25)
    corrector = _engine(url, temperature=1.0).corrector(1.0)
    with pytest.raises(ValueError, match=r"train.batches.skd_top_k=25 is above the server's cap of 20 .*"
                                         r"--max-logprobs 25"):
        corrector._one(SEQ, 25, 0)
    with pytest.raises(ValueError, match=r"context of 256 tokens .*lower data.seq_len or train.batches.max_new_tokens"
                                         r".*--max-model-len"):
        corrector._one([256] * MAX_LEN, 5, 0)
    with pytest.raises(ValueError, match=r"train.batches.skd_teacher_temperature .* is above 2"):
        _engine(url, temperature=1.0).corrector(2.5)._one(SEQ, 5, 0)
    sampler = _engine(url)  # opened to sample only
    rows = [{"ids": SEQ, "format": "text", "value": None}]
    with pytest.raises(ValueError, match=r"n > 1 at temperature 0 .*set n=1"):
        sampler.sample(rows, ["a"], SamplingParams(temperature=0.0, max_new_tokens=4), n=2, seed=0, logprobs=False,
                       batch_size=1)
    with pytest.raises(ValueError, match=r"context of 256 tokens .*sampling.max_new_tokens"):
        sampler.sample(rows, ["a"], SamplingParams(temperature=1.0, max_new_tokens=300), n=1, seed=0,
                       logprobs=False, batch_size=1)


# ------------------------------------------------------------------------------------------- SGLang's /generate
# The client's SGLang path (``teacher.api: sglang``) scores through SGLang's native ``/generate``, which
# ``distill serve`` also answers: the request as python/sglang/srt/managers/io_struct.py, GenerateReqInput reads
# it (defaults from _normalize_single_inputs: return_logprob False, logprob_start_len -1, top_logprobs_num 0), the
# answer as python/sglang/srt/entrypoints/http_server.py, generate_request returns it (one object per prompt, a
# list for a batch), its meta_info as python/sglang/srt/managers/tokenizer_manager.py,
# TokenizerManager.add_logprob_to_meta_info / detokenize_logprob_tokens / detokenize_top_logprobs_tokens write
# it: ``[logprob, token_id, text]`` triples, text null unless return_text_in_logprobs, a position without top
# log-probs null.


def test_sglang_generate_scores_in_sglangs_shape(url, model):
    body = {"input_ids": SEQ, "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 5,
            "sampling_params": {"max_new_tokens": 0, "temperature": 1.0}}
    status, resp = http(url + "/generate", body)
    assert status == 200 and resp["text"] == "" and resp["output_ids"] == []
    meta = resp["meta_info"]
    assert meta["prompt_tokens"] == len(SEQ) and meta["completion_tokens"] == 0
    realized, tops = meta["input_token_logprobs"], meta["input_top_logprobs"]
    assert [t[1] for t in realized] == SEQ and realized[0][0] is None and tops[0] is None
    assert all(t[2] is None for t in realized)
    with torch.no_grad():  # the reference: the model's log-softmax, position p - 1 predicting token p
        lp = torch.log_softmax(model(input_ids=torch.tensor([SEQ])).logits[0, :, :V].double(), -1)
    for pos in range(1, len(SEQ)):
        assert realized[pos][0] == pytest.approx(float(lp[pos - 1, SEQ[pos]]), abs=1e-5)
        want_v, want_i = lp[pos - 1].topk(5)
        assert [t[1] for t in tops[pos]] == want_i.tolist()
        assert [t[0] for t in tops[pos]] == pytest.approx(want_v.tolist(), abs=1e-5)
    # SGLang's defaults: no return_logprob, no log-probs; top_logprobs_num 0, no input_top_logprobs; a batch of
    # input_ids, a list of answers; logprob_start_len s, the positions from s on (s > 0: the first is scored).
    status, resp = http(url + "/generate", {"input_ids": SEQ, "sampling_params": {"max_new_tokens": 0}})
    assert status == 200 and "input_token_logprobs" not in resp["meta_info"]
    status, resp = http(url + "/generate", {**body, "top_logprobs_num": 0, "logprob_start_len": 3,
                                            "input_ids": [SEQ, SEQ[:6]], "return_text_in_logprobs": True})
    assert status == 200 and isinstance(resp, list) and len(resp) == 2
    assert all("input_top_logprobs" not in r["meta_info"] for r in resp)
    short = resp[1]["meta_info"]["input_token_logprobs"]
    assert [t[1] for t in short] == SEQ[3:6] and short[0][0] == pytest.approx(float(lp[2, SEQ[3]]), abs=1e-5)
    assert short[0][2] == byte_tokenizer().decode([SEQ[3]])
    for bad, param in [({"max_new_tokens": -1}, "max_new_tokens"), ({"temperature": -0.5}, "temperature")]:
        status, resp = http(url + "/generate", {**body, "sampling_params": bad})
        assert status == 400 and resp["error"]["param"] == param and resp["error"]["message"]
    status, resp = http(url + "/generate", {**body, "input_ids": [256] * MAX_LEN})
    assert status == 400 and "model's context length (256 tokens)" in resp["error"]["message"]


def _sglang_engine(url: str, **kw) -> ServerEngine:
    return ServerEngine(ServerTeacherSpec(server=url, api="sglang", top_k=kw.pop("spec_top_k", 20)),
                        byte_tokenizer(), **kw)


def test_the_clients_sglang_path_scores_like_its_vllm_path(url):
    """The same model and sequences through the client's SGLang path (/generate) and its vLLM path
    (/v1/completions): the start-up checks pass, and each position has the same ids and log-probs."""
    seqs = [SEQ, [256, *b"print(1 + 2)"], [256, *b"x"]]
    sglang, vllm = _sglang_engine(url, temperature=1.0), _engine(url, temperature=1.0)  # the start-up checks
    for temperature in (1.0, 0.7):
        a, b = sglang.top_logprobs(seqs, 20, temperature), vllm.top_logprobs(seqs, 20, temperature)
        for rows_a, rows_b, seq in zip(a, b, seqs, strict=True):
            assert len(rows_a) == len(seq) and rows_a[0] is None and rows_b[0] is None
            for x, y in zip(rows_a[1:], rows_b[1:], strict=True):
                assert sorted(x[0]) == sorted(y[0])
                ya = dict(zip(*y, strict=True))
                assert all(abs(lp - ya[t]) < 1e-6 for t, lp in zip(*x, strict=True))
    batch = {"input_ids": torch.tensor([SEQ, SEQ[:10] + [0] * (len(SEQ) - 10)]),
             "attention_mask": torch.tensor([[1] * len(SEQ), [1] * 10 + [0] * (len(SEQ) - 10)])}
    ta, tb = sglang.score(batch), vllm.score(batch)  # the training signal: top-20 + realized token + tail
    assert torch.equal(ta.ids, tb.ids)
    torch.testing.assert_close(ta.probs, tb.probs, rtol=0, atol=1e-6)
    torch.testing.assert_close(ta.tail, tb.tail, rtol=0, atol=1e-6)
    assert float(ta.probs.sum()) > 0
    with pytest.raises(ValueError, match=r"teacher.top_k=25 is above the server's cap of 20"):
        _sglang_engine(url, temperature=1.0, spec_top_k=25)


# ------------------------------------------------------------------------------------------- signal: hidden
# ``return_hidden_states`` and ``GET /v1/output_head`` are distill serve's own. vLLM keeps a request's unknown
# fields and ignores them, logging "The following fields were present in the request but ignored"
# (vllm/entrypoints/openai/engine/protocol.py, OpenAIBaseModel: extra="allow", __log_extra_fields__), and has no
# such route (FastAPI's 404). A server answering so is what a teacher with ``signal: hidden`` meets on vLLM.


class _LikeVLLM(JsonHandler):
    """No /v1/output_head (404), and completions that ignore ``return_hidden_states``; ``head``: a server that
    has the route (the refusal then comes from the completions)."""

    head = False

    def do_GET(self):  # noqa: N802 (the standard library's name)
        if self.path == "/v1/output_head" and self.head:
            return self._send(200, {"vocab_size": V, "weight": encode_array(torch.zeros(V, 4)), "bias": None})
        self._send(404, {"detail": "Not Found"})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._send(200, {"choices": [{"index": 0, "text": "", "prompt_logprobs": [None] * len(body["prompt"])}]})


@pytest.mark.parametrize("head", [False, True])
def test_hidden_states_from_a_server_without_them_name_the_setting(head):
    handler = type("Handler", (_LikeVLLM,), {"head": head})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        spec = ServerTeacherSpec(server=f"http://127.0.0.1:{httpd.server_address[1]}", signal="hidden",
                                 check_tokenizer=False, retries=0)
        with pytest.raises(ValueError, match=r"returns no hidden states or output layer .*set "
                                             r"teacher.signal=logprobs, with teacher.top_k=all .*--max-logprobs -1"):
            ServerEngine(spec, byte_tokenizer(), temperature=1.0)
    finally:
        httpd.shutdown()
