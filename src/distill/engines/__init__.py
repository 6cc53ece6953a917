"""Engines: a model that can score, sample and correct, in this process (:class:`LocalEngine`) or behind an
OpenAI-compatible server (:class:`ServerEngine`: vLLM, SGLang, ``distill serve``).

Training and evaluation (through their teachers, :mod:`distill.teachers`), cache capture and generation get
their engine from :func:`open_engine`, the one place that branches on where the model runs, and then ask the
engine what it can do (``dense``, ``hidden_states``, ``max_top_k``, ``max_positions``, ``model``,
``corrector``: :mod:`distill.engines.base`), never which one it is.
"""

from __future__ import annotations

import hashlib
import json

from distill import sharding
from distill.config import ModelSpec, ServerTeacherSpec
from distill.engines.base import Corrector, Engine
from distill.engines.local import LocalEngine, layer_states
from distill.engines.server import ServerEngine
from distill.models import load_model, load_tokenizer, model_identity, resolve_vocab

__all__ = ["Corrector", "Engine", "LocalEngine", "ServerEngine", "engine_identity", "engine_tokenizer", "layer_states", "open_engine"]


def open_engine(spec: ModelSpec | ServerTeacherSpec, tokenizer, *, field: str = "teacher",
                vocab_policy: str = "truncate", device=None, sharded: bool = False, temperature: float | None = None,
                top_k: int | None = None) -> Engine:
    """The engine a model spec or a server spec describes. ``tokenizer``: the model's (a local model is built
    for it, its output layer checked against it; a server's ``/tokenize`` is compared with it). ``temperature``
    and ``top_k``: what a sparse engine will score at (a server checks at start that it can; default top-k:
    the spec's); None for an engine that only samples. ``sharded``: a local model sharded for inference over
    the processes (FSDP)."""
    if isinstance(spec, ServerTeacherSpec):
        return ServerEngine(spec, tokenizer, temperature=temperature, top_k=top_k)
    model = load_model(spec, field, tokenizer)
    resolve_vocab(model, len(tokenizer), field, vocab_policy)
    if device is not None:
        model = model.to(device)
    if sharded:  # an FSDP run: the model is sharded too, never whole on one process
        model = sharding.shard_for_inference(model.requires_grad_(False))
    return LocalEngine(model, tokenizer, device=device)


def engine_identity(spec: ModelSpec | ServerTeacherSpec) -> dict:
    """What identifies the model behind an engine for the artifacts made from it (caches, generations): a
    local model's path or config (:func:`distill.models.model_identity`); a server's address and model name
    (its weights are out of reach)."""
    if isinstance(spec, ServerTeacherSpec):
        ident = {"server": spec.server.rstrip("/"), "model": spec.model, "tokenizer": spec.tokenizer}
        ident["sha256"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
        return ident
    return model_identity(spec)


def engine_tokenizer(spec: ModelSpec | ServerTeacherSpec, field: str = "teacher"):
    """The tokenizer of the model a spec describes: a local model's own; a server's local copy when the spec
    names one (``tokenizer``), else None (the server tokenizes text itself)."""
    if isinstance(spec, ServerTeacherSpec) and spec.tokenizer is None:
        return None
    return load_tokenizer(spec, field)
