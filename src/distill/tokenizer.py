"""A tiny built-in byte-level tokenizer, a fingerprint to tell tokenizers apart, and the one way to save a tokenizer.

``byte_tokenizer()`` needs no files and no network, so tests and toy runs (``model.tokenizer: byte``)
work anywhere. Ids 0..255 are the raw bytes of the NFC-normalized text (byte ``b`` has id ``b``), so any NFC
unicode string round-trips exactly (others come back NFC-normalized); the special tokens come after them:

    256 <|bos|>  257 <|eos|>  258 <|pad|>  259 <|user|>  260 <|assistant|>  261 <|system|>  262 <|end|>

The chat template renders ``<|role|>content<|end|>`` per message and ``<|assistant|>`` as the generation
prompt, which makes it prefix-consistent: ``render(m[:i], add_generation_prompt=True)`` is a prefix of
``render(m[:i+1])`` when ``m[i]`` is an assistant turn (``distill.data`` relies on that for masking).

Saving. ``transformers.AutoTokenizer.from_pretrained(dir)`` does not always build the class a directory's
tokenizer_config.json names: for some model families (``model_type`` in ``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS``
of ``transformers/models/auto/tokenization_auto.py``, qwen2 among them) it builds the family's own class, which
rebuilds the backend from the saved vocabulary with its own normalizer, pre-tokenizer and default special tokens
(Qwen2Tokenizer: NFC, Qwen's split pattern, ``<|endoftext|>``). So the byte tokenizer's pipeline is exactly the
one Qwen2Tokenizer builds (with no merges, the split pattern changes no id), ``save_tokenizer`` writes every
special-token slot explicitly (an unset one as null, so no class fills it with its default) and then reloads
what it wrote the way transformers will, refusing a tokenizer that would not come back as itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

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

# The split pattern of Qwen2Tokenizer (transformers/models/qwen2/tokenization_qwen2.py, PRETOKENIZE_REGEX), the
# class AutoTokenizer builds for any qwen2 checkpoint. It only groups characters: with no merges, every byte is
# still its own token, so it changes no id; it is here so that a qwen2 checkpoint reloads the very same pipeline.
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def bytes_to_unicode() -> dict[int, str]:
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
    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    # A BPE with no merges emits one token per (byte-level) character, i.e. one token per byte. The model's
    # settings, the normalizer and the pre-tokenizer are Qwen2Tokenizer's (see the module docstring).
    model = models.BPE(vocab=vocab, merges=[], dropout=None, unk_token=None, continuing_subword_prefix="",
                       end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    backend = Tokenizer(model)
    backend.normalizer = normalizers.NFC()
    # add_prefix_space=False and trim_offsets-free decoding keep decode(encode(s)) == s exactly (s in NFC).
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
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


# Probes for "reloads as itself": whitespace, digits, contractions, precomposed and decomposed unicode, emoji,
# and text that looks like special tokens (of this tokenizer or of a family's default ones).
_PROBE_TEXTS = [
    "Hello, world!  Two spaces,\ttabs\nand\r\nnewlines\n\n   indented",
    "I'm 12345 years old, isn't it? 3.14159 x=42;y=-7",
    "h\u00e9llo w\u00f6rld \u2014 e\u0301 A\u030a \ufb01 \u2126 \u65e5\u672c\u8a9e \U0001f30d\U0001f680 \u0645\u0631\u062d\u0628\u0627",
    " leading space and trailing space ",
    "<|endoftext|> <s></s> <unk> [CLS] <|im_start|> <pad> <eos>",
]
_PROBE_CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "h\u00e9llo, e\u0301 \U0001f30d\n  2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "and 12345?"},
]


def _backend_parts(tok: PreTrainedTokenizerBase) -> dict:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return {}
    spec = json.loads(backend.to_str())
    return {k: spec.get(k) for k in ("normalizer", "pre_tokenizer", "decoder", "model")}


def _render(tok: PreTrainedTokenizerBase) -> str | None:
    if tok.chat_template is None:
        return None
    try:
        return tok.apply_chat_template(_PROBE_CHAT, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template with other roles or rules: the templates themselves are compared
        return None


def tokenizer_difference(original: PreTrainedTokenizerBase, reloaded: PreTrainedTokenizerBase) -> str | None:
    """How ``reloaded`` differs from ``original`` (the first difference found), or None when it is the same
    tokenizer: the fingerprint, the backend pipeline, the ids of probe texts and of a chat rendering."""
    if len(reloaded) != len(original):
        extra = sorted(set(reloaded.get_vocab()) - set(original.get_vocab()))[:3]
        return f"{len(reloaded)} tokens instead of {len(original)}" + (f" (it adds {extra})" if extra else "")
    if reloaded.special_tokens_map != original.special_tokens_map:
        return f"special tokens {reloaded.special_tokens_map} instead of {original.special_tokens_map}"
    if tokenizer_fingerprint(reloaded) != tokenizer_fingerprint(original):
        return "another vocabulary, special tokens or chat template (the fingerprints differ)"
    parts, want = _backend_parts(reloaded), _backend_parts(original)
    for key in want:
        if parts.get(key) != want[key]:
            return f"another {key.replace('_', '-')} ({json.dumps(parts.get(key))[:120]})"
    rendered = _render(original)
    texts = _PROBE_TEXTS + ([rendered] if rendered is not None else [])
    for text in texts:
        for special in (False, True):
            got = reloaded(text, add_special_tokens=special)["input_ids"]
            if got != original(text, add_special_tokens=special)["input_ids"]:
                return f"other ids for {text[:40]!r}"
    if _render(reloaded) != rendered:
        return "another chat rendering"
    return None


def _pin_special_tokens(tok: PreTrainedTokenizerBase, directory: Path) -> None:
    """Write every special-token slot into tokenizer_config.json, an unset one as null: a family class that
    AutoTokenizer builds instead of the saved one then gets no default of its own (Qwen2Tokenizer's unk
    ``<|endoftext|>`` would be a token the model has no row for)."""
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    missing = [name for name in tok.SPECIAL_TOKENS_ATTRIBUTES if name not in config]
    if not missing:
        return
    config.update(dict.fromkeys(missing))
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def check_reloads(tok: PreTrainedTokenizerBase, directory: str | os.PathLike, config=None, *, where: str) -> None:
    """``AutoTokenizer.from_pretrained(directory)`` (with the model ``config``, else the directory's
    config.json) must give ``tok`` back; a ValueError naming ``where`` and the difference otherwise."""
    kwargs = {"config": config} if config is not None else {}
    model_type = getattr(config, "model_type", None)
    if model_type is None and (Path(directory) / "config.json").is_file():
        model_type = json.loads((Path(directory) / "config.json").read_text()).get("model_type")
    try:
        reloaded = AutoTokenizer.from_pretrained(str(directory), **kwargs)
        difference = tokenizer_difference(tok, reloaded)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        reloaded, difference = None, f"it fails to load: {exc}"
    if difference is None:
        return
    family = f"a {model_type} checkpoint" if model_type else "its directory"
    built = f" as {type(reloaded).__name__}" if reloaded is not None else ""
    raise ValueError(
        f"{where}: transformers' AutoTokenizer.from_pretrained would load this tokenizer back from {family}{built}, "
        f"not as itself: {difference}. Use a tokenizer made for this model family (or the built-in `byte`), or "
        "a model_type whose checkpoints keep the saved tokenizer class (e.g. llama)"
    )


def save_tokenizer(tok: PreTrainedTokenizerBase, directory: str | os.PathLike, config=None, *, where: str) -> None:
    """The one way distill writes a tokenizer: ``save_pretrained``, every special-token slot pinned, then
    checked to reload as itself (see the module docstring). Write the model's config.json first, or pass it."""
    directory = Path(directory)
    tok.save_pretrained(str(directory))
    _pin_special_tokens(tok, directory)
    check_reloads(tok, directory, config, where=where)


def check_saves(tok: PreTrainedTokenizerBase, config, *, where: str) -> None:
    """Before a run: a checkpoint of a model with ``config`` and this tokenizer would reload the tokenizer as
    itself (a temporary directory is written and read back)."""
    with tempfile.TemporaryDirectory(prefix="distill-tokenizer-") as tmp:
        save_tokenizer(tok, tmp, config, where=where)
