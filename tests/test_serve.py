"""`distill serve` as a subprocess on a local port, and the server teacher (train, cache, generate) against it.

Simulated servers (a stdlib HTTP server in a thread) stand in only where the real one cannot misbehave on
purpose: nondeterministic scores, and an endpoint without prompt log-probabilities."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    REPO,
    SMALL_DATA,
    TINY_CACHE,
    TINY_TRAIN,
    JsonHandler,
    free_port,
    http,
    run_cli,
    start_server,
)

from distill import training
from distill.api import evaluate
from distill.caching.reader import TeacherCache
from distill.commands import cache as cache_recipe
from distill.commands import generate as generate_recipe
from distill.config import CacheConfig, GenerateConfig, TrainConfig, load_config
from distill.errors import TeacherServerError
from distill.models import final_hidden, load_model, output_head
from distill.server.client import Client, NoPromptLogprobs, parse_sglang, parse_vllm
from distill.tokenizer import byte_tokenizer

TINY_SERVE = REPO / "configs" / "tiny" / "serve_teacher.yaml"
TINY_EVAL = REPO / "configs" / "tiny" / "eval.yaml"
V = 263


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """The teacher of configs/tiny/train.yaml (sharper: SMALL_DATA runs) saved as an HF checkpoint."""
    from distill.config import ModelSpec

    spec = ModelSpec(**yaml.safe_load(TINY_TRAIN.read_text())["teacher"])
    spec = spec.model_copy(update={"config": {**spec.config, "initializer_range": 0.2}})
    tok = byte_tokenizer()
    out = tmp_path_factory.mktemp("teacher") / "tiny-teacher"
    load_model(spec, "teacher", tok).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server(teacher_dir):
    """``distill serve --max-logprobs -1``: no cap but the vocabulary's size, V = 263 (vllm/sampling_params.py,
    SamplingParams._validate_logprobs reads -1 so)."""
    port = free_port()
    proc = start_server(teacher_dir, port, "--max-logprobs", "-1")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


def with_teacher(*overrides: str) -> list[str]:
    return ["teacher=null", *overrides]


# ------------------------------------------------------------------------------------------- the server


def test_prompt_logprobs_are_the_models(server, teacher_dir):
    status, models = http(f"{server}/v1/models")
    assert status == 200 and models["data"][0]["id"] == "tiny-teacher" and models["data"][0]["max_model_len"] == 256
    status, tok = http(f"{server}/tokenize", {"prompt": "Hello, world", "add_special_tokens": False})
    assert tok["tokens"] == byte_tokenizer()("Hello, world", add_special_tokens=False)["input_ids"]

    seq = [256, *b"def f(x): return x", 257]
    status, resp = http(f"{server}/v1/completions", {"model": "tiny-teacher", "prompt": seq, "max_tokens": 0,
                                                     "echo": True, "prompt_logprobs": 5})
    assert status == 200
    entries = resp["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(seq) and entries[0] is None
    model = load_model(__import__("distill.config", fromlist=["ModelSpec"]).ModelSpec(path=str(teacher_dir)), "t")
    with torch.no_grad():
        batch = {"input_ids": torch.tensor([seq]), "attention_mask": torch.ones(1, len(seq), dtype=torch.long)}
        lp = torch.log_softmax(output_head(model, V).logits(final_hidden(model, batch)[0]).float(), -1)
    for pos in range(1, len(seq)):
        entry = {int(k): v for k, v in entries[pos].items()}
        top_v, top_i = lp[pos - 1].topk(5)
        assert set(top_i.tolist()) <= set(entry) and seq[pos] in entry
        for tid, v in entry.items():
            assert v["logprob"] == pytest.approx(float(lp[pos - 1, tid]), abs=1e-5)
            assert v["rank"] == int((lp[pos - 1] > lp[pos - 1, tid]).sum()) + 1


def test_generation_is_seeded_and_concurrent_requests_share_batches(server):
    body = {"prompt": "Write the given", "max_tokens": 8, "temperature": 1.0, "seed": 11, "n": 2,
            "logprobs": 2, "return_tokens_as_token_ids": True}
    a, b = http(f"{server}/v1/completions", body)[1], http(f"{server}/v1/completions", body)[1]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert a["choices"][0]["text"] != a["choices"][1]["text"] or a["choices"][0]["logprobs"] != a["choices"][1]["logprobs"]
    lp = a["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 8 and all(t.startswith("token_id:") for t in lp["tokens"])
    assert all(x is not None and x <= 0 for x in lp["token_logprobs"])
    before = http(f"{server}/health")[1]
    seq = [256, *b"Return the number of bytes"]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: http(f"{server}/v1/completions",
                                               {"prompt": seq, "max_tokens": 0, "echo": True,
                                                "prompt_logprobs": 3}), range(32)))
    assert all(status == 200 for status, _ in results)
    after = http(f"{server}/health")[1]
    jobs, batches = after["jobs"] - before["jobs"], after["batches"] - before["batches"]
    assert jobs == 32 and batches < jobs, (jobs, batches)  # several requests per model batch


def test_chat_completions_with_logprobs(server):
    status, resp = http(f"{server}/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 5, "logprobs": True, "top_logprobs": 2,
        "seed": 1})
    assert status == 200
    choice = resp["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    content = choice["logprobs"]["content"]
    assert 1 <= len(content) <= 5 and all(len(c["top_logprobs"]) <= 2 and c["logprob"] <= 0 for c in content)


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    cases = [
        ('{"prompt": "x", ', 400, "malformed JSON"),
        ({"model": "gpt-9", "prompt": "x"}, 404, "does not exist"),
        ({"prompt": [256, 72], "max_tokens": 0, "echo": True, "prompt_logprobs": 301}, 400,
         f"greater than max allowed: {V}"),
        ({"prompt": "x" * 300, "max_tokens": 1}, 400, "context length is only 256"),
        ({"prompt": [256, 99999], "max_tokens": 1}, 400, "outside the vocabulary"),
        ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ({"prompt": "x", "n": 0}, 400, "n must be at least 1"),
    ]
    for body, status, message in cases:
        got, resp = http(f"{server}/v1/completions", body)
        assert got == status, (body, resp)
        assert set(resp["error"]) == {"message", "type", "param", "code"} and message in resp["error"]["message"]
        assert resp["error"]["code"] == status
    assert http(f"{server}/health")[0] == 200
    assert http(f"{server}/v1/completions", {"prompt": "fine", "max_tokens": 2})[0] == 200


def test_api_key(teacher_dir):
    port = free_port()
    proc = start_server(teacher_dir, port, "--api-key-env", "MY_KEY", env={"MY_KEY": "s3cret"})
    try:
        url = f"http://127.0.0.1:{port}"
        status, resp = http(f"{url}/v1/models")
        assert status == 401 and resp["error"]["code"] == "invalid_api_key"
        assert http(f"{url}/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert http(f"{url}/health")[0] == 200  # liveness needs no key
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ------------------------------------------------------------------------------------------- response shapes


def test_parsing_the_three_response_shapes():
    seq = [5, 9, 7]
    vllm = {"prompt_logprobs": [None, {"9": {"logprob": -0.1, "rank": 1, "decoded_token": "a"},
                                       "3": {"logprob": -2.5, "rank": 2, "decoded_token": "b"}},
                                {"4": {"logprob": -0.3, "rank": 1, "decoded_token": "c"},
                                 "7": {"logprob": -4.0, "rank": 9, "decoded_token": "d"}}]}
    assert parse_vllm(vllm, seq) == [None, ([9, 3], [-0.1, -2.5]), ([4, 7], [-0.3, -4.0])]
    sglang = {"meta_info": {"input_token_logprobs": [[None, 5, "x"], [-0.1, 9, "a"], [-4.0, 7, "d"]],
                            "input_top_logprobs": [None, [[-0.1, 9, "a"], [-2.5, 3, "b"]], [[-0.3, 4, "c"]]]}}
    assert parse_sglang(sglang, seq) == [None, ([9, 3], [-0.1, -2.5]), ([4, 7], [-0.3, -4.0])]
    openai = {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}
    with pytest.raises(NoPromptLogprobs):
        parse_vllm(openai, seq)
    with pytest.raises(NoPromptLogprobs):
        parse_sglang({"text": "x", "meta_info": {}}, seq)


# ------------------------------------------------------------------------------------------- the server teacher


def losses_of(out: Path, key: str = "loss") -> list[float]:
    return [json.loads(x)[key] for x in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["split"] == "train"]


def test_tiny_serve_teacher_config_trains_like_the_teacher_in_process(tmp_path, server, teacher_dir):
    """``teacher.top_k: all`` from ``distill serve --max-logprobs -1``: the whole vocabulary, no tail, the
    in-process teacher's run step for step."""
    common = [*SMALL_DATA, "train.max_steps=4", "log.every=1", "eval.every=4", "checkpoint.every=0",
              "log.progress=false"]
    remote = load_config(TrainConfig, TINY_SERVE, [f"out_dir={tmp_path / 'remote'}", f"teacher.server={server}",
                                                   "teacher.top_k=all", *common])
    local = load_config(TrainConfig, TINY_TRAIN, [f"out_dir={tmp_path / 'local'}", "teacher.config=null",
                                                  "teacher.tokenizer=null", f"teacher.path={teacher_dir}", *common])
    remote_summary, local_summary = training.train(remote), training.train(local)
    for key in ("loss", "kl", "ce"):
        a, b = losses_of(tmp_path / "remote", key), losses_of(tmp_path / "local", key)
        assert len(a) == 4 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5, (key, a, b)
    assert remote_summary["kl_to_teacher"] == pytest.approx(local_summary["kl_to_teacher"], rel=1e-4)


