"""A student batch re-tokenized for a teacher with another tokenizer, the pair's pre-flight report, and the
cross-tokenizer loss on tiny models built from configs/tiny/train.yaml.

Known answers: each kept group's labels are the same bytes on both sides; with the same tokenizer on both
sides the loss of a real batch is the token-level forward KL of the chunked loss (value and gradients).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_crosstok_align import train_bpe
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

from distill.config import TrainConfig, load_config
from distill.crosstok import build_projection, preflight, retokenize_batch, text_span, token_bytes
from distill.data import collate
from distill.losses import (
    IGNORE_INDEX,
    DenseSignal,
    LossSpec,
    chunked_crosstok_loss,
    chunked_kd_loss,
    naive_crosstok_loss,
)
from distill.models import final_hidden, flat_positions, load_model, output_head
from distill.tokenizer import byte_tokenizer

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "train.yaml"
TEXTS = ["the cat sat on 12345 mats", "h\u00e9llo \u65e5\u672c\u8a9e \U0001f30d 2024 <|user|>x<|end|>", "a  b"]


@pytest.fixture(scope="module")
def byte():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def bpe():
    return train_bpe()


def student_batch(tok, texts=TEXTS, prompt=4):
    """A collated batch: bos + the text + eos, the bos and the first ``prompt`` tokens unsupervised."""
    examples = []
    for text in texts:
        ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        labels = [IGNORE_INDEX] * (1 + prompt) + ids[1 + prompt:]
        examples.append({"input_ids": ids, "labels": labels})
    return collate(examples, tok.pad_token_id)


def group_bytes(groups, side, ids_bt, table):
    """{group: the bytes of its labels} from the rows of one side (row b * (T - 1) + t predicts token t + 1)."""
    group = getattr(groups, f"{side}_group").view(ids_bt.shape[0], -1)
    labels = getattr(groups, f"{side}_labels").view(ids_bt.shape[0], -1)
    out: dict[int, bytes] = {}
    for b in range(group.shape[0]):
        for t in range(group.shape[1]):
            g = int(group[b, t])
            if g >= 0:
                assert int(labels[b, t]) == int(ids_bt[b, t + 1])  # the label is the next token
                out[g] = out.get(g, b"") + table[int(ids_bt[b, t + 1])]
    return out


def test_retokenized_batch_groups(byte, bpe):
    batch = student_batch(byte)
    s_table, t_table = token_bytes(byte), token_bytes(bpe)
    cross = retokenize_batch(batch, bpe, s_table, t_table, teacher_pad_id=bpe.pad_token_id)
    t_ids = cross.teacher_batch["input_ids"]
    for b in range(len(TEXTS)):
        n = int(cross.teacher_batch["attention_mask"][b].sum())
        text = byte.decode(batch["input_ids"][b, :int(batch["attention_mask"][b].sum())].tolist())
        assert t_ids[b, :n].tolist() == bpe(text, add_special_tokens=False)["input_ids"]
    cross.groups.check()
    s_bytes = group_bytes(cross.groups, "student", batch["input_ids"], s_table)
    t_bytes = group_bytes(cross.groups, "teacher", t_ids, t_table)
    assert s_bytes == t_bytes and len(s_bytes) == cross.groups.num_groups > 10
    # no kept group holds an unsupervised student token (the bos and the first 4 text bytes)
    rows = cross.groups.student_group.view(len(TEXTS), -1)
    sup = batch["labels"][:, 1:] != IGNORE_INDEX
    kept = {int(g) for g in rows[~sup] if g >= 0}
    assert not kept


def test_sequence_cut_inside_a_character(byte, bpe):
    """A packed sequence that starts with the last byte of a character and ends with the first of another:
    the span starts at row 1's token, so row 0 (predicting token 1) and the rows of the cut bytes are in no
    group, and each kept group's labels are the same bytes on both sides."""
    text = "\u65e5cat 12 \u65e5"
    ids = byte(text, add_special_tokens=False)["input_ids"][2:-1]  # '\xa5' 'cat 12 ' '\xe6' '\x97'
    batch = collate([{"input_ids": ids, "labels": ids}], byte.pad_token_id)
    s_table, t_table = token_bytes(byte), token_bytes(bpe)
    cross = retokenize_batch(batch, bpe, s_table, t_table, teacher_pad_id=bpe.pad_token_id)
    n_t = int(cross.teacher_batch["attention_mask"].sum())
    assert cross.teacher_batch["input_ids"][0, :n_t].tolist() == bpe("cat 12 ", add_special_tokens=False)["input_ids"]
    group = cross.groups.student_group.tolist()
    assert group[0] == -1 and group[-2:] == [-1, -1] and min(g for g in group if g >= 0) == 0
    s_bytes = group_bytes(cross.groups, "student", batch["input_ids"], s_table)
    t_bytes = group_bytes(cross.groups, "teacher", cross.teacher_batch["input_ids"], t_table)
    assert s_bytes == t_bytes and b"".join(s_bytes.values()) == b"".join(t_table[i] for i in
                                                                         cross.teacher_batch["input_ids"][0, 1:n_t])


