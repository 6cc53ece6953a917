"""Loading, label masking, splitting, packing and collating (byte tokenizer, files under tmp_path)."""

from __future__ import annotations

import json
import logging

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distill.config import DataConfig
from distill.data import (
    IGNORE_INDEX,
    build_datasets,
    collate,
    detect_format,
    load_raw,
    tokenize_example,
)
from distill.tokenizer import byte_tokenizer

BOS, EOS, PAD, USER, ASSISTANT, SYSTEM, END = range(256, 263)
M = IGNORE_INDEX  # "masked"


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(autouse=True)
def _quiet_isolated_datasets(tmp_path, monkeypatch):
    """Keep `datasets`' cache inside tmp_path and its progress bars off."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    yield
    if was_enabled:
        datasets.enable_progress_bars()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def b(text: str) -> list[int]:
    return list(text.encode())


def cfg(source, **kw) -> DataConfig:
    kw.setdefault("eval_fraction", 0.0)
    return DataConfig(source=str(source), **kw)


# --------------------------------------------------------------------------------------------- masking


def test_text_labels(tok):
    out = tokenize_example({"text": "hi"}, "text", tok, cfg("x.jsonl"))
    assert out["input_ids"] == [BOS, *b("hi"), EOS]
    assert out["labels"] == [M, *b("hi"), EOS]
    assert tokenize_example({"text": ""}, "text", tok, cfg("x.jsonl")) == {"input_ids": [], "labels": []}


def test_prompt_response_masking(tok):
    out = tokenize_example({"prompt": "ab", "response": "cd"}, "prompt_response", tok, cfg("x.jsonl"))
    assert out["input_ids"] == [BOS, *b("abcd"), EOS]
    assert out["labels"] == [M, M, M, *b("cd"), EOS]


def test_two_turn_chat_masking(tok):
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "ab"},
    ]
    out = tokenize_example({"messages": messages}, "messages", tok, cfg("x.jsonl"))
    assert out["input_ids"] == [
        BOS, SYSTEM, *b("s"), END, USER, *b("hi"), END, ASSISTANT, *b("yo"), END,
        USER, *b("q"), END, ASSISTANT, *b("ab"), END, EOS,
    ]  # fmt: skip
    assert out["labels"] == [
        M, M, M, M, M, M, M, M, M, *b("yo"), END,
        M, M, M, M, *b("ab"), END, EOS,
    ]  # fmt: skip


def test_chat_without_assistant_is_empty(tok):
    out = tokenize_example({"messages": [{"role": "user", "content": "hi"}]}, "messages", tok, cfg("x.jsonl"))
    assert out == {"input_ids": [], "labels": []}


def test_chat_template_not_prefix_consistent(tok):
    bad = byte_tokenizer()  # generation prompt ends with a newline that the rendered turn lacks
    bad.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(ValueError, match="not prefix-consistent"):
        tokenize_example({"messages": messages}, "messages", bad, cfg("x.jsonl"))


# --------------------------------------------------------------------------------------------- loading / format


def test_load_txt_and_parquet(tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("first line\nsecond line\n")
    assert load_raw(str(txt))["text"] == ["first line", "second line"]

    parquet = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": ["p1", "p2"], "response": ["r1", "r2"]}), parquet)
    ds = load_raw(str(parquet))
    assert ds.column_names == ["prompt", "response"] and len(ds) == 2
    assert detect_format(ds, cfg(parquet)) == "prompt_response"


def test_load_directory(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b"}, {"text": "c"}])
    assert sorted(load_raw(str(tmp_path))["text"]) == ["a", "b", "c"]

    (tmp_path / "c.txt").write_text("x\n")
    with pytest.raises(ValueError, match="mixes file types"):
        load_raw(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no supported files"):
        load_raw(str(empty))


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"\./missing\.jsonl does not exist; check the path"):
        load_raw("./missing.jsonl")
    with pytest.raises(ValueError, match="does not exist"):
        load_raw(str(tmp_path / "nested" / "missing"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"data file .*empty.jsonl is empty \(0 bytes\)"):
        load_raw(str(tmp_path / "empty.jsonl"))

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="could not load data source 'org/corpus' .*no network"):
        load_raw("org/corpus")


def test_detect_format(tok):
    def ds(**cols):
        return datasets.Dataset.from_dict({k: [v] for k, v in cols.items()})

    c = cfg("src.jsonl")
    assert detect_format(ds(text="t"), c) == "text"
    assert detect_format(ds(prompt="p", response="r", text="t"), c) == "prompt_response"
    assert detect_format(ds(messages=[{"role": "user", "content": "x"}], text="t"), c) == "messages"
    assert detect_format(ds(body="t"), cfg("src.jsonl", text_field="body")) == "text"

    with pytest.raises(ValueError, match=r"src\.jsonl.*\['body'\].*data\.text_field=.*data\.format="):
        detect_format(ds(body="t"), c)
    with pytest.raises(ValueError, match=r"src\.jsonl.*`response` \(data\.response_field\).*\['prompt'\]"):
        detect_format(ds(prompt="p"), cfg("src.jsonl", format="prompt_response"))


# --------------------------------------------------------------------------------------------- building


def text_rows(n):
    return [{"text": f"document number {i:03d}."} for i in range(n)]  # 20 bytes each


def test_packing_blocks_and_alignment(tmp_path, tok):
    src = write_jsonl(tmp_path / "t.jsonl", text_rows(10))
    train, evaluation = build_datasets(cfg(src, seq_len=16), tok)
    assert evaluation is None
    assert len(train) == 10 * 22 // 16  # 22 tokens per row with bos/eos, remainder dropped
    stream_ids, stream_labels = [], []
    for row in train:
        assert len(row["input_ids"]) == len(row["labels"]) == 16
        stream_ids += row["input_ids"]
        stream_labels += row["labels"]
    # text: every label is its own token, except bos which is ignored
    for token, label in zip(stream_ids, stream_labels, strict=True):
        assert label == (M if token == BOS else token)
    assert tok.decode(stream_ids[:22]) == "<|bos|>document number 000.<|eos|>"


def test_packing_keeps_prompt_masks(tmp_path, tok):
    rows = [{"prompt": f"question {i}?", "response": f"answer {i}."} for i in range(12)]
    src = write_jsonl(tmp_path / "pr.jsonl", rows)
    train, _ = build_datasets(cfg(src, seq_len=32), tok)
    ids = [t for row in train for t in row["input_ids"]]
    labels = [t for row in train for t in row["labels"]]
    # the packed stream is the examples back to back (file order, no split), masks included
    c = cfg(src, seq_len=32)
    examples = [tokenize_example(row, "prompt_response", tok, c) for row in rows]
    expected_ids = [t for ex in examples for t in ex["input_ids"]]
    expected_labels = [t for ex in examples for t in ex["labels"]]
    assert len(ids) == len(expected_ids) // 32 * 32
    assert ids == expected_ids[: len(ids)] and labels == expected_labels[: len(ids)]
    assert labels[:12] == [M] * 12 and labels[12:22] == [*b("answer 0."), EOS]


def test_no_packing_variable_length_and_truncate(tmp_path, tok):
    rows = [{"text": "short"}, {"text": "a considerably longer document"}]
    src = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(
        ValueError, match=r"t\.jsonl \(train\): row 1 is 32 tokens.*data\.truncate=true.*data\.packing=true"
    ):
        build_datasets(cfg(src, seq_len=16, packing=False), tok)

    train, _ = build_datasets(cfg(src, seq_len=16, packing=False, truncate=True), tok)
    assert [len(r) for r in train["input_ids"]] == [7, 16]
    assert train[0]["input_ids"] == [BOS, *b("short"), EOS]


def test_split_deterministic_and_disjoint(tmp_path, tok):
    src = write_jsonl(tmp_path / "t.jsonl", text_rows(40))
    c = cfg(src, seq_len=64, packing=False, eval_fraction=0.25, seed=3)

    def texts(ds):
        return [tok.decode(ids, skip_special_tokens=True) for ids in ds["input_ids"]]

    train, evaluation = build_datasets(c, tok)
    train2, evaluation2 = build_datasets(c, tok)
    assert texts(train) == texts(train2) and texts(evaluation) == texts(evaluation2)
    assert len(evaluation) == 10 and len(train) == 30
    assert not set(texts(train)) & set(texts(evaluation))
    assert set(texts(train)) | set(texts(evaluation)) == {r["text"] for r in text_rows(40)}

    _, other_seed = build_datasets(c.model_copy(update={"seed": 4}), tok)
    assert set(texts(other_seed)) != set(texts(evaluation))

    _, capped = build_datasets(c.model_copy(update={"max_eval_examples": 3}), tok)
    assert len(capped) == 3


def test_max_examples_and_eval_source(tmp_path, tok):
    src = write_jsonl(tmp_path / "train.jsonl", text_rows(10))
    ev = write_jsonl(tmp_path / "eval.jsonl", [{"text": "held out"}] * 5)
    train, evaluation = build_datasets(
        cfg(src, seq_len=64, packing=False, max_examples=4, eval_source=ev, max_eval_examples=2), tok
    )
    assert [tok.decode(r, skip_special_tokens=True) for r in train["input_ids"]] == [
        r["text"] for r in text_rows(4)
    ]
    assert len(evaluation) == 2 and tok.decode(evaluation[0]["input_ids"]) == "<|bos|>held out<|eos|>"

    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"body": "x"}])
    with pytest.raises(ValueError, match=r"wrong\.jsonl.*`text` \(data\.text_field\)"):
        build_datasets(cfg(src, eval_source=wrong), tok)


def test_num_proc(tmp_path, tok):
    src = write_jsonl(tmp_path / "t.jsonl", text_rows(8))
    train, _ = build_datasets(cfg(src, seq_len=16, num_proc=2), tok)
    assert len(train) == 8 * 22 // 16


def test_drops_unsupervised_and_logs(tmp_path, tok, caplog):
    rows = [{"prompt": "p" * 20, "response": "r"}, {"prompt": "q", "response": "answer"}]
    src = write_jsonl(tmp_path / "pr.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="distill"):
        train, _ = build_datasets(cfg(src, seq_len=8, packing=False, truncate=True), tok)
    assert len(train) == 1 and train[0]["labels"] == [M, M, *b("answer")]
    assert "dropped 1 of 2 examples with no supervised token" in caplog.text

    with pytest.raises(ValueError, match=r"pr\.jsonl \(train\): none of the 1 rows has a supervised token"):
        build_datasets(cfg(src, seq_len=8, packing=False, truncate=True, max_examples=1), tok)


# --------------------------------------------------------------------------------------------- errors


def test_seq_len_over_model_limit(tmp_path, tok):
    with pytest.raises(ValueError, match=r"data\.seq_len=64 .*limit of 32"):
        build_datasets(cfg("./never-loaded.jsonl", seq_len=64), tok, max_positions=32)


def test_empty_sources(tmp_path, tok, monkeypatch):
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": ""}])
    with pytest.raises(ValueError, match=r"blank\.jsonl \(train\): all 2 rows are empty"):
        build_datasets(cfg(blank), tok)

    parquet = tmp_path / "none.parquet"  # `datasets` itself refuses a file without rows
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), parquet)
    with pytest.raises(ValueError, match=r"could not load data source .*none\.parquet"):
        build_datasets(cfg(parquet), tok)

    empty = datasets.Dataset.from_dict({"text": []})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: empty)
    with pytest.raises(ValueError, match=r"org/empty is empty \(0 rows\)"):
        build_datasets(cfg("org/empty"), tok)


def test_stream_shorter_than_a_block(tmp_path, tok):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "tiny"}])
    with pytest.raises(ValueError, match=r"t\.jsonl \(train\): only 6 tokens.*smaller data\.seq_len"):
        build_datasets(cfg(src, seq_len=16), tok)

    src = write_jsonl(tmp_path / "t2.jsonl", text_rows(20))
    with pytest.raises(ValueError, match=r"\(eval\): only 22 tokens.*data\.eval_fraction"):
        build_datasets(cfg(src, seq_len=32, eval_fraction=0.05), tok)


def test_too_few_rows_to_split(tmp_path, tok):
    src = write_jsonl(tmp_path / "one.jsonl", [{"text": "only row"}])
    with pytest.raises(ValueError, match=r"one\.jsonl has 1 row.*data\.eval_fraction=0"):
        build_datasets(cfg(src, eval_fraction=0.1), tok)


# --------------------------------------------------------------------------------------------- collate


def test_collate_pads_right():
    batch = collate(
        [{"input_ids": [1, 2, 3], "labels": [M, 2, 3]}, {"input_ids": [4], "labels": [4]}], pad_token_id=PAD
    )
    assert {k: v.shape for k, v in batch.items()} == {
        k: (2, 3) for k in ("input_ids", "labels", "attention_mask")
    }
    assert all(v.dtype == torch.long for v in batch.values())
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, PAD, PAD]]
    assert batch["labels"].tolist() == [[M, 2, 3], [4, M, M]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="3 input_ids but 2 labels"):
        collate([{"input_ids": [1, 2, 3], "labels": [1, 2]}], pad_token_id=PAD)