def test_top_20_from_the_server_trains_like_a_top_20_cache(tmp_path, server, teacher_dir):
    cache = load_config(CacheConfig, TINY_CACHE, [f"out_dir={tmp_path / 'cache'}", "teacher.config=null",
                                                  "teacher.tokenizer=null", f"teacher.path={teacher_dir}", "k=20",
                                                  "prob_bits=16", "tail_bits=16", "progress=false", *SMALL_DATA])
    cache_recipe.main(cache)
    common = [*SMALL_DATA, "train.max_steps=4", "log.every=1", "eval.every=0", "checkpoint.every=0",
              "log.progress=false", "loss.alpha=0"]
    remote = load_config(TrainConfig, TINY_TRAIN, [f"out_dir={tmp_path / 'remote'}", *with_teacher(
        f"teacher.server={server}", "teacher.top_k=20", "teacher.realized_token=false"), *common])
    cached = load_config(TrainConfig, TINY_TRAIN, [f"out_dir={tmp_path / 'cached'}", *with_teacher(
        f"teacher.cache={tmp_path / 'cache'}"), *common])
    training.train(remote)
    training.train(cached)
    a, b = losses_of(tmp_path / "remote"), losses_of(tmp_path / "cached")
    assert max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True)) < 1e-4, (a, b)