def sentencepiece_like() -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer: ``▁`` for spaces, a prefix space, bytes as ``<0xNN>`` pieces (byte fallback)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ["\u2581", "t", "h", "e", "a", "c", "1", "2", "\u2581t", "\u2581th", "\u2581the", "at", "\u2581c",
                  "\u2581cat", "12"]:
        vocab[piece] = len(vocab)
    merges = [("\u2581", "t"), ("\u2581t", "h"), ("\u2581th", "e"), ("a", "t"), ("\u2581", "c"), ("\u2581c", "at"),
              ("1", "2")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_teacher(byte):
    """``▁`` pieces are spaces, ``<0xNN>`` pieces their byte, and the prefix space the teacher adds is not part
    of the text: a byte student aligns with it, every kept group the same bytes on both sides."""
    sp = sentencepiece_like()
    table = token_bytes(sp)
    assert table[sp.convert_tokens_to_ids("\u2581the")] == b" the" and table[3 + 0xE6] == b"\xe6"
    batch = student_batch(byte, ["the cat \u65e5 12x"], prompt=0)
    s_table = token_bytes(byte)
    cross = retokenize_batch(batch, sp, s_table, table, teacher_pad_id=sp.unk_token_id)
    t_ids = cross.teacher_batch["input_ids"]
    assert sp.convert_ids_to_tokens(t_ids[0].tolist())[:2] == ["\u2581", "<0x3C>"]  # the student's <|bos|> as text
    s_bytes = group_bytes(cross.groups, "student", batch["input_ids"], s_table)
    t_bytes = group_bytes(cross.groups, "teacher", t_ids, table)
    assert s_bytes == t_bytes and b"".join(s_bytes.values()).endswith(b" 12x<|eos|>")


def test_text_span_cuts_partial_characters():
    pieces = [b"\xa9", b"ab", b"\xe6\x97", b"\xa5", b"c", b"\xe6"]  # starts and ends inside a character
    assert text_span(pieces) == (1, 5)
    assert text_span([b"\x80"]) == (1, 1)


def test_preflight(byte, bpe):
    _, matches = build_projection(byte, bpe)
    report = preflight(byte, bpe, matches)
    assert report.exact_share == pytest.approx(259 / 263)
    teacher_2024 = [bpe.decode([i]) for i in bpe("2024", add_special_tokens=False)["input_ids"]]
    assert report.numerals["2024"] == (["2", "0", "2", "4"], teacher_2024)
    assert len(teacher_2024) < 4 and any("'2024'" in w for w in report.warnings)  # the BPE learned 2024
    assert not any("'7'" in w for w in report.warnings)  # one digit: one token on both sides
    assert "has an exact teacher token" in report.line()
    _, same = build_projection(bpe, bpe)
    report = preflight(bpe, bpe, same)
    assert report.exact_share == 1.0 and report.warnings == []


def tiny_models(teacher_tok):
    cfg = load_config(TrainConfig, str(TINY), [])
    student = load_model(cfg.student, "student", byte_tokenizer())
    teacher = load_model(cfg.teacher, "teacher", teacher_tok)
    return student, teacher


def test_same_tokenizer_batch_equals_token_level_kd(byte):
    student, teacher = tiny_models(byte)
    batch = student_batch(byte)
    table = token_bytes(byte)
    cross = retokenize_batch(batch, byte, table, table, teacher_pad_id=byte.pad_token_id)
    assert torch.equal(cross.teacher_batch["input_ids"][:, :batch["input_ids"].shape[1]] * batch["attention_mask"],
                       batch["input_ids"] * batch["attention_mask"])
    projection, _ = build_projection(byte, byte)
    labels = batch["labels"][:, 1:].reshape(-1)
    n = int((labels != IGNORE_INDEX).sum())
    with torch.no_grad():
        t_hidden = flat_positions(final_hidden(teacher, cross.teacher_batch))
    signal = DenseSignal(t_hidden, output_head(teacher, len(byte)))
    head = output_head(student, len(byte))
    hidden = flat_positions(final_hidden(student, batch))
    spec = LossSpec(temperature=2.0)
    per_group = chunked_crosstok_loss(hidden, head, signal, cross.groups, "pkl", spec, projection=projection,
                                      chunk_groups=7)
    assert cross.groups.num_groups == n  # groups of one token, one per supervised row
    got = per_group.sum() / n
    want, _ = chunked_kd_loss(hidden, head, labels, signal, n, LossSpec(temperature=2.0, t2_scale=False))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    params = [p for p in student.parameters() if p.requires_grad]
    g_got = torch.autograd.grad(got, params, retain_graph=True)
    g_want = torch.autograd.grad(want, params)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["pkl", "gold", "uld"])
def test_byte_student_bpe_teacher_batch(byte, bpe, method):
    student, teacher = tiny_models(bpe)
    batch = student_batch(byte)
    cross = retokenize_batch(batch, bpe, token_bytes(byte), token_bytes(bpe), teacher_pad_id=bpe.pad_token_id)
    projection, matches = build_projection(byte, bpe)
    with torch.no_grad():
        t_hidden = flat_positions(final_hidden(teacher, cross.teacher_batch))
    t_head = output_head(teacher, len(bpe))
    head = output_head(student, len(byte))
    hidden = flat_positions(final_hidden(student, batch))
    chunked = chunked_crosstok_loss(hidden, head, DenseSignal(t_hidden, t_head), cross.groups, method,
                                    projection=projection, matches=matches, chunk_groups=5)
    with torch.no_grad():
        naive = naive_crosstok_loss(head.logits(hidden), t_head.logits(t_hidden), cross.groups, method,
                                    projection=projection, matches=matches)
    torch.testing.assert_close(chunked.detach(), naive, rtol=1e-5, atol=1e-6)
    assert bool(torch.isfinite(chunked).all()) and bool((chunked >= 0).all())
    grad = torch.autograd.grad(chunked.sum(), head.weight)[0]
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().max()) > 0
