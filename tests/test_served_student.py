"""The student sampled on a server (``train.batches.sampler``): ``distill serve``'s ``/update_weights_from_disk``
against SGLang's request and answer, a served gkd run against the in-process one, staleness, and a server
killed mid-run then ``--resume``."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port, start_server
from conftest import http as post
from safetensors.torch import load_file

from distill import training
from distill.config import ConfigError, ModelSpec, TrainConfig, load_config
from distill.errors import TeacherServerError
from distill.generation.sampling import SamplingParams, sample
from distill.models import load_model, save_pretrained
from distill.tokenizer import byte_tokenizer

TINY_SERVED = REPO / "configs" / "tiny" / "gkd_served.yaml"
TIMING = {"tokens_per_s", "step_seconds", "gen_seconds", "train_seconds", "teacher_seconds"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=30)
    proc.stderr.close()


def student_spec(seed: int) -> ModelSpec:
    cfg = load_config(TrainConfig, TINY_SERVED, [])
    return ModelSpec(tokenizer="byte", seed=seed, config=cfg.student.config)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    """A model of the tiny student's architecture (other weights: the run publishes its own before sampling)."""
    out = tmp_path_factory.mktemp("served") / "start"
    tok = byte_tokenizer()
    save_pretrained(load_model(student_spec(7), "student", tok), tok, out)
    return out


@pytest.fixture(scope="module")
def server(student_dir):
    port = free_port()
    proc = start_server(student_dir, port)
    yield f"http://127.0.0.1:{port}"
    stop(proc)


def served_cfg(out: Path, url: str, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, TINY_SERVED, [f"out_dir={out}", "log.progress=false",
                                                  f"train.batches.sampler.server={url}", *overrides])


def records(out: Path, split: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def assert_same_records(a: list[dict], b: list[dict]) -> None:
    """The same records, timing aside, to float tolerance."""
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert set(ra) == set(rb)
        for key in set(ra) - TIMING:
            assert ra[key] == (pytest.approx(rb[key], rel=1e-6, abs=1e-9) if isinstance(rb[key], float) else rb[key]), key


# ------------------------------------------------------------------------------------------- the endpoint


def test_update_weights_from_disk_answers_as_sglang_and_serves_the_new_weights(server, tmp_path):
    # SGLang's request (UpdateWeightFromDiskReqInput: model_path, weight_version, ...; python/sglang/srt/managers/
    # io_struct.py) and answer ({success, message, num_paused_requests}, 200 / 400; python/sglang/srt/entrypoints/
    # http_server.py, update_weights_from_disk).
    tok = byte_tokenizer()
    other = load_model(student_spec(11), "student", tok).eval()
    save_pretrained(other, tok, tmp_path / "other")
    status, body = post(f"{server}/update_weights_from_disk", {"model_path": str(tmp_path / "other"),
                                                               "weight_version": "3", "flush_cache": True})
    assert status == 200 and body["success"] is True and body["num_paused_requests"] == 0
    prompt = [tok.bos_token_id, *tok("12+7=", add_special_tokens=False)["input_ids"]]
    status, done = post(f"{server}/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0,
                                                     "return_token_ids": True})
    want = sample(other, [prompt], SamplingParams(temperature=0.0, max_new_tokens=6, stop_ids=(tok.eos_token_id,)),
                  pad_id=tok.pad_token_id)
    assert status == 200 and done["choices"][0]["token_ids"] == want.completions()[0]

    status, body = post(f"{server}/update_weights_from_disk", {"model_path": str(tmp_path / "missing")})
    assert status == 400 and body["success"] is False and "model_path" in body["message"]
    wide = ModelSpec(tokenizer="byte", seed=1, config={**student_spec(1).config, "hidden_size": 64,
                                                         "intermediate_size": 128})
    save_pretrained(load_model(wide, "student", tok), tok, tmp_path / "wide")
    status, body = post(f"{server}/update_weights_from_disk", {"model_path": str(tmp_path / "wide")})
    assert status == 400 and body["success"] is False and "another architecture" in body["message"]


# ------------------------------------------------------------------------------------------- the run


