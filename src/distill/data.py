"""Raw rows -> ``{input_ids, labels}`` examples, split, packed, and batched.

Pipeline (``build_datasets``):

1. ``load_raw``: a local file (.jsonl/.json/.parquet/.txt/.csv), a local directory of such files (or the
   output directory of ``distill generate``, read through its manifest), or a hub dataset id, always
   through ``datasets``.
2. ``detect_format``: ``text``, ``prompt_response`` or ``messages``, from the columns and ``DataConfig``.
3. Hold out the eval rows (``eval_source``, or a seeded ``eval_fraction`` of the *raw* rows, so no
   document lands in both splits).
4. ``tokenize_example`` per row. ``labels`` are aligned with ``input_ids`` (HF convention: ``labels[t]`` is
   the target token at position ``t``; the training loop shifts). Unsupervised positions hold
   ``IGNORE_INDEX``: the bos token, prompts, and every non-assistant part of a chat.
5. Either pack everything into one stream cut into blocks of exactly ``seq_len`` tokens (labels travel
   with the ids, so the masks survive), or keep one example per row (too long -> error, or cut with
   ``data.truncate=true``).

Every example ends with an eos token, so packed documents stay separated. ``collate`` right-pads a list
of examples into tensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets.fingerprint import Hasher
from datasets.table import InMemoryTable

from distill.config import DATA_BUILDERS, DataConfig, looks_like_hub_id, looks_local
from distill.losses import IGNORE_INDEX
from distill.tokenizer import tokenizer_fingerprint

Format = Literal["text", "prompt_response", "messages"]

logger = logging.getLogger("distill")

_ROW = "__row__"  # index of the row in the source, carried along so errors can point at it
# Bump when the tokenization changes: `datasets` caches `map` results by fingerprint, and the
# fingerprint of a module-level function does not follow edits to its code.
_PIPELINE_VERSION = "1"

_TOKENIZED_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "n_supervised": datasets.Value("int64"),
        _ROW: datasets.Value("int64"),
    }
)


# --------------------------------------------------------------------------------------------- loading


GENERATIONS_FORMAT = "distill-generations"  # the manifest's format name of a `distill generate` output


def generation_files(path: Path) -> list[Path] | None:
    """The JSONL shards of a ``distill generate`` output directory, checked against its manifest (present,
    same size and sha256), or None when the directory is not one. An unfinished or damaged output is an
    error: it is never read as complete."""
    manifest, plan = path / "manifest.json", path / "plan.json"
    if not manifest.is_file():
        if plan.is_file() and _json_field(plan, "format") == GENERATIONS_FORMAT:
            raise ValueError(
                f"{path} holds unfinished `distill generate` output (no manifest.json yet); run the same "
                "`distill generate` command again to complete it"
            )
        return None
    info = json.loads(manifest.read_text())
    if info.get("format") != GENERATIONS_FORMAT:
        return None
    files = []
    for shard in info["shards"]:
        if not shard["records"]:
            continue  # every sample of these prompts was dropped (unfinished, failed): an empty file
        f = path / shard["file"]
        if not f.is_file() or f.stat().st_size != shard["bytes"] or hashlib.sha256(f.read_bytes()).hexdigest() != shard["sha256"]:
            raise ValueError(
                f"{f} is missing or differs from {manifest} (damaged?); delete it and manifest.json and run "
                "the same `distill generate` command to rewrite it"
            )
        files.append(f)
    if not files:
        raise ValueError(f"{path}: the generations hold no kept sample (see manifest.json's counts)")
    return files


def _json_field(path: Path, key: str):
    try:
        return json.loads(path.read_text()).get(key)
    except (ValueError, AttributeError):
        return None


def load_raw(source: str, split: str = "train") -> datasets.Dataset:
    """Load the raw rows of ``source``: a local file, a local directory, or a hub dataset id.

    ``split`` only applies to hub datasets; a local file or directory is a single split.
    """
    path = Path(source).expanduser()
    generated = generation_files(path) if path.is_dir() else None
    if generated is not None:
        args, kwargs = ("json",), {"data_files": [str(p) for p in generated], "split": "train"}
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_BUILDERS)
        if not files:
            raise ValueError(
                f"data directory {source} holds no supported files ({', '.join(sorted(DATA_BUILDERS))})"
            )
        builders = {DATA_BUILDERS[p.suffix.lower()] for p in files}
        if len(builders) > 1:
            raise ValueError(
                f"data directory {source} mixes file types ({', '.join(sorted({p.suffix for p in files}))}); "
                "keep one kind of file per directory"
            )
        args: tuple[str, ...] = (builders.pop(),)
        kwargs: dict[str, Any] = {"data_files": [str(p) for p in files], "split": "train"}
    elif path.is_file():
        if path.stat().st_size == 0:
            raise ValueError(f"data file {source} is empty (0 bytes); point data.source at a file with rows")
        builder = DATA_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"data file {source} has an unsupported extension; use one of {', '.join(sorted(DATA_BUILDERS))}"
            )
        args, kwargs = (builder,), {"data_files": str(path), "split": "train"}
    elif looks_local(source):
        raise ValueError(
            f"data source {source} does not exist; check the path (data.source / data.eval_source)"
        )
    elif not looks_like_hub_id(source):  # never sent to the hub, where it would be retried for minutes
        raise ValueError(
            f"data source {source!r} is neither an existing path nor a hub dataset id (`name` or `owner/name`); "
            "check data.source / data.eval_source"
        )
    else:
        args, kwargs = (source,), {"split": split}

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # datasets raises many types; the user needs to know which source failed
        raise ValueError(
            f"could not load data source {source!r} (split {split!r}): {type(exc).__name__}: {exc}"
        ) from exc


# --------------------------------------------------------------------------------------------- format


def _required_fields(fmt: str, cfg: DataConfig) -> list[tuple[str, str]]:
    """(config key, column name) pairs a format reads."""
    return {
        "messages": [("messages_field", cfg.messages_field)],
        "prompt_response": [("prompt_field", cfg.prompt_field), ("response_field", cfg.response_field)],
        "text": [("text_field", cfg.text_field)],
    }[fmt]


def _check_fields(dataset: datasets.Dataset, fmt: str, cfg: DataConfig, source: str) -> None:
    columns = dataset.column_names
    missing = [(key, col) for key, col in _required_fields(fmt, cfg) if col not in columns]
    if missing:
        wanted = ", ".join(f"`{col}` (data.{key})" for key, col in missing)
        raise ValueError(
            f"data source {source}: format {fmt!r} needs column(s) {wanted}, but the columns are {columns}; "
            f"point the config at the right column (e.g. data.{missing[0][0]}=<column>) or set data.format=..."
        )


def detect_format(dataset: datasets.Dataset, cfg: DataConfig, source: str | None = None) -> Format:
    """``cfg.format``, or for ``auto`` the first of messages / prompt_response / text whose columns exist."""
    source = source or cfg.source
    if cfg.format != "auto":
        _check_fields(dataset, cfg.format, cfg, source)
        return cfg.format
    columns = dataset.column_names
    for fmt in ("messages", "prompt_response", "text"):
        if all(col in columns for _, col in _required_fields(fmt, cfg)):
            return fmt  # type: ignore[return-value]
    raise ValueError(
        f"data source {source}: cannot tell the data format from the columns {columns}. Looked for "
        f"`{cfg.messages_field}` (messages), `{cfg.prompt_field}` + `{cfg.response_field}` (prompt_response) "
        f"and `{cfg.text_field}` (text). Name your column, e.g. data.text_field=<column>, "
        "and/or set data.format=text|prompt_response|messages"
    )


# --------------------------------------------------------------------------------------------- tokenizing


def _encode(tokenizer, text: Any, what: str) -> list[int]:
    if text is None:
        return []
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, got {type(text).__name__}: {text!r:.80}")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _finish(ids: list[int], labels: list[int], tokenizer) -> dict[str, list[int]]:
    """Prepend bos (unsupervised) when the tokenizer has one; end with a supervised eos."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; one is needed to end (and separate) examples")
    if not ids or ids[-1] != eos:
        ids, labels = ids + [eos], labels + [eos]
    bos = tokenizer.bos_token_id
    if bos is not None and ids[0] != bos:
        ids, labels = [bos] + ids, [IGNORE_INDEX] + labels
    return {"input_ids": ids, "labels": labels}


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return _encode(tokenizer, text, "the rendered chat")


