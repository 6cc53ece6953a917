"""A remote teacher with no loss of information: the whole vocabulary (``teacher.top_k: all`` against a server
started with ``--max-logprobs -1``) and the final hidden states with the output layer (``teacher.signal:
hidden``, ``distill serve`` only). Each trains step for step as the same teacher in this process.

The server is ``distill serve``'s app in this process (uvicorn on a thread, as tests/test_engine_contract.py),
on the tiny teacher of tests/test_serve.py saved as an HF checkpoint and loaded back as ``distill serve`` loads it.
vLLM's rule for -1: vllm/sampling_params.py, SamplingParams._validate_logprobs (``max_logprobs == -1`` is the
vocabulary's size, ``prompt_logprobs == -1`` too) and vllm/config/model.py, ModelConfig (max_logprobs >= -1)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, SMALL_DATA, TINY_TRAIN, serving_in_process

from distill import training
from distill.config import ModelSpec, ServerTeacherSpec, TrainConfig, load_config
from distill.engines import ServerEngine
from distill.losses import DenseSignal
from distill.models import final_hidden, load_model, output_head
from distill.server.client import decode_array, encode_array
from distill.tokenizer import byte_tokenizer

TINY_SERVE = REPO / "configs" / "tiny" / "serve_teacher.yaml"
V = 263  # the byte tokenizer's vocabulary
SEQ = [256, *b"def f(x): return x"]


def http(url: str, body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """The teacher of configs/tiny/train.yaml, sharper (as tests/test_serve.py's), as an HF checkpoint."""
    spec = ModelSpec(**yaml.safe_load(TINY_TRAIN.read_text())["teacher"])
    spec = spec.model_copy(update={"config": {**spec.config, "initializer_range": 0.2}})
    out = tmp_path_factory.mktemp("teacher") / "tiny-teacher"
    load_model(spec, "teacher", byte_tokenizer()).save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model(teacher_dir):
    return load_model(ModelSpec(path=str(teacher_dir)), "teacher").eval()


@pytest.fixture(scope="module")
def url(model):
    """The teacher served with no cap (``distill serve --max-logprobs -1``)."""
    with serving_in_process(model, byte_tokenizer(), "tiny-teacher", max_logprobs=-1) as address:
        yield address


@pytest.fixture(scope="module")
def capped(model):
    """The teacher served with vLLM's default cap of 20."""
    with serving_in_process(model, byte_tokenizer(), "tiny-teacher", max_logprobs=20) as address:
        yield address


def reference(model, seq: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The final hidden states (T, H) and the log-softmax (T, V) of the model in this process, float64."""
    with torch.no_grad():
        batch = {"input_ids": torch.tensor([seq]), "attention_mask": torch.ones(1, len(seq), dtype=torch.long)}
        hidden = final_hidden(model, batch)[0]
        return hidden, torch.log_softmax(output_head(model, V).logits(hidden).double(), -1)


# ------------------------------------------------------------------------------------------- the server


def test_minus_one_is_the_whole_vocabulary_without_a_cap(url, capped, model):
    status, resp = http(url + "/v1/completions", {"prompt": SEQ, "max_tokens": 0, "echo": True,
                                                  "prompt_logprobs": -1})
    assert status == 200
    entries = resp["choices"][0]["prompt_logprobs"]
    _, lp = reference(model, SEQ)
    assert entries[0] is None and len(entries) == len(SEQ)
    for pos in range(1, len(SEQ)):
        got = {int(t): v["logprob"] for t, v in entries[pos].items()}
        assert sorted(got) == list(range(V))
        assert max(abs(got[t] - float(lp[pos - 1, t])) for t in got) < 1e-5
    # With a cap, -1 is the vocabulary's size and refused above it (as vLLM words it).
    status, resp = http(capped + "/v1/completions", {"prompt": SEQ, "max_tokens": 0, "echo": True,
                                                     "prompt_logprobs": -1})
    assert status == 400 and f"Requested prompt logprobs of {V}, which is greater than max allowed: 20" in \
        resp["error"]["message"]
    from distill.server.app import serve

    with pytest.raises(ValueError, match=r"--max-logprobs -2: give a count >= 0, or -1 for no cap"):
        serve("unused-dir", max_logprobs=-2)


def test_hidden_states_and_output_layer_are_the_models(url, model):
    status, resp = http(url + "/v1/completions", {"prompt": [SEQ, SEQ[:7]], "max_tokens": 0, "echo": True,
                                                  "return_hidden_states": True})
    assert status == 200
    for choice, seq in zip(resp["choices"], [SEQ, SEQ[:7]], strict=True):
        packed = choice["hidden_states"]
        assert packed["dtype"] == "float32" and packed["byteorder"] == "little" and isinstance(packed["data"], str)
        want, _ = reference(model, seq)
        got = decode_array(packed)
        assert list(got.shape) == list(want.shape) == [len(seq), model.config.hidden_size]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    status, head = http(url + "/v1/output_head")
    assert status == 200 and head["vocab_size"] == V and head["bias"] is None and head["softcap"] is None
    assert torch.equal(decode_array(head["weight"]), output_head(model, V).sliced()[0])
    assert http(url + "/v1/output_head?model=other")[0] == 404
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # the bytes come back as they were
        t = torch.randn(3, 5).to(dtype)
        assert torch.equal(decode_array(encode_array(t)), t)


# ------------------------------------------------------------------------------------------- the client


def test_both_modes_give_the_in_process_signal(url, model):
    """The same batch (one row padded): ``top_k: all`` gives every id's probability and no tail (through
    /v1/completions and SGLang's /generate alike); ``signal: hidden`` the in-process teacher's hidden states and
    output layer."""
    batch = {"input_ids": torch.tensor([SEQ, SEQ[:10] + [0] * (len(SEQ) - 10)]),
             "attention_mask": torch.tensor([[1] * len(SEQ), [1] * 10 + [0] * (len(SEQ) - 10)])}
    whole = ServerEngine(ServerTeacherSpec(server=url, top_k="all"), byte_tokenizer(), temperature=1.0)
    target = whole.score(batch)
    assert target.ids.shape[-1] == V
    # SGLang's /generate takes a count, not -1: the client asks for the vocabulary's size, the same signal.
    sglang = ServerEngine(ServerTeacherSpec(server=url, top_k="all", api="sglang"), byte_tokenizer(), temperature=1.0)
    other = sglang.score(batch)
    torch.testing.assert_close(torch.zeros(other.ids.shape[0], V).scatter_(1, other.ids, other.probs),
                               torch.zeros(target.ids.shape[0], V).scatter_(1, target.ids, target.probs), rtol=0,
                               atol=1e-6)
    dense = ServerEngine(ServerTeacherSpec(server=url, signal="hidden"), byte_tokenizer(), temperature=1.0)
    signal = dense.score(batch)
    assert isinstance(signal, DenseSignal) and dense.dense and "exact" in dense.describe()
    for row, n in ((0, len(SEQ)), (1, 10)):
        hidden, lp = reference(model, batch["input_ids"][row, :n].tolist())
        rows = slice(row * (len(SEQ) - 1), row * (len(SEQ) - 1) + n - 1)
        torch.testing.assert_close(signal.hidden[rows], hidden[:-1], rtol=0, atol=1e-5)
        got = torch.log_softmax(signal.head.logits(signal.hidden[rows]).double(), -1)
        torch.testing.assert_close(got, lp[:-1], rtol=0, atol=1e-5)
        probs = torch.zeros(n - 1, V, dtype=torch.float64)
        probs.scatter_(1, target.ids[rows], target.probs[rows].double())
        torch.testing.assert_close(probs, lp[:-1].exp(), rtol=0, atol=1e-6)
        assert float(target.tail[rows].abs().max()) == 0.0  # every id is there: no tail


def test_refusals_name_what_to_change(capped):
    with pytest.raises(ValueError, match=r"teacher.top_k=all asks for the whole vocabulary \(263 log-probs per "
                                         r"position\), above the server's cap of 20 .*--max-logprobs -1"):
        ServerEngine(ServerTeacherSpec(server=capped, top_k="all"), byte_tokenizer(), temperature=1.0)
    with pytest.raises(ValueError, match=r"top_k=-1: give a count > 0 .* or all"):
        ServerTeacherSpec(server=capped, top_k=-1)
    with pytest.raises(ValueError, match=r"signal: hidden reads distill serve's /v1/completions"):
        ServerTeacherSpec(server=capped, signal="hidden", api="sglang")


# ------------------------------------------------------------------------------------------- training


def losses_of(out: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def test_a_run_from_either_mode_is_the_in_process_teachers_run(tmp_path, url, teacher_dir):
    """``distill train`` from the server with ``top_k: all`` and with ``signal: hidden``, against the same
    teacher in this process: loss, KL and CE equal step by step, and the final distance to the teacher."""
    common = [*SMALL_DATA, "train.max_steps=4", "log.every=1", "eval.every=4", "checkpoint.every=0",
              "log.progress=false"]
    runs = {
        "local": load_config(TrainConfig, TINY_TRAIN, [f"out_dir={tmp_path / 'local'}", "teacher.config=null",
                                                       "teacher.tokenizer=null", f"teacher.path={teacher_dir}",
                                                       *common]),
        "all": load_config(TrainConfig, TINY_SERVE, [f"out_dir={tmp_path / 'all'}", f"teacher.server={url}",
                                                     "teacher.top_k=all", *common]),
        "hidden": load_config(TrainConfig, TINY_SERVE, [f"out_dir={tmp_path / 'hidden'}", f"teacher.server={url}",
                                                        "teacher.signal=hidden", *common]),
    }
    summaries = {name: training.train(cfg) for name, cfg in runs.items()}
    for name in ("all", "hidden"):
        for key in ("loss", "kl", "ce"):
            a, b = losses_of(tmp_path / name, key), losses_of(tmp_path / "local", key)
            worst = max(abs(x - y) for x, y in zip(a, b, strict=True))
            print(f"{name} {key}: largest step difference to in-process {worst:.2e}")
            assert len(a) == 4 and worst < 1e-5, (name, key, a, b)
        assert summaries[name]["kl_to_teacher"] == pytest.approx(summaries["local"]["kl_to_teacher"], rel=1e-4)
