"""Load Hugging Face models and tokenizers, or build small random ones from a config dict.

Models stay ordinary ``transformers`` models: what goes in is what ``from_pretrained`` reads, and what
comes out is what ``save_pretrained`` writes. Every model directory distill writes goes through
:func:`save_pretrained` here: the model, then its tokenizer through ``distill.tokenizer.save_tokenizer``, which
checks that plain ``AutoTokenizer.from_pretrained`` reloads it as itself for the model's family.

Vocabulary policy. Checkpoints often have more embedding rows than the tokenizer has tokens (Qwen2.5:
152,064 rows for 151,936 tokens). The extra rows are never real tokens, so with ``vocab_policy:
truncate`` (the default) both models' logits are cut to the tokenizer's size before any softmax. Padding
the smaller model with zero logits would give those fake tokens real probability mass, so it is never
done. ``vocab_policy: error`` refuses any model whose row count differs from the tokenizer's size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from distill.config import ModelSpec, looks_local
from distill.losses import LinearHead
from distill.tokenizer import byte_tokenizer, check_saves, save_tokenizer, tokenizer_fingerprint

logger = logging.getLogger("distill")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_local(ref: str, field: str, want: str) -> None:
    """A reference that is clearly a path must exist; anything else may be a hub id."""
    if looks_local(ref) and not Path(ref).expanduser().exists():
        raise ValueError(f"{field}: {ref} does not exist (expected {want})")


def load_tokenizer(spec, field: str):
    """The tokenizer of a model spec (``tokenizer`` or ``path``), or of a server spec's local ``tokenizer``."""
    ref = spec.tokenizer or getattr(spec, "path", None)
    if ref is None:
        raise ValueError(f"{field}.tokenizer: give a local copy of the server's tokenizer (a directory, hub id or 'byte')")
    if ref == "byte":
        return byte_tokenizer()
    _check_local(ref, f"{field}.tokenizer" if spec.tokenizer else f"{field}.path", "a tokenizer directory")
    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(ref))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{field}: cannot load a tokenizer from {ref!r}: {exc}") from None


def load_model(spec: ModelSpec, field: str, tokenizer=None) -> PreTrainedModel:
    """``spec.path``: ``from_pretrained``; ``spec.config``: random init with ``spec.seed``."""
    dtype = DTYPES[spec.dtype]
    if spec.path is not None:
        _check_local(spec.path, f"{field}.path", "a Hugging Face model directory")
        path = os.path.expanduser(spec.path)
        if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
            raise ValueError(f"{field}.path: {path} has no config.json; is it a Hugging Face model directory?")
        try:
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{field}.path: cannot load a causal LM from {spec.path!r}: {exc}") from None

    cfg_dict = dict(spec.config or {})
    model_type = cfg_dict.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{field}.config needs `model_type` (e.g. llama, qwen2, gemma2)")
    if tokenizer is not None:
        cfg_dict.setdefault("vocab_size", len(tokenizer))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, name, None) is not None:
                cfg_dict.setdefault(name, getattr(tokenizer, name))
    try:
        config = AutoConfig.for_model(model_type, **cfg_dict)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{field}.config: {exc}") from None
    # Build under a fixed seed so a random-init model is the same on every process and every run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def save_pretrained(model: PreTrainedModel, tokenizer, out_dir: str | os.PathLike, *, state_dict=None) -> Path:
    """Write ``model`` (safetensors; ``state_dict``: the gathered weights of a sharded model) and ``tokenizer``
    into ``out_dir`` (a temporary directory the caller then commits), so that ``AutoModelForCausalLM`` and
    ``AutoTokenizer.from_pretrained(out_dir)`` load them back as they are. Raises ValueError otherwise."""
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir), safe_serialization=True, state_dict=state_dict)
    save_tokenizer(tokenizer, out_dir, where=str(out_dir))
    rows = model.get_output_embeddings().weight.shape[0]
    assert len(tokenizer) <= rows, f"{out_dir}: {len(tokenizer)} tokens for {rows} output rows"
    return out_dir


def check_tokenizer_saves(model: PreTrainedModel, tokenizer, field: str) -> None:
    """Before a run whose output is a checkpoint of ``model``: its tokenizer would reload from that checkpoint
    as itself (some families' tokenizer classes rebuild a tokenizer their own way; see distill.tokenizer)."""
    check_saves(tokenizer, model.config, where=f"{field} ({model.config.model_type} with this tokenizer)")