def _tokenize_messages(messages: Any, tokenizer) -> dict[str, list[int]]:
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {messages!r:.120}")
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat_template, which the messages format needs")
    ids: list[int] = []
    labels: list[int] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # Supervise exactly what the model would generate after the generation prompt: the tokens
        # render(m[:i+1]) adds to render(m[:i], add_generation_prompt=True). That only works when each
        # rendering extends the one before it.
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if prompt[: len(ids)] != ids or full[: len(prompt)] != prompt:
            raise ValueError(
                "the tokenizer's chat template is not prefix-consistent: the tokens of messages[:"
                f"{i}] + generation prompt must extend the earlier turns and be a prefix of messages[:{i + 1}] "
                "(assistant), or the assistant turns cannot be located; use a template where they are, "
                "or convert the data to prompt/response"
            )
        labels += [IGNORE_INDEX] * (len(prompt) - len(ids)) + full[len(prompt) :]
        ids = full
    if not ids:  # no assistant turn: nothing to learn from this row
        return {"input_ids": [], "labels": []}
    # Trailing non-assistant messages teach nothing and are left out; a supervised eos is appended when
    # the template does not end assistant turns with it, so the model learns to stop.
    return _finish(ids, labels, tokenizer)


def tokenize_example(example: dict, fmt: Format, tokenizer, cfg: DataConfig) -> dict[str, list[int]]:
    """One raw row -> ``{"input_ids", "labels"}`` (aligned; unsupervised positions are IGNORE_INDEX).

    - text: ``[bos] text [eos]``, every token but bos supervised.
    - prompt_response: ``[bos] prompt response [eos]`` (no separator is added: put it in the data), only
      response + eos supervised.
    - messages: the chat template's rendering; only assistant turns (and a final eos) supervised.

    A row with nothing to learn from (empty text, no assistant turn) gives empty lists.
    """
    if fmt == "text":
        ids = _encode(tokenizer, example[cfg.text_field], f"column `{cfg.text_field}`")
        return _finish(ids, list(ids), tokenizer) if ids else {"input_ids": [], "labels": []}
    if fmt == "prompt_response":
        prompt = _encode(tokenizer, example[cfg.prompt_field], f"column `{cfg.prompt_field}`")
        response = _encode(tokenizer, example[cfg.response_field], f"column `{cfg.response_field}`")
        if not prompt and not response:
            return {"input_ids": [], "labels": []}
        return _finish(prompt + response, [IGNORE_INDEX] * len(prompt) + response, tokenizer)
    if fmt == "messages":
        return _tokenize_messages(example[cfg.messages_field], tokenizer)
    raise ValueError(f"unknown data format {fmt!r} (expected text, prompt_response or messages)")


