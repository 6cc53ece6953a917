"""Every model directory distill writes reloads as written, in every model family distill names.

The rule checked is transformers' own loading, not distill's: a directory is reloaded here with plain
``AutoTokenizer.from_pretrained(dir)`` and ``AutoModelForCausalLM.from_pretrained(dir)``. In transformers 5
(``models/auto/tokenization_auto.py``, ``AutoTokenizer.from_pretrained``) the tokenizer class is not simply
the ``tokenizer_class`` of tokenizer_config.json: for a ``model_type`` in ``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS``
(qwen2 among them) whose registered class (``TOKENIZER_MAPPING_NAMES``: Qwen2Tokenizer) differs from the saved
one, the registered class is used, and that class (``models/qwen2/tokenization_qwen2.py``) rebuilds the backend
from the saved vocabulary with its own normalizer (NFC), pre-tokenizer and default special tokens
(``<|endoftext|>``). For the other families the saved ``tokenizer_class`` (TokenizersBackend) is trusted and
tokenizer.json is loaded as is. A saved tokenizer must come back the same either way: the same ids for the same
text (unicode, whitespace, a chat rendering), the same special tokens and fingerprint, and no more tokens than the
model's output layer has rows.

Each family gets a tiny student written by ``distill train``, a pruned model written by ``distill prune`` (the
families prune supports; mistral is refused with the supported list) and a merged LoRA student; each must
reload and be accepted by ``distill train``, ``distill prune`` and ``distill serve``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_TRAIN, run_cli_here
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.pruning.sizes import SUPPORTED_FAMILIES
from distill.tokenizer import byte_tokenizer, tokenizer_fingerprint

pytest.importorskip("peft")

TINY_PRUNE = REPO / "configs" / "tiny" / "prune.yaml"
TINY_LORA = REPO / "configs" / "tiny" / "lora.yaml"

_BASE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 128}
# Tiny valid configs: qwen3 and gemma2 default to head_dim 128 / 256, so it is given; qwen3 has per-head q/k
# norms, gemma2 soft-capping, scaled embeddings and tied embeddings (all kept at their defaults).
FAMILIES = {
    "llama": _BASE,
    "mistral": _BASE,
    "qwen2": _BASE,
    "qwen3": {**_BASE, "head_dim": 8},
    "gemma2": {**_BASE, "head_dim": 8},
}

TEXTS = [
    "hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n  indented",
    "héllo wörld — ünïcödé",
    "combining e\u0301 and A\u030a",
    "日本語のテキスト, emoji 🌍🚀",
    "I'm 12345 years old, isn't it? 3.14159",
    "looks special: <|user|> but <|endoftext|> is text",
]
CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "héllo, 日本 🌍\n  2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "and e\u0301?"},
]

# A couple of optimizer steps on a few short examples: enough to write every artifact.
QUICK = ["log.progress=false", "data.max_examples=40", "data.seq_len=32", "train.max_steps=2", "train.batch_size=2",
         "train.grad_accum=1", "eval.max_batches=1", "eval.batch_size=2", "optim.warmup_steps=1"]
QUICK_PRUNE = ["importance.samples=8", "importance.batch_size=8", "data.max_examples=40", "data.seq_len=32",
               "report=false"]


def config_override(family: str) -> str:
    body = ", ".join(f"{k}: {v}" for k, v in {"model_type": family, **FAMILIES[family]}.items())
    return "{" + body + "}"


def cli(*args: str) -> str:
    res = run_cli_here(*args)
    assert res.returncode == 0, f"distill {' '.join(args[:2])} failed:\n{res.stderr[-3000:]}"
    return res.stderr


def train_from_config(family: str, out: Path) -> Path:
    cli("train", str(TINY_TRAIN), f"out_dir={out}", "student.config=null", f"student.config={config_override(family)}",
        "teacher=null", *QUICK)
    return out / "student"


def train_from_dir(model_dir: Path, out: Path, *extra: str, config: Path = TINY_TRAIN) -> Path:
    cli("train", str(config), f"out_dir={out}", "student.config=null", "student.tokenizer=null",
        f"student.path={model_dir}", *QUICK, *extra)
    return out / "student"


def prune_dir(model_dir: Path, out: Path):
    return run_cli_here("prune", str(TINY_PRUNE), f"out_dir={out}", "model.config=null", "model.tokenizer=null",
                        f"model.path={model_dir}", "target.hidden_size=null", "target.intermediate_size=32",
                        *QUICK_PRUNE)


def serve_dir(model_dir: Path, monkeypatch) -> dict:
    """``distill serve DIR`` in this process, with the HTTP server replaced by a test client: what /tokenize
    answers for the texts and the chat, and a short completion."""
    import uvicorn
    from fastapi.testclient import TestClient

    answers: dict = {}

    def run(app, **_):
        with TestClient(app) as client:
            for text in TEXTS:
                r = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
                assert r.status_code == 200, r.text
                answers[text] = r.json()["tokens"]
            r = client.post("/tokenize", json={"messages": CHAT})
            assert r.status_code == 200, r.text
            answers["chat"] = r.json()["tokens"]
            r = client.post("/v1/completions", json={"prompt": TEXTS[0], "max_tokens": 2, "seed": 0})
            assert r.status_code == 200, r.text

    monkeypatch.setattr(uvicorn, "run", run)
    cli("serve", str(model_dir))
    return answers


def check_reloads(model_dir: Path, family: str) -> None:
    """Plain transformers loading of ``model_dir`` gives the byte tokenizer back, and a model that covers it."""
    original = byte_tokenizer()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert model.config.model_type == family
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    rows = model.get_output_embeddings().weight.shape[0]
    assert len(tok) == len(original) <= rows, f"{type(tok).__name__}: {len(tok)} tokens, {rows} output rows"
    assert tok.special_tokens_map == original.special_tokens_map
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(original)
    for text in TEXTS:
        for special in (False, True):
            want = original(text, add_special_tokens=special)["input_ids"]
            assert tok(text, add_special_tokens=special)["input_ids"] == want, (type(tok).__name__, text)
        assert tok.decode(tok(text)["input_ids"]) == original.decode(original(text)["input_ids"])
    rendered = original.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == rendered
    assert tok(rendered, add_special_tokens=False)["input_ids"] == original(rendered, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module", params=list(FAMILIES))
def written(request, tmp_path_factory):
    """Per family: the student of ``distill train`` (from a config), its pruned model (``distill prune``; for a
    family prune refuses, the refusal) and a merged LoRA student (``distill lora`` on the pruned model, or on
    the student)."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    t0 = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run fastest so
    try:
        out = {"family": family, "student": train_from_config(family, root / "train")}
        res = prune_dir(out["student"], root / "pruned")
        if family in SUPPORTED_FAMILIES:
            assert res.returncode == 0, res.stderr[-3000:]
            out["pruned"] = root / "pruned"
        else:
            out["prune_refusal"] = res
        base = out.get("pruned", out["student"])
        out["lora"] = train_from_dir(base, root / "lora", config=TINY_LORA)
    finally:
        torch.set_num_threads(before)
    print(f"{family}: train, prune and lora: {time.perf_counter() - t0:.1f} s")
    return out