def check_tokenizers_agree(student_tok, teacher_tok, student_ref: str, teacher_ref: str) -> None:
    """Token-level distillation compares distributions id by id: the vocabularies must be the same."""
    if tokenizer_fingerprint(student_tok) == tokenizer_fingerprint(teacher_tok):
        return
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    detail = f"{len(s_vocab)} vs {len(t_vocab)} tokens"
    if len(s_vocab) == len(t_vocab):
        diff = sorted(k for k in s_vocab if t_vocab.get(k) != s_vocab[k])[:3]
        detail = f"same size, but ids differ (e.g. {diff})" if diff else "same vocabulary, other special tokens or chat template"
    raise ValueError(
        f"the student tokenizer ({student_ref}) and the teacher tokenizer ({teacher_ref}) differ: {detail}. "
        "Token-level distillation needs one tokenizer; give both models the same `tokenizer`, or use "
        "sequence-level distillation (teacher generations) for a teacher with another tokenizer."
    )


def resolve_vocab(model: PreTrainedModel, vocab_size: int, field: str, policy: Literal["truncate", "error"]) -> int:
    """How many logit columns of ``model`` are real tokens; see the module docstring."""
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < vocab_size:
        raise ValueError(
            f"{field}: the output layer has {rows} rows but the tokenizer has {vocab_size} tokens; "
            "the model cannot score every token (wrong tokenizer for this model?)"
        )
    if rows > vocab_size:
        if policy == "error":
            raise ValueError(
                f"{field}: the output layer has {rows} rows for {vocab_size} tokenizer tokens; "
                "set loss.vocab_policy=truncate to drop the padding rows"
            )
        logger.info("%s: %d output rows, %d tokenizer tokens: logits truncated to %d", field, rows, vocab_size, vocab_size)
    return vocab_size


def output_head(model: PreTrainedModel, vocab_size: int) -> LinearHead:
    """The model's output layer as a :class:`~distill.losses.chunked.LinearHead` (with soft-capping/scale)."""
    weight, bias = layer_weight(model.get_output_embeddings())
    config = model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    return LinearHead(
        weight=weight,
        bias=bias,
        logit_scale=float(scale) if scale is not None else 1.0,
        softcap=float(softcap) if softcap else None,
        vocab_size=vocab_size,
    )


def layer_weight(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (weight, bias) a linear layer applies. A layer with LoRA adapters (``peft``, :mod:`distill.lora`)
    applies base + (alpha / r) * B @ A of its active adapters, formed here with autograd (so the loss's weight
    gradient reaches A and B); with the adapters disabled or merged, the base weight."""
    base = getattr(layer, "base_layer", None)
    if base is None or not hasattr(layer, "get_delta_weight"):
        return layer.weight, getattr(layer, "bias", None)
    weight = base.weight
    if not layer.disable_adapters and not layer.merged:
        for name in layer.active_adapters:
            if name in layer.lora_A:
                weight = weight + layer.get_delta_weight(name).to(weight.dtype)
    return weight, getattr(base, "bias", None)


def max_positions(model: PreTrainedModel) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def has_accelerator() -> bool:
    """A GPU (CUDA/ROCm), an XPU or Apple's MPS is present; otherwise processes run on the CPU (gloo)."""
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool((xpu is not None and xpu.is_available()) or torch.backends.mps.is_available())


def final_hidden(model, batch: dict) -> torch.Tensor:
    """Final (post-norm) hidden states (B, T, H); ``logits_to_keep=1`` skips the full logits."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    return out.hidden_states[-1]


def flat_positions(hidden_BTH: torch.Tensor) -> torch.Tensor:
    """Hidden states of the positions that predict a next token, as (N, H) with N = B * (T - 1)."""
    return hidden_BTH[:, :-1].reshape(-1, hidden_BTH.shape[-1])


def model_identity(spec: ModelSpec) -> dict:
    """What identifies a model for the artifacts made from it (caches, generations): its path (+ the
    config.json hash and the weight files' sizes) or its config and seed. A server's:
    :func:`distill.engines.engine_identity`."""
    ident: dict = {"dtype": spec.dtype, "tokenizer": spec.tokenizer}
    if spec.path is not None:
        ident["path"] = spec.path
        root = Path(spec.path).expanduser()
        if root.is_dir():
            cfg = root / "config.json"
            if cfg.is_file():
                ident["config_sha256"] = hashlib.sha256(cfg.read_bytes()).hexdigest()
            weights = sorted(
                (p.name, p.stat().st_size)
                for p in root.iterdir()
                if p.suffix in (".safetensors", ".bin", ".pt", ".pth")
            )
            ident["weights"] = hashlib.sha256(json.dumps(weights).encode()).hexdigest()
    else:
        ident["config"] = spec.config
        ident["seed"] = spec.seed
    ident["sha256"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return ident