def _tokenize_row(example: dict, fmt: Format, tokenizer, cfg: DataConfig) -> dict[str, Any]:
    out = tokenize_example(example, fmt, tokenizer, cfg)
    ids, labels = out["input_ids"], out["labels"]
    if not cfg.packing and cfg.truncate:
        ids, labels = ids[: cfg.seq_len], labels[: cfg.seq_len]
    n_supervised = sum(label != IGNORE_INDEX for label in labels)
    return {"input_ids": ids, "labels": labels, "n_supervised": n_supervised}


# --------------------------------------------------------------------------------------------- building


def _pack(ds: datasets.Dataset, seq_len: int, source: str, name: str) -> tuple[datasets.Dataset, int]:
    """Concatenate all examples into one stream and cut it into ``seq_len`` blocks (remainder dropped).

    Returns the blocks that have at least one supervised label, and how many were dropped.
    """
    table = ds.with_format("arrow")[:]  # honours any indices mapping left by select()
    ids = pc.list_flatten(table.column("input_ids")).to_numpy()
    labels = pc.list_flatten(table.column("labels")).to_numpy()
    n_blocks = len(ids) // seq_len
    if n_blocks == 0:
        hint = " or a larger data.eval_fraction / a data.eval_source" if name == "eval" else ""
        raise ValueError(
            f"data source {source} ({name}): only {len(ids)} tokens, fewer than one block of "
            f"data.seq_len={seq_len}; use a smaller data.seq_len or more data{hint}"
        )
    ids = ids[: n_blocks * seq_len].reshape(n_blocks, seq_len)
    labels = labels[: n_blocks * seq_len].reshape(n_blocks, seq_len)
    keep = (labels != IGNORE_INDEX).any(axis=1)

    def blocks(a: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(a[keep].reshape(-1), type=pa.int32()), seq_len)

    packed = datasets.Dataset(InMemoryTable(pa.table({"input_ids": blocks(ids), "labels": blocks(labels)})))
    return packed, int(n_blocks - keep.sum())