def test_the_served_run_equals_the_in_process_run(server, tmp_path):
    t0 = time.perf_counter()
    served = served_cfg(tmp_path / "served", server)
    training.train(served)
    local = served_cfg(tmp_path / "local", server, "train.batches.sampler=null")
    assert local.train.batches.sampler is None
    training.train(local)
    print(f"served + in-process tiny runs: {time.perf_counter() - t0:.1f}s")
    a, b = records(tmp_path / "served"), records(tmp_path / "local")
    assert len(a) == served.train.max_steps
    assert [r.pop("sampler_staleness") for r in a] == [0.0] * len(a)  # sync_every 1: each step its own weights
    assert_same_records(a, b)
    assert_same_records(records(tmp_path / "served", "eval"), records(tmp_path / "local", "eval"))
    wa, wb = (load_file(str(p / "student" / "model.safetensors")) for p in (tmp_path / "served", tmp_path / "local"))
    for name in wb:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-6, atol=1e-7)
    # The published weights a checkpoint names are kept for --resume; no other.
    kept = sorted(p.name for p in (tmp_path / "served" / "sampler").iterdir())
    assert kept == ["step_00000002", "step_00000005"]


def test_a_lora_student_is_published_merged_and_its_served_run_equals_the_in_process_one(server, tmp_path):
    pytest.importorskip("peft")
    lora = ["student.lora.r=4", "student.lora.alpha=8", "student.lora.dropout=0", "train.max_steps=3",
            "checkpoint.every=0", "eval.every=0"]
    served = served_cfg(tmp_path / "served", server, *lora)
    assert served.student.lora is not None
    training.train(served)
    training.train(served_cfg(tmp_path / "local", server, *lora, "train.batches.sampler=null"))
    a, b = records(tmp_path / "served"), records(tmp_path / "local")
    assert [r.pop("sampler_staleness") for r in a] == [0.0] * 3
    assert_same_records(a, b)
    published = load_file(str(tmp_path / "served" / "sampler" / "step_00000002" / "model.safetensors"))
    assert not any("lora" in name for name in published)  # an ordinary checkpoint: the adapters merged in


