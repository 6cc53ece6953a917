"""Teachers: the one place in distill with several implementations.

A teacher is opened once from its config by :func:`open_teacher` (the only branch on the config's kind),
checks there that it fits the run, and then, for any batch, returns its **signal** for the batch's
next-token positions (``labels[:, 1:]``, flattened to ``B * (T - 1)`` rows). Every kind follows one protocol
(:mod:`distill.teachers.base`: a small core, and optional capabilities that are None where a kind has not got
them); the model behind a teacher is an engine (:mod:`distill.engines`), in this process or behind a server:

* a live model (``teacher: {path: DIR}`` or ``{config: ...}``) and a server (``teacher: {server: URL}``) are
  each a teacher over one engine (:class:`~distill.teachers.engine.EngineTeacher`). Live: dense signal, its
  final hidden states and output layer (:class:`distill.losses.chunked.DenseSignal`; the loss forms the logits
  a chunk of rows at a time). Server: sparse signal, scored on token ids: its top-k and the realized token at
  the loss temperature, and the tail mass.
* :class:`~distill.teachers.crosstok.CrossTokTeacher` (a live or served teacher with ``loss.crosstok``): a teacher with a
  tokenizer of its own, scoring its tokenization of each batch; its signal
  (:class:`distill.losses.CrossTokSignal`) is compared with the student's over byte-aligned groups
  (docs/methods.md §14). Evaluation measures no distance to it (it covers no eval split).
* :class:`~distill.teachers.cached.CachedTeacher` (``teacher: {cache: DIR}``): targets captured by
  ``distill cache``. Sparse signal: ids + probabilities, with or without the tail mass
  (:class:`distill.losses.SparseTarget`).

Training and evaluation use the same object. What evaluation can say about the student's distance to the
teacher depends on the signal (``eval_estimates``):

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

* :class:`~distill.teachers.mixture.MixtureTeacher` (``teacher: {teachers: [...], mix: probability | loss}``):
  several teachers of any kind, each with a weight and its own temperature; its signal is a
  :class:`distill.losses.chunked.MixtureSignal`, which the chunked loss forms a chunk of rows of each member at
  a time.
* self-distillation (``teacher: {self: ema | snapshot}``): a live teacher over the moving average of the
  student's weights or a frozen copy taken every N steps; the copy is the training run's loop hook
  (:mod:`distill.training_hooks`), which follows the student and is kept in checkpoints.
* co-distillation (``teacher: {peers: [...]}``): the peers train beside the student in the training run's loop
  hook; :class:`~distill.teachers.peers.PeersTeacher` is what the student reads of them.
* a LoRA student's base (``teacher: {student_base: true}``): a live teacher over the student with its adapters
  switched off; it shares the student's weights (no extra memory).

Each kind is a module of this package; this one opens them. Adding a kind of teacher: a spec in ``config.py``
(a member of ``TeacherSpec``), a module here with a class that follows :class:`~distill.teachers.base.Teacher`
(or a teacher over an engine), and its branch in :func:`open_teacher`; a kind that changes the loop (trains
or follows something each step) adds a hook to :mod:`distill.training_hooks`.
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
from distill.engines import open_engine
from distill.losses import HiddenStateLoss, LossSpec, uniform_layer_map
from distill.models import check_tokenizers_agree, load_model, load_tokenizer, resolve_vocab
from distill.teachers.base import HiddenStates, Teacher
from distill.teachers.cached import CachedTeacher
from distill.teachers.crosstok import CrossTokTeacher, projection_dir
from distill.teachers.engine import EngineTeacher
from distill.teachers.mixture import MixtureTeacher
from distill.teachers.peers import PeersTeacher
from distill.teachers.self_distill import self_teacher
from distill.teachers.student_base import student_base_teacher
from distill.training_hooks import LoopHook, PeersHook

logger = logging.getLogger("distill")

__all__ = ["HiddenStates", "Teacher", "hidden_state_loss", "open_teacher"]


def open_teacher(
    spec: ModelSpec | TeacherCacheSpec | ServerTeacherSpec | MixtureTeacherSpec | SelfTeacherSpec
    | PeersTeacherSpec | StudentBaseTeacherSpec | None,
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
    model_step=None,
    crosstok: str | None = None,
    cache_dir: str | None = None,
) -> tuple[Teacher | None, LoopHook | None]:
    """The teacher a config describes, checked against this run (tokenizer, vocabulary, sequence length,
    temperature, divergence), on ``device``, and the loop hook it needs from the training run (None for a
    teacher that does not change the loop); (None, None) for ``teacher: null``. ``student``: the model being
    trained (self-distillation copies it; a LoRA student's base is it); co-distillation's peers train beside
    it, each with ``optimizer_for(model) -> (optimizer, scheduler)`` and the run's ``model_step``
    (:class:`distill.training_hooks.PeersHook`). ``crosstok``: ``loss.crosstok``, a live or served teacher then
    keeps its own tokenizer (:class:`~distill.teachers.crosstok.CrossTokTeacher`, W cached under ``cache_dir``'s
    ``crosstok/`` or ``$DISTILL_CACHE/crosstok``)."""
    if spec is None:
        return None, None
    if isinstance(spec, PeersTeacherSpec):
        hook = _peers(spec, tokenizer, student_ref, loss, vocab_policy, device, student, field, optimizer_for,
                      model_step)
        return PeersTeacher(spec, hook), hook
    if isinstance(spec, MixtureTeacherSpec):
        return _mixture(spec, tokenizer, student_ref, loss, seq_len, vocab_policy, device), None
    if isinstance(spec, SelfTeacherSpec):
        if student is None:
            raise ValueError(f"{field}.self: self-distillation needs the student being trained (distill train)")
        return self_teacher(spec, student, tokenizer, device)
    if isinstance(spec, StudentBaseTeacherSpec):
        if student is None or not hasattr(student, "disable_adapter"):
            raise ValueError(f"{field}.student_base: the teacher is the base model of a LoRA student being trained "
                             "(distill train with student.lora)")
        return student_base_teacher(student, tokenizer), None
    if isinstance(spec, TeacherCacheSpec):
        return CachedTeacher(spec, tokenizer, loss, seq_len, device), None
    # A live model or a server: one engine, on the student's tokenizer or (loss.crosstok) on its own.
    served = isinstance(spec, ServerTeacherSpec)
    if served and crosstok is None:
        teacher_tok = tokenizer  # the server's /tokenize is checked against the student's at start-up
    else:
        teacher_tok = load_tokenizer(spec, field)
        if crosstok is None:
            _same_tokenizer(tokenizer, teacher_tok, student_ref, spec.tokenizer or spec.path, field)
    engine = open_engine(spec, teacher_tok, field=field, vocab_policy=vocab_policy, device=device,
                         sharded=sharding.is_sharded(), temperature=loss.temperature)
    if crosstok is not None:  # it scores its own tokens of each batch's text
        return CrossTokTeacher(engine, tokenizer, teacher_tok, crosstok, projection_dir(cache_dir)), None
    return EngineTeacher(engine, "server" if served else "live"), None


def _same_tokenizer(tokenizer, teacher_tok, student_ref: str, teacher_ref: str, field: str) -> None:
    try:
        check_tokenizers_agree(tokenizer, teacher_tok, student_ref, teacher_ref)
    except ValueError as exc:
        if field != "teacher":
            raise
        raise ValueError(f"{exc} A live teacher with another tokenizer trains with distill train when "
                         "loss.crosstok is set (pkl, gold or uld; docs/cross_tokenizer.md); distill eval "
                         "measures no distance to such a teacher (leave its teacher out).") from None


def _mixture(spec: MixtureTeacherSpec, tokenizer, student_ref: str, loss: LossSpec, seq_len: int,
             vocab_policy: str, device) -> MixtureTeacher:
    members, temps = [], []
    for i, (name, member) in enumerate(zip(spec.names(), spec.teachers, strict=True)):
        t = member.temperature if member.temperature is not None else loss.temperature
        where = f"teacher.teachers[{i}]"
        try:
            opened, _ = open_teacher(member, tokenizer=tokenizer, student_ref=student_ref,
                                     loss=replace(loss, temperature=t), seq_len=seq_len, vocab_policy=vocab_policy,
                                     device=device, field=where)
        except ValueError as exc:
            raise ValueError(f"{where} ({name}): {exc}") from None
        members.append(opened)
        temps.append(t)
    return MixtureTeacher(spec, members, temps, loss)


def _peers(spec: PeersTeacherSpec, tokenizer, student_ref: str, loss: LossSpec, vocab_policy: str, device, student,
           field: str, optimizer_for, model_step) -> PeersHook:
    if student is None or optimizer_for is None or model_step is None:
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
    return PeersHook(student, models, len(tokenizer), temperature=loss.temperature, burn_in=spec.burn_in,
                     optimizer_for=optimizer_for, model_step=model_step)


def hidden_state_loss(hidden: HiddenLossConfig, student, teacher, seed: int = 0) -> HiddenStateLoss:
    """The hidden-state loss term (docs/methods.md §12) between ``student`` and a teacher with hidden states,
    its layer map checked against both models and its projections (where the widths differ) initialized
    from ``seed``."""
    if teacher is None or teacher.states is None:
        what = "no teacher" if teacher is None else f"a {teacher.kind} teacher, which has no hidden states"
        raise ValueError(f"loss.hidden needs the hidden states of a live teacher (teacher: {{path: ...}} or "
                         f"{{config: ...}} or self-distillation), but the run has {what}; set loss.hidden=null or "
                         "use a live teacher")
    s_layers, t_layers = student.config.num_hidden_layers, teacher.states.layers
    s_width, t_width = student.config.hidden_size, teacher.states.width
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