def test_cache_from_the_server_equals_the_cache_from_the_model(tmp_path, server, teacher_dir):
    common = ["k=16", "progress=false", *SMALL_DATA]
    from_model = load_config(CacheConfig, TINY_CACHE, [f"out_dir={tmp_path / 'model'}", "teacher.config=null",
                                                       "teacher.tokenizer=null", f"teacher.path={teacher_dir}", *common])
    from_server = load_config(CacheConfig, TINY_CACHE, [f"out_dir={tmp_path / 'server'}", "teacher=null",
                                                        f"teacher.server={server}", "teacher.tokenizer=byte", *common])
    cache_recipe.main(from_model)
    cache_recipe.main(from_server)
    a, b = TeacherCache(tmp_path / "model"), TeacherCache(tmp_path / "server")
    same_rows = rows = 0
    for i in range(len(a)):
        ra, _ = a.raw(i)
        rb, _ = b.raw(i)
        same = (ra["ids"] == rb["ids"]).all(1) & (ra["codes"] == rb["codes"]).all(1) & (ra["tail_codes"] == rb["tail_codes"])
        same_rows, rows = same_rows + int(same.sum()), rows + len(same)
    # The same targets up to the order of near-ties and a rounding at a code boundary.
    assert same_rows >= 0.999 * rows, (same_rows, rows)
    with pytest.raises(ValueError, match="mode=sampled needs the teacher's whole distribution"):
        cache_recipe.main(from_server.model_copy(update={"mode": "sampled", "out_dir": str(tmp_path / "s")}))


