"""A tiny built-in byte-level tokenizer, and a fingerprint to tell tokenizers apart.

``byte_tokenizer()`` needs no files and no network, so tests and toy runs (``model.tokenizer: byte``)
work anywhere. Ids 0..255 are the raw bytes (byte ``b`` has id ``b``), so any unicode string
round-trips exactly; the special tokens come after them:

    256 <|bos|>  257 <|eos|>  258 <|pad|>  259 <|user|>  260 <|assistant|>  261 <|system|>  262 <|end|>

The chat template renders ``<|role|>content<|end|>`` per message and ``<|assistant|>`` as the generation
prompt, which makes it prefix-consistent: ``render(m[:i], add_generation_prompt=True)`` is a prefix of
``render(m[:i+1])`` when ``m[i]`` is an assistant turn (``distill.data`` relies on that for masking).
"""

from __future__ import annotations

import hashlib
import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = {"user": "<|user|>", "assistant": "<|assistant|>", "system": "<|system|>"}
END = "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, *ROLE_TOKENS.values(), END]

# Whitespace control (`{%-`) keeps the template's own newlines out of the output, so the rendering is
# exactly the role tokens and the message contents.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown chat role ' ~ message['role'] ~ ' (use system, user or assistant)') -}}"
    "{%- endif -%}"
    "{{- '<|' ~ message['role'] ~ '|>' ~ message['content'] ~ '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet ``pre_tokenizers.ByteLevel`` maps bytes to."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shift)
            shift += 1
    return chars


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """The built-in byte-level tokenizer: ids 0..255 are bytes, then the 7 special tokens (vocab 263)."""
    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    # A BPE with no merges emits one token per (byte-level) character, i.e. one token per byte.
    model = models.BPE(vocab=vocab, merges=[])
    backend = Tokenizer(model)
    # add_prefix_space=False and trim_offsets-free decoding keep decode(encode(s)) == s exactly.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)  # ids 256.. in list order

    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=1 << 30,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """sha256 hex over the vocab (with added tokens), the special tokens and the chat template.

    Two tokenizers with the same fingerprint map text to the same ids and render chats the same way
    for all practical purposes; used to check a teacher/student pair or a cache against its tokenizer.
    """
    template = tok.chat_template  # a str, or a {name: template} dict for multi-template tokenizers
    payload = {
        "vocab": sorted(tok.get_vocab().items()),
        "special": sorted((str(k), str(v)) for k, v in tok.special_tokens_map.items()),
        "special_ids": sorted(tok.all_special_ids),
        "chat_template": template
        if template is None or isinstance(template, str)
        else sorted(template.items()),
    }
    blob = json.dumps(payload, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()