@pytest.mark.parametrize("kind", ["student", "pruned", "lora"])
def test_every_written_model_reloads_as_written(written, kind):
    if kind == "pruned" and written["family"] not in SUPPORTED_FAMILIES:
        res = written["prune_refusal"]
        assert res.returncode == 2
        assert (f"distill prune does not support model_type {written['family']!r}; supported families: "
                f"{', '.join(SUPPORTED_FAMILIES)}") in res.stderr
        assert "Traceback" not in res.stderr
        return
    check_reloads(written[kind], written["family"])


def test_train_prune_and_serve_accept_every_written_model(written, tmp_path, monkeypatch):
    family = written["family"]
    original = byte_tokenizer()
    t0 = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kind in ("student", "pruned", "lora"):
            if kind not in written:
                continue
            model_dir = written[kind]
            # with the tiny teacher (byte tokenizer): the run compares the two tokenizers' fingerprints
            again = train_from_dir(model_dir, tmp_path / f"train-{kind}", "train.max_steps=1")
            check_reloads(again, family)
            if family in SUPPORTED_FAMILIES:
                res = prune_dir(model_dir, tmp_path / f"prune-{kind}")
                assert res.returncode == 0, res.stderr[-3000:]
            answers = serve_dir(model_dir, monkeypatch)
            for text in TEXTS:
                assert answers[text] == original(text, add_special_tokens=False)["input_ids"], text
            rendered = original.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
            assert answers["chat"] == original(rendered, add_special_tokens=False)["input_ids"]
    finally:
        torch.set_num_threads(before)
    print(f"{family}: train, prune and serve on every artifact: {time.perf_counter() - t0:.1f} s")


def test_train_refuses_a_tokenizer_its_checkpoint_would_not_reload_before_training(tmp_path):
    from test_tokenizer import gpt2_style_tokenizer

    tok_dir = tmp_path / "gpt2-style"
    gpt2_style_tokenizer().save_pretrained(tok_dir)
    out = tmp_path / "run"
    res = run_cli_here("train", str(TINY_TRAIN), f"out_dir={out}", "student.config.model_type=qwen2",
                       f"student.tokenizer={tok_dir}", "teacher=null", *QUICK)
    assert res.returncode == 2, res.stderr[-2000:]
    assert ("student (qwen2 with this tokenizer): transformers' AutoTokenizer.from_pretrained would load this "
            "tokenizer back from a qwen2 checkpoint as Qwen2Tokenizer, not as itself: another normalizer") in res.stderr
    assert "Traceback" not in res.stderr
    assert not (out / "checkpoints").exists() and not (out / "student").exists()


def test_serve_refuses_a_tokenizer_larger_than_the_output_layer(tmp_path, monkeypatch):
    import uvicorn

    from distill.config import ModelSpec
    from distill.models import load_model

    tok = byte_tokenizer()
    model = load_model(ModelSpec(config={"model_type": "llama", **_BASE}, tokenizer="byte"), "model", tok)
    tok.add_tokens(["<|tool|>"])
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("served a model that cannot score every token"))
    res = run_cli_here("serve", str(tmp_path))
    assert res.returncode == 2
    assert "model: the output layer has 263 rows but the tokenizer has 264 tokens" in res.stderr