def test_generate_with_the_server_teacher_trains(tmp_path, server):
    cfg = load_config(GenerateConfig, REPO / "configs" / "tiny" / "generate.yaml", [
        f"out_dir={tmp_path / 'gen'}", "teacher=null", f"teacher.server={server}", "progress=false"])
    counts = generate_recipe.main(cfg)
    assert counts["kept"] == 8
    student = load_config(TrainConfig, TINY_TRAIN, [f"out_dir={tmp_path / 'student'}", "teacher=null",
                                                    f"data.source={tmp_path / 'gen'}", "data.packing=false",
                                                    "data.truncate=true", "data.eval_fraction=0", "train.max_steps=2",
                                                    "eval.every=0", "checkpoint.every=0", "log.progress=false",
                                                    "train.batch_size=4", "train.grad_accum=1"])
    assert training.train(student)["steps"] == 2


def test_eval_with_the_server_teacher_equals_the_teacher_in_process(tmp_path, server, teacher_dir):
    """distill eval against distill serve (which keeps vLLM's request rules): with the whole vocabulary
    (top_k: all) the distance to the teacher is the in-process teacher's."""
    common = [f"models.student.path={teacher_dir}", "models.student.config=null", "models.student.tokenizer=null",
              "speculative=null", "max_batches=2"]
    live = evaluate(TINY_EVAL, *common, out=str(tmp_path / "live.json"),
                        teacher={"path": str(teacher_dir), "config": None, "tokenizer": None, "seed": 0})
    remote = evaluate(TINY_EVAL, *common, "teacher=null", f"teacher.server={server}", "teacher.top_k=all",
                          "teacher.tokenizer=byte", out=str(tmp_path / "remote.json"))
    a, b = live.models["student"], remote.models["student"]
    assert a["kl_to_teacher"] == pytest.approx(0, abs=1e-5)  # the student is the teacher
    assert b["kl_to_teacher"] == pytest.approx(a["kl_to_teacher"], abs=1e-5)
    assert b["top1_agreement"] == a["top1_agreement"] == 1.0
    # The student's CE: from the chunk's log-softmax beside a dense teacher, from its softmax's normalizer beside
    # the server's sparse target (docs/methods.md §4): the same value up to fp32 rounding.
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6)


def test_unusable_servers_are_refused_with_the_reason(tmp_path, server):
    base = [f"out_dir={tmp_path / 'x'}", *SMALL_DATA, "train.max_steps=1", "log.progress=false"]
    with pytest.raises(ValueError, match=rf"teacher.top_k=400 is above the server's cap of {V}"):
        training.train(load_config(TrainConfig, TINY_TRAIN, [*base, *with_teacher(f"teacher.server={server}",
                                                                              "teacher.top_k=400")]))
    with pytest.raises(ValueError, match="returns log-probs at T=1 whatever the request's temperature"):
        training.train(load_config(TrainConfig, TINY_TRAIN, [*base, "loss.temperature=2.0", *with_teacher(
            f"teacher.server={server}")]))
    with pytest.raises(ValueError, match="teacher.model=other is not served"):
        training.train(load_config(TrainConfig, TINY_TRAIN, [*base, *with_teacher(f"teacher.server={server}",
                                                                              "teacher.model=other")]))
    # Another tokenizer for the student: the server's /tokenize disagrees on the probes.
    other = byte_tokenizer()
    other.add_tokens(["def", " return"])
    other.save_pretrained(tmp_path / "other-tok")
    with pytest.raises(ValueError, match="tokenizes differently from the student's tokenizer"):
        training.train(load_config(TrainConfig, TINY_TRAIN, [*base, f"student.tokenizer={tmp_path / 'other-tok'}",
                                                         *with_teacher(f"teacher.server={server}")]))
    with pytest.raises(Exception, match=r"127.0.0.1:9 did not answer .* after 2 tries"):
        training.train(load_config(TrainConfig, TINY_TRAIN, [*base, *with_teacher(
            "teacher.server=http://127.0.0.1:9", "teacher.retries=1", "teacher.timeout=2")]))


