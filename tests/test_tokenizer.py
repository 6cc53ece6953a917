"""The built-in byte-level tokenizer, the tokenizer fingerprint, and saving a tokenizer so that it reloads."""

from __future__ import annotations

import json
import unicodedata

import pytest
from transformers import AutoConfig, AutoTokenizer

from distill.tokenizer import (
    SPECIAL_TOKENS,
    byte_tokenizer,
    check_saves,
    save_tokenizer,
    tokenizer_difference,
    tokenizer_fingerprint,
)

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
    # The ids are the bytes of the NFC form (Qwen2Tokenizer's normalization; see distill.tokenizer).
    nfc = unicodedata.normalize("NFC", text)
    if not any(special in text for special in SPECIAL_TOKENS):
        assert tok(text)["input_ids"] == list(nfc.encode())
    assert tok.decode(tok(text)["input_ids"]) == nfc
    assert tok.decode(tok(nfc)["input_ids"]) == nfc


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


def tiny_config(model_type: str):
    return AutoConfig.for_model(model_type, vocab_size=263, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma2"])
def test_saved_in_a_checkpoint_of_any_family_reloads_as_itself(tok, tmp_path, model_type):
    # AutoTokenizer reads the directory's config.json: for qwen2 it builds Qwen2Tokenizer whatever
    # tokenizer_config.json names (transformers/models/auto/tokenization_auto.py).
    tiny_config(model_type).save_pretrained(tmp_path)
    save_tokenizer(tok, tmp_path, where="test")
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert saved["unk_token"] is None and saved["bos_token"] == "<|bos|>"  # every slot pinned
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer_difference(tok, loaded) is None
    assert len(loaded) == len(tok) and tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tok)
    for text in TEXTS:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded(render(tok, CHAT))["input_ids"] == tok(render(tok, CHAT))["input_ids"]


def gpt2_style_tokenizer():
    """A byte-level BPE with GPT-2's split pattern, no normalizer and one merge ("12"): a tokenizer that
    Qwen2Tokenizer would rebuild with NFC and Qwen's pattern (which splits digits one by one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["12"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("1", "2")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|bos|>", "<|eos|>", "<|pad|>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>")


def test_a_tokenizer_a_family_would_rebuild_otherwise_is_refused_with_the_reason(tmp_path):
    other = gpt2_style_tokenizer()
    assert other("12")["input_ids"] == [len(other.get_vocab()) - 4]  # the merge: one token
    check_saves(other, tiny_config("llama"), where="student")  # llama keeps the saved class
    with pytest.raises(ValueError, match=r"student: transformers' AutoTokenizer.from_pretrained would load this "
                                         r"tokenizer back from a qwen2 checkpoint as Qwen2Tokenizer, not as itself: "
                                         r"another normalizer"):
        check_saves(other, tiny_config("qwen2"), where="student")


def test_difference_names_what_differs(tok):
    more = byte_tokenizer()
    more.add_tokens(["<|tool|>"])
    assert tokenizer_difference(tok, more) == "264 tokens instead of 263 (it adds ['<|tool|>'])"
    other_template = byte_tokenizer()
    other_template.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert "fingerprints differ" in tokenizer_difference(tok, other_template)
    assert tokenizer_difference(tok, byte_tokenizer()) is None