def _prepare(
    raw: datasets.Dataset, fmt: Format, tokenizer, cfg: DataConfig, source: str, name: str
) -> datasets.Dataset:
    """Tokenize, length-check, drop unsupervised examples, and pack one split."""
    n_rows = len(raw)
    # An explicit fingerprint for the `map` cache: the data, everything about the tokenizer (the
    # fingerprint covers vocab/specials/template, the backend JSON covers normalization and merges),
    # and the settings that change the output.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fingerprint = Hasher.hash(
        [
            raw._fingerprint,
            tokenizer_fingerprint(tokenizer),
            backend.to_str() if backend is not None else type(tokenizer).__name__,
            fmt,
            cfg.model_dump(),
            _PIPELINE_VERSION,
        ]
    )
    ds = raw.map(
        _tokenize_row,
        fn_kwargs={"fmt": fmt, "tokenizer": tokenizer, "cfg": cfg},
        remove_columns=[c for c in raw.column_names if c != _ROW],
        features=_TOKENIZED_FEATURES,
        num_proc=cfg.num_proc,
        new_fingerprint=fingerprint,
        desc=f"tokenizing {name} ({fmt})",
    )
    columns = ds.with_format("numpy")
    rows = np.asarray(columns[_ROW])
    n_supervised = np.asarray(columns["n_supervised"])
    lengths = pc.list_value_length(ds.with_format("arrow")["input_ids"]).to_numpy()

    n_empty = int((lengths == 0).sum())
    if n_empty == n_rows:
        raise ValueError(
            f"data source {source} ({name}): all {n_rows} rows are empty after tokenization (no text, or no assistant turn)"
        )

    if not cfg.packing:
        too_long = np.flatnonzero(lengths > cfg.seq_len)
        if len(too_long):
            first = too_long[0]
            raise ValueError(
                f"data source {source} ({name}): row {rows[first]} is {lengths[first]} tokens long, more than "
                f"data.seq_len={cfg.seq_len} ({len(too_long)} row(s) are); set data.truncate=true to cut "
                "them, data.packing=true to pack the stream into blocks, or a larger data.seq_len"
            )

    keep = np.flatnonzero(n_supervised > 0)
    if len(keep) == 0:
        raise ValueError(
            f"data source {source} ({name}): none of the {n_rows} rows has a supervised token "
            f"({n_empty} are empty); check data.format and the field names"
        )
    if len(keep) < n_rows:
        logger.warning(
            "data source %s (%s): dropped %d of %d examples with no supervised token (%d empty)",
            source,
            name,
            n_rows - len(keep),
            n_rows,
            n_empty,
        )
        ds = ds.select(keep)
    ds = ds.remove_columns(["n_supervised", _ROW])

    if cfg.packing:
        ds, dropped = _pack(ds, cfg.seq_len, source, name)
        if len(ds) == 0:
            raise ValueError(f"data source {source} ({name}): no packed block has a supervised token")
        if dropped:
            logger.warning(
                "data source %s (%s): dropped %d packed blocks with no supervised token",
                source,
                name,
                dropped,
            )
    return ds