def post_text(url: str, body: dict) -> tuple[int, str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def publish_base(server: str, tmp_path: Path) -> TrainConfig:
    """The server on the tiny student's base weights (what a LoRA student's adapters apply to)."""
    cfg = load_config(TrainConfig, TINY_SERVED, [])
    tok = byte_tokenizer()
    save_pretrained(load_model(student_spec(cfg.student.seed), "student", tok), tok, tmp_path / "base")
    assert post(f"{server}/update_weights_from_disk", {"model_path": str(tmp_path / "base")})[0] == 200
    return cfg


def test_load_lora_adapter_answers_as_vllm_and_serves_the_adapted_weights(server, tmp_path):
    """vLLM's runtime LoRA API: LoadLoRAAdapterRequest {lora_name, lora_path, load_inplace} and
    UnloadLoRAAdapterRequest (vllm/entrypoints/serve/lora/protocol.py); plain-text success, and its errors
    (vllm/entrypoints/openai/serving_models.py, OpenAIServingModels.load_lora_adapter / unload_lora_adapter)."""
    pytest.importorskip("peft")
    from distill import lora
    from distill.config import LoraConfig

    cfg = publish_base(server, tmp_path)
    tok = byte_tokenizer()
    student = lora.add_adapters(load_model(student_spec(cfg.student.seed), "student", tok),
                                LoraConfig(r=4, alpha=8, dropout=0.0), seed=3)
    with torch.no_grad():  # adapters that change the model (B starts at zero)
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    lora.save_adapter(student, tmp_path / "adapter")
    status, text = post_text(f"{server}/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": str(tmp_path / "adapter")})
    assert (status, text) == (200, "Success: LoRA adapter 'sql' added successfully.")
    with urllib.request.urlopen(f"{server}/v1/models", timeout=30) as resp:
        cards = json.loads(resp.read())["data"]
    assert [c["id"] for c in cards][1:] == ["sql"] and cards[1]["parent"] == cards[0]["id"]

    prompt = [tok.bos_token_id, *tok("12+7=", add_special_tokens=False)["input_ids"]]
    params = SamplingParams(temperature=0.0, max_new_tokens=6, stop_ids=(tok.eos_token_id,))
    want = sample(lora.merged(student).eval(), [prompt], params, pad_id=tok.pad_token_id).completions()[0]
    base = sample(load_model(student_spec(cfg.student.seed), "student", tok).eval(), [prompt], params,
                  pad_id=tok.pad_token_id).completions()[0]
    assert want != base  # the adapter changes what is sampled
    status, done = post(f"{server}/v1/completions", {"model": "sql", "prompt": prompt, "max_tokens": 6,
                                                     "temperature": 0, "return_token_ids": True})
    assert status == 200 and done["choices"][0]["token_ids"] == want

    status, body = post(f"{server}/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": str(tmp_path / "adapter")})
    assert status == 400 and body["error"]["type"] == "BadRequestError"
    assert "has already been loaded. If you want to load the adapter in place, set 'load_inplace'" in body["error"]["message"]
    status, text = post_text(f"{server}/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": str(tmp_path / "adapter"),
                                                                "load_inplace": True})
    assert status == 200
    status, body = post(f"{server}/v1/load_lora_adapter", {"lora_name": "other", "lora_path": str(tmp_path / "none")})
    assert status in (400, 404) and body["error"]["code"] == status
    status, text = post_text(f"{server}/v1/unload_lora_adapter", {"lora_name": "sql"})
    assert (status, text) == (200, "Success: LoRA adapter 'sql' removed successfully.")
    status, done = post(f"{server}/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0,
                                                     "return_token_ids": True})
    assert done["choices"][0]["token_ids"] == base  # the base weights again
    status, body = post(f"{server}/v1/unload_lora_adapter", {"lora_name": "sql"})
    assert status == 404 and body["error"]["type"] == "NotFoundError"
    status, body = post(f"{server}/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "none")})
    assert status == 404 and "No adapter found for" in body["error"]["message"]


def test_a_lora_students_adapters_published_through_load_lora_adapter_equal_the_in_process_run(server, tmp_path):
    pytest.importorskip("peft")
    publish_base(server, tmp_path)
    lora = ["student.lora.r=4", "student.lora.alpha=8", "student.lora.dropout=0", "train.max_steps=3",
            "checkpoint.every=0", "eval.every=0"]
    served = served_cfg(tmp_path / "served", server, *lora, "train.batches.sampler.publish=lora_adapter")
    training.train(served)
    training.train(served_cfg(tmp_path / "local", server, *lora, "train.batches.sampler=null"))
    a, b = records(tmp_path / "served"), records(tmp_path / "local")
    assert [r.pop("sampler_staleness") for r in a] == [0.0] * 3
    assert_same_records(a, b)
    published = sorted(p.name for p in (tmp_path / "served" / "sampler" / "step_00000002").iterdir())
    assert "adapter_config.json" in published and "model.safetensors" not in published  # the adapters alone
    assert post_text(f"{server}/v1/unload_lora_adapter", {"lora_name": "student"})[0] == 200
    with pytest.raises(ValueError, match="publish=lora_adapter publishes a LoRA student's adapters"):
        training.train(served_cfg(tmp_path / "plain", server, "train.batches.sampler.publish=lora_adapter"))


def test_staleness_is_the_steps_since_the_weights_that_sampled(server, tmp_path):
    cfg = served_cfg(tmp_path / "run", server, "train.batches.sampler.sync_every=3", "train.max_steps=5",
                     "checkpoint.every=0")
    training.train(cfg)
    # Publications at steps 0 and 3: steps 0..4 sample from weights 0, 1, 2, 0, 1 steps old.
    assert [r["sampler_staleness"] for r in records(Path(cfg.out_dir))] == [0, 1, 2, 0, 1]


def test_skd_refuses_a_sampling_server(tmp_path):
    with pytest.raises(ConfigError, match="train.batches.sampler"):
        load_config(TrainConfig, TINY_SERVED, ["train.batches=skd", "train.batches.sampler.server=http://127.0.0.1:1"])


def test_a_server_killed_mid_run_stops_the_run_and_resume_equals_an_uninterrupted_run(student_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # sync_every 2: the checkpoint of step 3 names the weights of step 2, which the resumed run's step 3 samples from.
    full = served_cfg(tmp_path / "full", url, "train.batches.sampler.sync_every=2")
    cut = served_cfg(tmp_path / "cut", url, "train.batches.sampler.sync_every=2", "train.batches.sampler.retries=1")
    proc = start_server(student_dir, port)
    try:
        training.train(full)

        def kill_at_four(record: dict) -> None:
            if record["step"] == 4:  # after the checkpoint of step 3
                stop(proc)

        with pytest.raises(TeacherServerError, match="start the server again.*--resume"):
            training.train(cut, on_step=kill_at_four)
    finally:
        if proc.poll() is None:
            stop(proc)
    # The restarted server holds its starting weights: the resumed run loads the ones its checkpoint sampled with.
    proc = start_server(student_dir, port)
    try:
        training.train(cut, resume=True)
    finally:
        stop(proc)
    wa, wb = (load_file(str(p / "student" / "model.safetensors")) for p in (tmp_path / "full", tmp_path / "cut"))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-6, atol=1e-7)
    assert_same_records(records(tmp_path / "cut"), records(tmp_path / "full"))
    assert_same_records(records(tmp_path / "cut", "eval"), records(tmp_path / "full", "eval"))
