"""The tokenizer side of cross-tokenizer distillation: byte-offset alignment and the projection W.

References are written out here: a group boundary is a byte offset where both tokenizations end a token
(computed by scanning offsets, not by the library's walk), GPT-2's byte table is rebuilt from its
definition, and W's rows are checked against the teacher's own tokenization of each token's text.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import distill.crosstok.projection as projection_module
from distill.crosstok import (
    align,
    align_ids,
    build_projection,
    concat_groups,
    label_groups,
    load_projection,
    piece_weights,
    token_bytes,
)
from distill.losses import IGNORE_INDEX
from distill.tokenizer import byte_tokenizer

CORPUS = [
    "the cat sat on the mat, the dog sat on the log. 12345 + 678 = 13023; 2024-01-31 3.14159",
    "h\u00e9llo w\u00f6rld \u65e5\u672c\u8a9e \U0001f30d\U0001f680 caf\u00e9 na\u00efve \u0645\u0631\u062d\u0628\u0627",
    "    indented\tcode()\n\n  spaces   between   words  ",
] * 40

# Adversarial strings: multi-byte characters (2, 3 and 4 bytes), decomposed accents, runs of spaces, tabs and
# newlines, digit runs, and special tokens of both tokenizers and of only one written into the text.
ADVERSARIAL = [
    "\u65e5\u672c\u8a9e\U0001f30d\U0001f680 h\u00e9llo",
    "e\u0301 A\u030a \ufb01 \u2126",
    "a  b\t\n  c\n\n\n   d ",
    "12345 678 3.14159 x=42;y=-7 2024-01-31",
    "<|bos|>the cat<|eos|> <|user|>hi<|end|><|assistant|>12<|end|>",
    " ",
]


def train_bpe(vocab_size: int = 420) -> PreTrainedTokenizerFast:
    """A small byte-level BPE (the quickstart's recipe) trained on CORPUS, with the byte tokenizer's first
    three special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>")


@pytest.fixture(scope="module")
def bpe():
    return train_bpe()


@pytest.fixture(scope="module")
def byte():
    return byte_tokenizer()


def gpt2_chars() -> dict[int, str]:
    """byte -> printable character, as GPT-2 defines it."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    out, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return out


def reference_groups(student: list[bytes], teacher: list[bytes]) -> tuple[list[int], list[int]]:
    """A token's group is the number of shared boundaries strictly before its end (empty tokens: -1)."""
    def ends(pieces):
        out, at = [], 0
        for p in pieces:
            at += len(p)
            out.append(at)
        return out

    s_ends, t_ends = ends(student), ends(teacher)
    total = s_ends[-1] if s_ends else 0
    shared = [b for b in range(1, total + 1) if b in s_ends and b in t_ends]

    def groups(pieces, e):
        return [-1 if not p else sum(1 for b in shared if b < end) for p, end in zip(pieces, e, strict=True)]

    return groups(student, s_ends), groups(teacher, t_ends)


def tokenize_pair(byte, bpe, text):
    s_ids = byte(text, add_special_tokens=False)["input_ids"]
    decoded = byte.decode(s_ids)  # the teacher reads the student's text (NFC, special tokens as text)
    t_ids = bpe(decoded, add_special_tokens=False)["input_ids"]
    return s_ids, t_ids, decoded


def test_token_bytes_byte_level(byte, bpe):
    chars = gpt2_chars()
    table = token_bytes(bpe)
    for b in range(256):
        assert table[bpe.convert_tokens_to_ids(chars[b])] == bytes([b])
    assert table[bpe.convert_tokens_to_ids("\u0120the")] == b" the"
    assert table[bpe.convert_tokens_to_ids("<|eos|>")] == b"<|eos|>"
    bt = token_bytes(byte)
    assert bt[:256] == [bytes([b]) for b in range(256)]
    assert bt[259] == b"<|user|>"


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_alignment_on_adversarial_strings(byte, bpe, text):
    s_ids, t_ids, decoded = tokenize_pair(byte, bpe, text)
    s_bytes = [token_bytes(byte)[i] for i in s_ids]
    t_bytes = [token_bytes(bpe)[i] for i in t_ids]
    assert b"".join(s_bytes) == b"".join(t_bytes) == decoded.encode("utf-8")
    got = align_ids(byte, s_ids, bpe, t_ids)
    want_s, want_t = reference_groups(s_bytes, t_bytes)
    assert (got.student, got.teacher) == (want_s, want_t)
    assert got.num_groups == max(want_s) + 1
    for g in range(got.num_groups):  # a group is the same bytes on both sides, and never empty
        s = b"".join(b for b, k in zip(s_bytes, got.student, strict=True) if k == g)
        t = b"".join(b for b, k in zip(t_bytes, got.teacher, strict=True) if k == g)
        assert s == t and s


def test_alignment_splits_characters_and_digits(byte, bpe):
    """The byte student ends a token at every byte, so every teacher boundary is shared, including the ones
    inside a multi-byte character: each teacher token is a group of its own, its bytes one student token each."""
    s_ids, t_ids, _ = tokenize_pair(byte, bpe, "\u65e5\u672c\u8a9e\U0001f30d 12345")
    got = align_ids(byte, s_ids, bpe, t_ids)
    assert got.teacher == list(range(len(t_ids)))
    t_bytes = token_bytes(bpe)
    assert [got.student.count(g) for g in range(got.num_groups)] == [len(t_bytes[i]) for i in t_ids]
    assert any(len(t_bytes[i]) > 1 for i in t_ids)  # the BPE merged something (else the test says nothing)


def test_alignment_special_tokens(byte, bpe):
    """<|bos|> is special on both sides (one token each, a group of its own); <|user|> only for the student:
    one student token against the teacher's pieces of its text."""
    s_ids, t_ids, _ = tokenize_pair(byte, bpe, "<|bos|>hi<|user|>x")
    got = align_ids(byte, s_ids, bpe, t_ids)
    assert s_ids[0] == 256 and t_ids[0] == bpe.convert_tokens_to_ids("<|bos|>")
    assert got.student[0] == got.teacher[0] == 0 and got.student.count(0) == got.teacher.count(0) == 1
    user = s_ids.index(259)
    g = got.student[user]
    assert got.student.count(g) == 1 and got.teacher.count(g) > 1


def test_alignment_refuses_other_bytes_and_skips_empty_tokens():
    with pytest.raises(ValueError, match="different bytes.*from byte 2"):
        align([b"ab", b"c"], [b"a", b"bd"])
    got = align([b"", b"ab", b"c", b""], [b"a", b"bc"])
    assert got.student == [-1, 0, 0, -1] and got.teacher == [0, 0] and got.num_groups == 1
    got = align([b"a", b"", b"b"], [b"a", b"b"])  # an empty token right after a shared boundary
    assert got.student == [0, -1, 1] and got.teacher == [0, 1] and got.num_groups == 2


def test_label_groups_drop_first_and_unsupervised():
    # student tokens: a|b|c|d|e, teacher: ab|c|de -> groups {ab}, {c}, {de}
    alignment = align([b"a", b"b", b"c", b"d", b"e"], [b"ab", b"c", b"de"])
    assert alignment.student == [0, 0, 1, 2, 2]
    g = label_groups(alignment, [10, 11, 12, 13, 14], [20, 21, 22])
    # rows predict tokens 1..: the group holding the first token is dropped on both sides
    assert g.student_group.tolist() == [-1, 0, 1, 1] and g.teacher_group.tolist() == [0, 1]
    assert g.student_labels.tolist() == [IGNORE_INDEX, 12, 13, 14] and g.teacher_labels.tolist() == [21, 22]
    g = label_groups(alignment, [10, 11, 12, 13, 14], [20, 21, 22], [True, True, False, True, True])
    assert g.student_group.tolist() == [-1, -1, 0, 0] and g.teacher_group.tolist() == [-1, 0] and g.num_groups == 1
    both = concat_groups([g, g])
    assert both.student_group.tolist() == [-1, -1, 0, 0, -1, -1, 1, 1] and both.num_groups == 2
    both.check()


def assert_identity(projection, matches, vocab):
    assert projection.ids.shape == (vocab, 32)
    assert torch.equal(projection.ids[:, 0], torch.arange(vocab)) and bool((projection.weights[:, 0] == 1).all())
    assert bool((projection.weights[:, 1:] == 0).all())
    assert torch.equal(matches.student_ids, torch.arange(vocab)) and torch.equal(matches.teacher_ids, torch.arange(vocab))


def test_projection_same_tokenizer_is_identity(byte, bpe):
    for tok in (byte, bpe):
        projection, matches = build_projection(tok, tok)
        assert_identity(projection, matches, len(tok))


def test_projection_byte_student_bpe_teacher(byte, bpe):
    projection, matches = build_projection(byte, bpe)
    chars = gpt2_chars()
    assert projection.ids.shape == (len(byte), 32)  # sparse rows, never V_s x V_t
    for b in range(256):  # every byte is exactly a teacher token
        assert projection.ids[b, 0] == bpe.convert_tokens_to_ids(chars[b]) and projection.weights[b, 0] == 1
        assert bool((projection.weights[b, 1:] == 0).all())
    for name in ("<|bos|>", "<|eos|>", "<|pad|>"):  # special on both sides: exact
        assert projection.ids[byte.convert_tokens_to_ids(name), 0] == bpe.convert_tokens_to_ids(name)
    assert len(matches.student_ids) == 259
    # <|user|> has no teacher token: the teacher's pieces of its text, weights 0.9 * 0.1^k normalized (the
    # reverse pass adds nothing: no teacher token's text contains it)
    pieces = bpe("<|user|>", add_special_tokens=False)["input_ids"][:4]
    raw = [0.9 * 0.1**k for k in range(len(pieces))]
    row = {int(j): float(w) for j, w in zip(projection.ids[259], projection.weights[259], strict=True) if w > 0}
    want: dict[int, float] = {}
    for j, w in zip(pieces, raw, strict=True):
        want[j] = want.get(j, 0.0) + w / sum(raw)
    assert row.keys() == want.keys() and all(abs(row[j] - want[j]) < 1e-6 for j in want)
    sums = projection.weights.sum(-1)
    assert bool(((sums - 1).abs() < 1e-6).all())


def test_projection_bpe_student_byte_teacher(byte, bpe):
    projection, _ = build_projection(bpe, byte)
    the = bpe.convert_tokens_to_ids("\u0120the")
    row = [(int(j), float(w)) for j, w in zip(projection.ids[the], projection.weights[the], strict=True) if w > 0]
    assert [j for j, _ in row] == list(b" the")
    assert [w for _, w in row] == pytest.approx(piece_weights(4), abs=1e-6)
    assert piece_weights(4) == pytest.approx([0.9 / 0.9999, 0.09 / 0.9999, 0.009 / 0.9999, 0.0009 / 0.9999])
    # a merged token's reverse entries: the byte teacher's tokens re-tokenized by the BPE student are single
    # pieces of themselves, exact matches, so no row of a multi-byte token gets more than its own pieces
    assert len(row) == 4


def test_projection_cache(tmp_path, byte, bpe, monkeypatch):
    first, first_matches, path = load_projection(byte, bpe, tmp_path)
    assert path.parent == tmp_path and path.name.startswith("crosstok-") and path.suffix == ".safetensors"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind

    def refuse(*args, **kwargs):
        raise AssertionError("the cached projection was rebuilt")

    monkeypatch.setattr(projection_module, "build_projection", refuse)
    again, again_matches, again_path = load_projection(byte, bpe, tmp_path)
    assert again_path == path and again.num_teacher == len(bpe)
    assert torch.equal(again.ids, first.ids) and torch.equal(again.weights, first.weights)
    assert torch.equal(again_matches.student_ids, first_matches.student_ids)
    assert torch.equal(again_matches.teacher_ids, first_matches.teacher_ids)
    monkeypatch.undo()
    _, _, other = load_projection(byte, bpe, tmp_path, top_k=8)  # other settings: another file
    _, _, swapped = load_projection(bpe, byte, tmp_path)  # other tokenizers: another file
    assert len({path, other, swapped}) == 3