class _Fake(JsonHandler):
    """A server that tokenizes like the byte tokenizer and scores in vLLM's shape, badly on purpose."""

    mode = "noisy"

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize":
            return self._send(200, {"tokens": byte_tokenizer()(body["prompt"], add_special_tokens=False)["input_ids"]})
        seq = body["prompt"]
        choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}
        if self.mode == "noisy":  # every request draws other scores: replicas or a stale prefix cache
            noise = torch.rand(len(seq)).tolist()
            choice["prompt_logprobs"] = [None] + [{str(t): {"logprob": -1.0 - noise[i], "rank": 1}}
                                                  for i, t in enumerate(seq[1:])]
        self._send(200, {"choices": [choice]})


@pytest.mark.parametrize(("mode", "message"), [
    ("noisy", "scored the same sequence twice and the log-probs differ"),
    ("plain", "returns no prompt log-probabilities .* `distill generate`"),
])
def test_simulated_bad_servers_are_refused(tmp_path, mode, message):
    handler = type("Handler", (_Fake,), {"mode": mode})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        cfg = load_config(TrainConfig, TINY_TRAIN, [f"out_dir={tmp_path / 'x'}", *SMALL_DATA, "train.max_steps=1",
                                                    *with_teacher(f"teacher.server={url}")])
        with pytest.raises(ValueError, match=message):
            training.train(cfg)
    finally:
        httpd.shutdown()


def test_client_retries_then_names_the_url(monkeypatch):
    """A dropped connection and a 5xx answer are tried retries + 1 times in all, with the backoff doubling between
    tries (the sleeps the client asks for are recorded), then fail naming the URL; a 4xx answer is the request's
    fault and is not retried."""
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the standard library's name)
            calls.append(self.path)
            if self.path in ("/busy", "/bad"):
                body = json.dumps({"error": {"message": "busy now" if self.path == "/busy" else "no such route"}})
                self.send_response(503 if self.path == "/busy" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())
            else:  # the connection closes with no answer at all
                self.close_connection = True

        def log_message(self, *args):
            pass

    delays = []
    real_sleep = time.sleep

    def sleep(seconds):
        delays.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr("distill.server.client.time.sleep", sleep)  # (the time module's: restored after the test)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        client = Client(url, retries=3, backoff=0.05, timeout=5)
        with pytest.raises(TeacherServerError, match=rf"teacher server {url} did not answer /v1/models after 4 tries"):
            client.request("GET", "/v1/models")
        assert calls == ["/v1/models"] * 4
        assert delays == pytest.approx([0.05, 0.1, 0.2])
        calls.clear()
        delays.clear()
        with pytest.raises(TeacherServerError, match=rf"{url} did not answer /busy after 4 tries \(HTTP 503: busy now"):
            client.request("GET", "/busy")
        assert calls == ["/busy"] * 4 and delays == pytest.approx([0.05, 0.1, 0.2])
        calls.clear()
        delays.clear()
        with pytest.raises(ValueError, match=rf"teacher server {url}/bad refused the request \(HTTP 404\): no such route"):
            client.request("GET", "/bad")
        assert calls == ["/bad"] and delays == []
    finally:
        httpd.shutdown()
    # Nothing listening at all (a refused connection): also retried, then named.
    port = free_port()
    delays.clear()
    with pytest.raises(TeacherServerError, match=rf"teacher server http://127.0.0.1:{port} did not answer /v1/models "
                                                 r"after 3 tries"):
        Client(f"http://127.0.0.1:{port}", retries=2, backoff=0.01, timeout=5).request("GET", "/v1/models")
    assert delays == pytest.approx([0.01, 0.02])


