"""The built-in byte-level tokenizer and the tokenizer fingerprint."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from distill.tokenizer import SPECIAL_TOKENS, byte_tokenizer, tokenizer_fingerprint

TEXTS = [
    "",
    "hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n",
    "héllo wörld — ünïcödé",
    "日本語のテキスト",
    "emoji 🌍🚀 and combining e\u0301",
    "looks special: <|user|> but is text",
]

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def render(tok, messages, add_generation_prompt=False):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def test_layout(tok):
    assert len(tok) == 256 + len(SPECIAL_TOKENS)
    assert tok("abc")["input_ids"] == [97, 98, 99]  # byte b has id b, and no bos is added
    assert tok("é")["input_ids"] == list("é".encode())
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(256, 256 + len(SPECIAL_TOKENS)))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")


@pytest.mark.parametrize("text", TEXTS)
def test_roundtrip(tok, text):
    assert tok.decode(tok(text)["input_ids"]) == text


def test_save_load_roundtrip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.chat_template == tok.chat_template
    assert render(loaded, CHAT) == render(tok, CHAT)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (256, 257, 258)
    assert loaded(render(tok, CHAT))["input_ids"] == tok(render(tok, CHAT))["input_ids"]


def test_chat_template_prefix_consistent(tok):
    for i, message in enumerate(CHAT):
        if message["role"] != "assistant":
            continue
        prompt = render(tok, CHAT[:i], add_generation_prompt=True)
        full = render(tok, CHAT[: i + 1])
        assert full.startswith(prompt) and full[len(prompt) :] == message["content"] + "<|end|>"
        assert full.startswith(render(tok, CHAT[:i]))
    assert render(tok, CHAT[:2]) == "<|system|>be brief<|end|><|user|>hi<|end|>"
    # role markers are single special tokens
    assert tok(render(tok, CHAT[:1]))["input_ids"] == [261, *b"be brief", 262]


def test_chat_template_rejects_unknown_role(tok):
    with pytest.raises(Exception, match="unknown chat role tool"):
        render(tok, [{"role": "tool", "content": "x"}])


def test_fingerprint(tok, tmp_path):
    fp = tokenizer_fingerprint(tok)
    assert len(fp) == 64 and fp == tokenizer_fingerprint(byte_tokenizer())
    tok.save_pretrained(tmp_path)
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path)) == fp

    more = byte_tokenizer()
    more.add_tokens(["<|tool|>"])
    assert tokenizer_fingerprint(more) != fp
    other_template = byte_tokenizer()
    other_template.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert tokenizer_fingerprint(other_template) != fp
