"""Teachers: the one place in distill with several implementations.

A teacher is opened once from its config by :func:`open_teacher` (the only branch on the config's kind),
checks there that it fits the run, and then, for any batch, returns its **signal** for the batch's
next-token positions (``labels[:, 1:]``, flattened to ``B * (T - 1)`` rows):

* :class:`LiveTeacher` (``teacher: {path: DIR}`` or ``{config: ...}``): a Hugging Face model in this
  process. Dense signal: its final hidden states and output layer (:class:`distill.losses.chunked.DenseSignal`);
  the loss forms the logits a chunk of rows at a time.
* :class:`CachedTeacher` (``teacher: {cache: DIR}``): targets captured by ``distill cache``. Sparse signal:
  ids + probabilities, with or without the tail mass (:class:`distill.losses.SparseTarget`).
* :class:`ServerTeacher` (``teacher: {server: URL}``): a model behind an HTTP server, scored on token ids.
  Sparse signal: its top-k and the realized token at the loss temperature, and the tail mass.

Training and evaluation use the same object. What evaluation can say about the student's distance to the
teacher depends on the signal (:attr:`eval_estimates`):

* ``exact`` (live): ``kl_to_teacher`` = KL(p || q) over the vocabulary, ``top1_agreement``.
* ``topk_tail`` (top-k + tail cache, server): KL over the k kept ids + one tail class (by the data-processing
  inequality a lower bound of the full KL; exact when k = V) and ``top1_agreement`` (the teacher's top-1 is
  stored exactly).
* ``topk`` (renormalized top-k cache): KL between teacher and student renormalized over the k ids, and
  ``top1_agreement``.
* ``sampled`` (sampled cache, N draws ``x_i ~ p``, ``p_hat = counts / N``): the KL and the teacher's argmax
  cannot be estimated without bias from N draws. What can: ``ce_to_teacher`` = ``-sum p_hat log q``, an
  unbiased estimate of the cross-entropy H(p, q) = KL(p || q) + H(p) (H(p) does not depend on the student,
  so differences between students are differences in KL), and ``teacher_prob_of_top1`` = ``p_hat(argmax q)``,
  an unbiased estimate of p(argmax q), the chance that a teacher sample equals the student's top-1.

More kinds are built from these (docs/methods.md §9, §11, §13):

* :class:`MixtureTeacher` (``teacher: {teachers: [...], mix: probability | loss}``): several teachers of any
  kind, each with a weight and its own temperature; its signal is a :class:`distill.losses.chunked.MixtureSignal`,
  which the chunked loss forms a chunk of rows of each member at a time.
* :class:`SelfTeacher` (``teacher: {self: ema | snapshot}``): the student itself, as the moving average of
  its weights or a frozen copy taken every N steps; it follows the student after each optimizer step
  (``follow``) and its weights are kept in the run's checkpoints (``state_dict`` / ``load_state_dict``).
* :class:`StudentBaseTeacher` (``teacher: {student_base: true}``): a LoRA student's own base model, its
  adapters switched off for the teacher's pass; it shares the student's weights (no extra memory).

Each kind is a module of this package (``live``, ``cached``, ``server``, ``mixture``, ``self_distill``,
``peers``, ``student_base``); this one opens them. Adding a kind of teacher: a spec in ``config.py`` (a member
of ``TeacherSpec``), a module here with a class with the same attributes and methods as these, and its branch
in :func:`open_teacher`. The train and eval
code only calls ``signal``, ``diagnose``, ``covers``, ``check_data``, ``describe``, ``follow``,
``state_dict``, ``load_state_dict``, ``signal_and_states`` (hidden-state loss, ``has_states``) and
(speculative KD) ``corrector``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import torch

from distill import sharding
from distill.config import (
    HiddenLossConfig,
    MixtureTeacherSpec,
    ModelSpec,
    PeersTeacherSpec,
    SelfTeacherSpec,
    ServerTeacherSpec,
    StudentBaseTeacherSpec,
    TeacherCacheSpec,
)
from distill.losses import HiddenStateLoss, LossSpec, uniform_layer_map
from distill.models import check_tokenizers_agree, load_model, load_tokenizer, resolve_vocab
from distill.teachers.cached import CachedTeacher
from distill.teachers.live import LiveTeacher
from distill.teachers.mixture import MixtureTeacher
from distill.teachers.peers import PeersTeacher
from distill.teachers.self_distill import SelfTeacher
from distill.teachers.server import ServerTeacher
from distill.teachers.student_base import StudentBaseTeacher

logger = logging.getLogger("distill")

__all__ = ["CachedTeacher", "LiveTeacher", "MixtureTeacher", "PeersTeacher", "SelfTeacher", "ServerTeacher",
           "StudentBaseTeacher", "Teacher", "hidden_state_loss", "open_teacher"]


Teacher = (LiveTeacher | CachedTeacher | ServerTeacher | MixtureTeacher | SelfTeacher | PeersTeacher
           | StudentBaseTeacher)


def open_teacher(
    spec: ModelSpec | TeacherCacheSpec | ServerTeacherSpec | MixtureTeacherSpec | SelfTeacherSpec
    | StudentBaseTeacherSpec | None,
    *,
    tokenizer,
    student_ref: str,
    loss: LossSpec,
    seq_len: int,
    vocab_policy: str,
    device,
    student=None,
    field: str = "teacher",
    optimizer_for=None,
    max_grad_norm: float | None = None,
    chunk_size: int | None = None,
) -> Teacher | None:
    """The teacher a config describes, checked against this run (tokenizer, vocabulary, sequence length,
    temperature, divergence), on ``device``; None for ``teacher: null``. ``student``: the model being trained
    (the teacher of self-distillation is a copy of it; co-distillation's peers train beside it, each with
    ``optimizer_for(model) -> (optimizer, scheduler)``, ``max_grad_norm`` and the loss's ``chunk_size``)."""
    if spec is None:
        return None
    if isinstance(spec, PeersTeacherSpec):
        if student is None or optimizer_for is None:
            raise ValueError(f"{field}.peers: co-distillation trains its peers with the student (distill train)")
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise ValueError(f"{field}.peers: co-distillation runs in one process (the peers' gradients are not "
                             "averaged across processes); launch it without accelerate's --num_processes")
        models = []
        for i, peer in enumerate(spec.peers):
            where = f"{field}.peers[{i}]"
            peer_tok = load_tokenizer(peer, where)
            try:
                check_tokenizers_agree(tokenizer, peer_tok, student_ref, peer.tokenizer or peer.path)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
            model = load_model(peer, where, peer_tok)
            resolve_vocab(model, len(tokenizer), where, vocab_policy)
            models.append(model.to(device))
        return PeersTeacher(spec, student, models, len(tokenizer), loss, optimizer_for, max_grad_norm, chunk_size)
    if isinstance(spec, MixtureTeacherSpec):
        members, temps = [], []
        for i, (name, member) in enumerate(zip(spec.names(), spec.teachers, strict=True)):
            t = member.temperature if member.temperature is not None else loss.temperature
            where = f"teacher.teachers[{i}]"
            try:
                members.append(open_teacher(member, tokenizer=tokenizer, student_ref=student_ref,
                                            loss=replace(loss, temperature=t), seq_len=seq_len,
                                            vocab_policy=vocab_policy, device=device, field=where))
            except ValueError as exc:
                raise ValueError(f"{where} ({name}): {exc}") from None
            temps.append(t)
        return MixtureTeacher(spec, members, temps, loss)
    if isinstance(spec, SelfTeacherSpec):
        if student is None:
            raise ValueError(f"{field}.self: self-distillation needs the student being trained (distill train)")
        return SelfTeacher(spec, student, len(tokenizer), device)
    if isinstance(spec, StudentBaseTeacherSpec):
        if student is None or not hasattr(student, "disable_adapter"):
            raise ValueError(f"{field}.student_base: the teacher is the base model of a LoRA student being trained "
                             "(distill train with student.lora)")
        return StudentBaseTeacher(student, len(tokenizer))
    if isinstance(spec, TeacherCacheSpec):
        return CachedTeacher(spec, tokenizer, loss, seq_len, device)
    if isinstance(spec, ServerTeacherSpec):
        return ServerTeacher(spec, tokenizer, loss)
    teacher_tok = load_tokenizer(spec, field)
    check_tokenizers_agree(tokenizer, teacher_tok, student_ref, spec.tokenizer or spec.path)
    model = load_model(spec, field, teacher_tok)
    resolve_vocab(model, len(tokenizer), field, vocab_policy)
    model = model.to(device)
    if sharding.is_sharded():  # an FSDP run: the teacher is sharded too, never whole on one process
        model = sharding.shard_for_inference(model.requires_grad_(False))
    return LiveTeacher(model, len(tokenizer))


def hidden_state_loss(hidden: HiddenLossConfig, student, teacher, seed: int = 0) -> HiddenStateLoss:
    """The hidden-state loss term (docs/methods.md §12) between ``student`` and a teacher with hidden states,
    its layer map checked against both models and its projections (where the widths differ) initialized
    from ``seed``."""
    if teacher is None or not teacher.has_states:
        what = "no teacher" if teacher is None else f"a {teacher.kind} teacher, which has no hidden states"
        raise ValueError(f"loss.hidden needs the hidden states of a live teacher (teacher: {{path: ...}} or "
                         f"{{config: ...}} or self-distillation), but the run has {what}; set loss.hidden=null or "
                         "use a live teacher")
    s_layers, t_layers = student.config.num_hidden_layers, teacher.model.config.num_hidden_layers
    s_width, t_width = student.config.hidden_size, teacher.model.config.hidden_size
    pairs = uniform_layer_map(s_layers, t_layers) if hidden.layers == "uniform" else dict(hidden.layers)
    for s_i, t_i in pairs.items():
        for who, i, n in (("student", s_i, s_layers), ("teacher", t_i, t_layers)):
            if not 0 <= i <= n:
                raise ValueError(
                    f"loss.hidden.layers: {s_i}: {t_i} names {who} hidden state {i}, but the {who} has hidden states "
                    f"0..{n} (0 = the embeddings' output, {n} = the last layer's, after the final norm)")
    if hidden.projection == "none" and s_width != t_width:
        raise ValueError(f"loss.hidden.projection=none, but the student's hidden states have width {s_width} and the "
                         f"teacher's {t_width}; use projection: auto (a learned linear map) or a teacher of the "
                         "student's width")
    project = hidden.projection == "linear" or s_width != t_width
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = HiddenStateLoss(sorted(pairs.items()), s_width, t_width, distance=hidden.distance,
                                 weight=hidden.weight, final_weight=hidden.final_weight, project=project)
    if not math.isfinite(hidden.weight + hidden.final_weight) or hidden.weight + hidden.final_weight == 0:
        logger.warning("loss.hidden: weight and final_weight are both 0; the term is computed but adds nothing")
    return module