@pytest.mark.slow
def test_server_killed_mid_run_then_resume(tmp_path, teacher_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(teacher_dir, port, "--max-logprobs", "300")
    out = tmp_path / "run"
    args = [str(TINY_SERVE), f"out_dir={out}", f"teacher.server={url}", "teacher.retries=2", "teacher.timeout=5",
            *SMALL_DATA, "train.max_steps=12", "checkpoint.every=2", "eval.every=0", "log.every=1", "log.progress=false"]
    trainer = subprocess.Popen([sys.executable, "-m", "distill", "train", *args], cwd=REPO,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "step_00000004").exists():
            assert trainer.poll() is None and time.time() < deadline
            time.sleep(0.05)
        proc.kill()  # the teacher goes away mid-run
        proc.wait()
        _, err = trainer.communicate(timeout=120)
        assert trainer.returncode == 1, err[-2000:]
        assert f"teacher server {url} did not answer" in err and "--resume" in err and "Traceback" not in err
        kept = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert kept and all((out / "checkpoints" / k / "trainer_state.json").is_file() for k in kept)
        assert not (out / "student").exists()
    finally:
        if trainer.poll() is None:
            trainer.kill()
    proc = start_server(teacher_dir, port, "--max-logprobs", "300")
    try:
        res = run_cli("train", *args, "--resume", env={"OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-2000:]
        assert "resumed from" in res.stderr
        assert [r for r in losses_of(out)] and len(losses_of(out)) == 12
        assert (out / "student" / "model.safetensors").is_file()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize(("method", "extra"), [
    ("gkd", ["train.batches.student_fraction=1"]),
    ("gkd", ["train.batches.student_fraction=1", "loss.divergence=sampled_reverse_kl"]),
    ("skd", ["train.batches.skd_top_k=5"]),
])
def test_on_policy_sources_with_the_server_teacher(tmp_path, server, method, extra):
    cfg = load_config(TrainConfig, REPO / "configs" / "tiny" / f"{method}.yaml", [
        f"out_dir={tmp_path / 'run'}", "log.progress=false", "teacher=null", f"teacher.server={server}",
        "train.max_steps=3", "eval.every=3", "checkpoint.every=0", *extra])
    summary = training.train(cfg)
    recs = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"]
    assert len(recs) == 3 and all(r["on_policy"] == 1.0 and r["teacher_seconds"] > 0 for r in recs)
    assert all(math.isfinite(r["loss"]) for r in recs) and "kl_to_teacher" in summary
    if method == "skd":
        assert all(0 < r["skd_replacement_rate"] <= 1 for r in recs)  # a random student is corrected often


def test_client_retries_a_response_cut_mid_body():
    """A server that dies while writing a response (the client reads fewer bytes than Content-Length) is retried
    like a refused connection; the next complete answer is returned."""
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the standard library's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            calls.append(1)
            body = b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body) + (1000 if len(calls) == 1 else 0)))
            self.end_headers()
            self.wfile.write(body)  # the first answer is cut short: the connection closes after it

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = Client(f"http://127.0.0.1:{server.server_address[1]}", retries=2, backoff=0.01, timeout=5)
        assert client.request("POST", "/v1/completions", {"x": 1}) == {"ok": True}
        assert len(calls) == 2
    finally:
        server.shutdown()


def test_a_teacher_through_sglangs_api_trains_like_through_vllms(tmp_path, server):
    """``teacher.api: sglang`` scores through SGLang's native /generate (distill serve answers it in SGLang's
    shape, tests/test_engine_contract.py): a run from it trains as the one through /v1/completions, step by
    step, on the same server and model."""
    common = [*SMALL_DATA, "train.max_steps=3", "log.every=1", "eval.every=0", "checkpoint.every=0",
              "log.progress=false", f"teacher.server={server}", "teacher.top_k=20"]
    for api in ("sglang", "vllm"):
        training.train(load_config(TrainConfig, TINY_SERVE, [f"out_dir={tmp_path / api}", f"teacher.api={api}",
                                                             *common]))
    for key in ("loss", "kl", "ce"):
        a, b = losses_of(tmp_path / "sglang", key), losses_of(tmp_path / "vllm", key)
        assert len(a) == 3 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-6, (key, a, b)