def _load_rows(source: str, split: str, limit: int | None) -> datasets.Dataset:
    raw = load_raw(source, split)
    if len(raw) == 0:
        raise ValueError(f"data source {source} is empty (0 rows)")
    if limit is not None and limit < len(raw):
        raw = raw.select(range(limit))  # the first N rows, deterministically
    return raw.add_column(_ROW, np.arange(len(raw), dtype=np.int64))


def build_datasets(
    cfg: DataConfig, tokenizer, max_positions: int | None = None
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, eval) datasets with ``input_ids`` and ``labels`` columns; eval is None when not asked for.

    ``cfg.max_examples`` keeps the first N rows of ``cfg.source`` before the eval rows are held out;
    ``cfg.max_eval_examples`` caps the eval rows. With packing every example is exactly ``cfg.seq_len``
    tokens; without, at most ``cfg.seq_len``.
    """
    if max_positions is not None and cfg.seq_len > max_positions:
        raise ValueError(
            f"data.seq_len={cfg.seq_len} is more than the model's limit of {max_positions} positions; "
            f"set data.seq_len<={max_positions}"
        )
    raw = _load_rows(cfg.source, cfg.split, cfg.max_examples)
    fmt = detect_format(raw, cfg)

    eval_raw = None
    eval_source = cfg.eval_source
    if eval_source is not None:
        eval_raw = _load_rows(eval_source, cfg.split, None)
        _check_fields(eval_raw, fmt, cfg, eval_source)  # same format as train, even under "auto"
    elif cfg.eval_fraction > 0:
        eval_source = cfg.source
        if len(raw) < 2:
            raise ValueError(
                f"data source {cfg.source} has {len(raw)} row, too few to hold out eval rows; "
                "set data.eval_fraction=0 or give data.eval_source"
            )
        # Split the raw rows (before tokenizing and packing) so no document is in both splits.
        n_eval = min(max(1, round(cfg.eval_fraction * len(raw))), len(raw) - 1)
        parts = raw.train_test_split(test_size=n_eval, seed=cfg.seed, shuffle=True)
        raw, eval_raw = parts["train"], parts["test"]
    if eval_raw is not None and cfg.max_eval_examples is not None and cfg.max_eval_examples < len(eval_raw):
        eval_raw = eval_raw.select(range(cfg.max_eval_examples))

    train = _prepare(raw, fmt, tokenizer, cfg, cfg.source, "train")
    evaluation = None if eval_raw is None else _prepare(eval_raw, fmt, tokenizer, cfg, eval_source, "eval")
    return train, evaluation


# --------------------------------------------------------------------------------------------- batching


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` / ``labels`` to the longest example; labels are IGNORE_INDEX at padding."""
    if not examples:
        raise ValueError("collate got an empty batch")
    seqs = [torch.as_tensor(e["input_ids"], dtype=torch.long) for e in examples]
    targets = [torch.as_tensor(e.get("labels", e["input_ids"]), dtype=torch.long) for e in examples]
    batch, width = len(seqs), max(len(s) for s in seqs)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for i, (seq, target) in enumerate(zip(seqs, targets, strict=True)):
        if len(target) != len(seq):
            raise ValueError(f"example {i}: {len(seq)} input_ids but {len(target)} labels")
        input_ids[i, : len(seq)] = seq
        labels[i, : len(seq)] = target
        attention_mask[i, : len(seq)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
