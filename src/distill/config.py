"""Typed configs: YAML file < ``key=value`` overrides, validated once with every problem listed.

Each command owns a pydantic model; the sections shared between commands (data, models, optimizer...)
live here. Unknown keys are errors (``extra="forbid"``), so a typo never silently falls back to a
default.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from transformers import AutoConfig
from transformers.activations import ACT2FN
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from distill.checkpoint import atomic_write_text
from distill.errors import ConfigError
from distill.losses import DIVERGENCES, CrossTokMethod, LossSpec, Objective

# File extension -> the `datasets` builder that reads it (data.source may be such a file).
DATA_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


def looks_local(ref: str) -> bool:
    """Whether a model, tokenizer or data reference is meant as a local path rather than a hub id.

    A hub id is ``name`` or ``owner/name``; a reference that is absolute, starts with ``.`` or ``~``, has
    more than one ``/``, uses the OS's own separator, or ends in a data-file extension is a path (which
    then must exist: the error says so instead of a failed hub download).
    """
    return (
        os.path.isabs(ref)
        or ref.startswith((".", "~"))
        or Path(ref).suffix.lower() in DATA_BUILDERS
        or ref.count("/") > 1
        or (os.sep != "/" and os.sep in ref)
    )


# A hub id is `name` or `owner/name`: letters, digits, `-`, `_`, `.` (not first or last, no `--` or `..`), at
# most 96 characters a part (the hub's own rule); it also holds a letter, so `0` or `1.5` is never taken for one.
_HUB_PART = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?$")


def looks_like_hub_id(ref: str) -> bool:
    """Whether ``ref`` can be a Hugging Face hub id (``name`` or ``owner/name``)."""
    parts = ref.split("/")
    return (len(parts) <= 2 and all(_HUB_PART.match(part) for part in parts)
            and any(ch.isalpha() for ch in ref))


def check_reference(ref: str, what: str) -> str:
    """A model, tokenizer or data reference that is an existing path, meant as a path (checked where it is
    read), or a plausible hub id; anything else (``0``, empty, spaces) is refused here, before any download
    is tried."""
    if not ref.strip():
        raise ValueError(f"is empty: give {what}")
    if looks_local(ref) or looks_like_hub_id(ref):
        return ref
    try:
        if Path(ref).expanduser().exists():
            return ref
    except OSError:  # e.g. a name too long for the file system
        pass
    raise ValueError(f"{ref!r} is neither an existing path nor a hub id (`name` or `owner/name`): give {what}")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


DATA_SOURCE = "a data file (.jsonl/.json/.parquet/.txt/.csv), a directory of such files, or a hub dataset id"


class DataConfig(Section):
    """Where the text comes from and how it becomes ``{input_ids, labels}`` blocks."""

    source: str = Field(description="local file (.jsonl/.json/.parquet/.txt/.csv), local directory, or hub dataset id")
    split: str = "train"
    format: Literal["auto", "text", "prompt_response", "messages"] = "auto"
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    seq_len: int = Field(512, gt=1)
    packing: bool = True
    truncate: bool = False
    eval_source: str | None = None
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    max_examples: int | None = Field(None, gt=0)
    max_eval_examples: int | None = Field(None, gt=0)
    seed: int = 0
    num_proc: int | None = Field(None, gt=0)

    @field_validator("source", "eval_source")
    @classmethod
    def _a_source(cls, ref: str | None) -> str | None:
        return None if ref is None else check_reference(ref, DATA_SOURCE)


class LoraConfig(Section):
    """LoRA adapters on the student (``pip install 'distill[lora]'``, the ``peft`` library): only the adapters
    train; the run also writes the student with the adapters merged into an ordinary HF checkpoint."""

    r: int = Field(8, gt=0, description="adapter rank")
    alpha: float = Field(16.0, gt=0, description="scale: the update is (alpha / r) * B @ A")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapters' input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names (suffixes, e.g. [q_proj, v_proj]) that get adapters; all-linear: "
        "every linear layer but the output layer")


# Sizes a model config holds as integers >= 1 (each where the architecture has it); the optional ones may be
# null (derived from the others).
MODEL_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings")
_DERIVED_SIZES = ("num_key_value_heads", "head_dim", "intermediate_size")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    return False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _transformers_refusal(exc: Exception, config: dict[str, Any]) -> tuple[str, str]:
    """(key, problem) from an exception transformers raised while building a config."""
    cause = exc.__cause__ or exc
    text = " ".join(str(cause).split())
    match = re.match(r"Validation error for field '([^']+)'", str(exc))
    if match:  # huggingface_hub's strict dataclasses: one field's type or range
        key = match.group(1)
        value = config.get(key)
        hint = ""
        if isinstance(value, str) and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", value):
            hint = " (YAML reads a number like 1e-5 as text: write 1.0e-5)"
        elif _is_int(value) and "expected float" in text:
            hint = f" (write {float(value)!r})"
        return key, f"refused by transformers: {text}{hint}"
    # A check across fields ("The hidden size (30) is not a multiple of ..."): the first key it names.
    named = [key for key in config if key.replace("_", " ") in text.lower()]
    return (named[0] if named else ""), f"refused by transformers: {text}"


def model_config_problems(config: dict[str, Any]) -> list[tuple[str, str]]:
    """Every ``(key, problem)`` of a model's ``config:`` section that would stop the model from being built or
    run: an unknown ``model_type``, sizes that are not integers >= 1, heads that divide neither the width nor
    into KV groups, NaN/inf, whatever transformers itself refuses. Empty when the config is fine. Builds only
    the transformers config object (no weights)."""
    problems: list[tuple[str, str]] = []
    model_type = config.get("model_type")
    known = list(CONFIG_MAPPING.keys())
    if model_type is None:
        problems.append(("model_type", "missing: name the architecture (e.g. llama, qwen2, qwen3, gemma2)"))
    elif not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), known, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "e.g. llama, qwen2, qwen3, gemma2"
        problems.append(("model_type", f"{model_type!r} is not a model type transformers knows ({hint})"))
    for key, value in config.items():
        if key in MODEL_SIZES:
            if value is None and key in _DERIVED_SIZES:
                continue
            if not _is_int(value):
                problems.append((key, f"{value!r} is not a size: give an integer >= 1"))
            elif value < 1:
                problems.append((key, f"{value} is not a size: give an integer >= 1"))
        elif _non_finite(value):
            problems.append((key, f"{value!r} is or holds a non-finite number (nan/inf)"))
        elif key in _TOKEN_IDS and value is not None:
            ids = value if isinstance(value, list) else [value]
            if not ids or not all(_is_int(i) and i >= 0 for i in ids):
                problems.append((key, f"{value!r} is not a token id (an integer >= 0, or a list of them)"))
        elif (key.endswith("dropout") or key.endswith("pdrop")) and isinstance(value, (int, float)) \
                and not isinstance(value, bool) and not 0 <= value <= 1:
            problems.append((key, f"{value} is not a dropout probability (between 0 and 1)"))
        elif (key.endswith("_eps") or key.endswith("epsilon")) and isinstance(value, (int, float)) \
                and not isinstance(value, bool) and value < 0:
            problems.append((key, f"{value} is negative: a norm's epsilon is >= 0"))
    vocab = config.get("vocab_size")
    for key in _TOKEN_IDS:
        ids = config.get(key)
        ids = ids if isinstance(ids, list) else [ids]
        if _is_int(vocab) and not problems and any(i is not None and i >= vocab for i in ids):
            problems.append((key, f"{config[key]} is outside the vocabulary (vocab_size={vocab})"))
    if problems:
        return problems

    try:
        built = AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"})
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises, the config is what it refused
        return [_transformers_refusal(exc, config)]
    sizes = {key: getattr(built, key, None) for key in MODEL_SIZES}
    for key, value in sizes.items():
        if value is not None and (not _is_int(value) or value < 1):
            problems.append((key, f"{value!r} (the model type's default or derived value) is not a size >= 1"))
    if problems:
        return problems
    hidden, heads, kv = sizes["hidden_size"], sizes["num_attention_heads"], sizes["num_key_value_heads"]
    if heads is not None and kv is not None and heads % kv:
        problems.append(("num_key_value_heads", f"{kv} does not divide num_attention_heads={heads} (every KV head "
                         "serves the same number of query heads)"))
    head_dim = sizes["head_dim"]
    if head_dim is None and hidden is not None and heads is not None:
        if hidden % heads:
            problems.append(("num_attention_heads", f"{heads} does not divide hidden_size={hidden} (give head_dim, "
                             "or a width that is a multiple of the heads)"))
        head_dim = hidden // heads
    rotary = getattr(built, "rope_parameters", None) is not None or getattr(built, "rope_theta", None) is not None
    if rotary and head_dim is not None and head_dim % 2:
        key = "head_dim" if "head_dim" in config else "num_attention_heads"
        problems.append((key, f"the head width is {head_dim}, odd: rotary position embeddings rotate pairs of "
                         "channels (give an even head_dim, or hidden_size / num_attention_heads even)"))
    for key in ("hidden_act", "hidden_activation"):
        act = getattr(built, key, None)
        if isinstance(act, str) and act not in ACT2FN:
            close = difflib.get_close_matches(act, list(ACT2FN.keys()), n=3)
            problems.append((key, f"{act!r} is not an activation transformers knows (e.g. {', '.join(close or ['silu', 'gelu'])})"))
    return problems


class ModelSpec(Section):
    """A model: ``path`` (local HF directory or hub id) or ``config`` (random init from a config dict)."""

    path: str | None = None
    config: dict[str, Any] | None = None
    tokenizer: str | None = Field(
        None, description="tokenizer directory or hub id; 'byte' for the built-in byte-level tokenizer"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0
    lora: LoraConfig | None = Field(None, description="student only: train LoRA adapters instead of every weight")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of `path` (HF directory or hub id) or `config` (random init)")
        if self.path is None and self.tokenizer is None:
            raise ValueError("a model built from `config` needs `tokenizer` (a directory, hub id, or 'byte')")
        return self

    @field_validator("path", "tokenizer")
    @classmethod
    def _a_reference(cls, ref: str | None, info) -> str | None:
        want = "a Hugging Face model directory or hub id" if info.field_name == "path" else \
            "a tokenizer directory, hub id, or 'byte'"
        return None if ref is None else check_reference(ref, want)

    @model_validator(mode="after")
    def _config_builds(self) -> ModelSpec:
        """Every problem of ``config`` now, named by its key, rather than an exception when the model is built."""
        if self.config is not None:
            problems = model_config_problems(self.config)
            if problems:
                raise PydanticCustomError(
                    "model_config", "{message}",
                    {"message": "; ".join(f"config.{k}: {m}" if k else f"config: {m}" for k, m in problems),
                     "problems": problems},
                )
        return self


def _set_dotted(tree: dict, dotted: str, value: Any, origin: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: cannot set `{dotted}`: `{key}` is {child!r}, not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["optim.lr=1e-3", "teacher=null"]`` -> nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override `{item}` is not of the form key=value (e.g. optim.lr=3e-4)")
        key, raw = item.split("=", 1)
        if not key:
            raise ConfigError(f"override `{item}` has an empty key")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else "", origin=f"override `{item}`")
    return tree


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# The tags of the teacher kinds: pydantic puts the chosen one in an error's location, which the config has no key for.
_TEACHER_TAGS = {"live", "cache", "server", "teachers", "self", "peers", "student_base"}


def _where(loc: tuple) -> str:
    """An error's location as the dotted key the user wrote (``teacher.config``, not ``teacher.model.config``)."""
    parts = []
    for i, part in enumerate(loc):
        after_teacher = i > 0 and loc[i - 1] == "teacher"
        after_member = i > 1 and isinstance(loc[i - 1], int) and loc[i - 2] == "teachers"
        if part in _TEACHER_TAGS and (after_teacher or after_member):
            continue
        if i > 1 and loc[i - 2:i] == ("train", "batches") and part in (*BATCH_SETTINGS, "other"):
            continue  # the batch source's tag
        parts.append(str(part))
    return ".".join(parts)


def format_validation_error(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        where = _where(e["loc"]) or "(top level)"
        if e["type"] == "model_config":  # one line per key of a model's config section
            for key, problem in e["ctx"]["problems"]:
                lines.append(f"  - {where}.config{'.' + key if key else ''}: {problem}")
            continue
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `distill <command> --help` lists the sections)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and not isinstance(e["input"], dict) and repr(e["input"]) not in msg:
                msg += f" (got {e['input']!r})"
        lines.append(f"  - {where}: {msg}")
    return "\n".join([f"{origin}: {len(lines)} problem(s) in the config:", *lines])


def load_config(model: type[BaseModel], source: str | Path | dict | BaseModel | None,
                overrides: list[str] | None = None, settings: dict | None = None):
    """Defaults < ``source`` < ``key=value`` overrides < ``settings``, validated by ``model``; raises ConfigError.

    ``source`` is a YAML file's path, the tree such a file holds (a dict), a config already built, or None (the
    defaults). ``settings`` are keyword settings of the Python API: a key is a section or a dotted key
    (``{"loss.temperature": 2}``), a dict value is merged into the section it names (``{"loss": {"alpha": 0.5}}``).
    """
    tree, origin = _source_tree(source)
    if overrides:
        # Applied in order onto the file's tree, so `teacher=null teacher.cache=DIR` replaces the section, and
        # `train.batches=skd train.batches.skd_top_k=5` gives the source named first a key.
        for item in overrides:
            tree = _merge(_batches_named(tree), parse_overrides([item]))
        origin += " + overrides"
    for key, value in (settings or {}).items():
        nested: dict = {}
        _set_dotted(nested, key, value, origin=f"setting `{key}`")
        tree = _merge(_batches_named(tree), nested)
    if settings:
        origin += " + settings"
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, origin)) from None


def _source_tree(source: str | Path | dict | BaseModel | None) -> tuple[dict, str]:
    """The tree of settings ``source`` holds, and how an error names it."""
    if source is None:
        return {}, "config"
    if isinstance(source, BaseModel):
        return source.model_dump(mode="json"), "config"
    if isinstance(source, dict):
        return copy.deepcopy(source), "config"
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
    return loaded, str(path)


def _batches_named(tree: dict) -> dict:
    """``train.batches: NAME`` (a batch source written as its name) as its section ``{source: NAME}``."""
    train = tree.get("train")
    if isinstance(train, dict) and isinstance(train.get("batches"), str):
        return {**tree, "train": {**train, "batches": {"source": train["batches"]}}}
    return tree


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically), loadable by ``load_config``."""
    atomic_write_text(Path(path), yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


class HiddenLossConfig(Section):
    """A loss term on the models' hidden states (docs/methods.md §12), beside the logit loss; live teachers only.

    ``weight * mean over mapped layers of d(P_l h_s[l], h_t[map(l)])`` plus ``final_weight * (1 - cos)`` of the
    final output states, per supervised position; ``P_l`` a learned linear map where the widths differ.
    Hidden state 0 is the embeddings' output, state i the output of layer i (the last one after the final
    norm)."""

    weight: float = Field(1.0, ge=0, description="weight of the intermediate-layer term")
    distance: Literal["cosine", "mse"] = Field("cosine", description="cosine: 1 - cos; mse: mean squared error")
    layers: dict[int, int] | Literal["uniform"] = Field(
        "uniform", description="student hidden state -> teacher hidden state; uniform: student layer i of L_s "
        "-> teacher layer round(i * L_t / L_s) for the intermediate layers 1 .. L_s - 1")
    projection: Literal["auto", "linear", "none"] = Field(
        "auto", description="auto: a learned linear map where the widths differ; linear: always; none: never")
    final_weight: float = Field(0.0, ge=0, description="weight of 1 - cos of the final output states (DistilBERT)")


class LossConfig(Section):
    """``alpha * CE + (1 - alpha) * s * D(p_T, q_T)`` with ``s = T^2`` when ``t2_scale`` (docs/methods.md §1)."""

    divergence: Objective = "forward_kl"
    temperature: float = Field(1.0, gt=0)
    t2_scale: bool = True
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    beta: float = Field(0.5, ge=0.0, le=1.0, description="JSD interpolation: 0 = forward KL, 1 = reverse KL")
    skew: float = Field(0.1, ge=0.0, lt=1.0, description="skew KL / skew reverse KL mixing weight")
    baseline: Literal["running", "none"] = Field(
        "running", description="sampled_reverse_kl on the student's own samples: subtract from each token's "
        "f a running mean of f over earlier steps (unbiased, lower variance; docs/methods.md §8); none: plain f")
    baseline_decay: float = Field(0.9, ge=0.0, lt=1.0, description="sampled_reverse_kl: the running mean's "
                                  "decay per on-policy step (0 = the previous step's mean alone)")
    chunked: bool = Field(True, description="memory-efficient loss that never materializes (tokens, V) logits")
    chunk_size: int | None = Field(None, gt=0, description="tokens per chunk; default: chosen from a memory budget")
    vocab_policy: Literal["truncate", "error"] = "truncate"
    hidden: HiddenLossConfig | None = Field(None, description="hidden-state (representation) distillation term")
    crosstok: CrossTokMethod | None = Field(
        None, description="a live or served teacher with another tokenizer: compare the two over groups of tokens aligned at "
        "shared byte boundaries, pkl (projection KL through W), gold (exact matches + sorted L1) or uld (sorted L1); "
        "null: the teacher must share the student's tokenizer (docs/cross_tokenizer.md)")

    def spec(self, baseline: float = 0.0):
        """The loss itself as a :class:`distill.losses.LossSpec` (what the losses and the chunked path take);
        ``baseline``: the value of sampled_reverse_kl's baseline for this step (the training run's running
        mean)."""
        return LossSpec(divergence=self.divergence, temperature=self.temperature, alpha=self.alpha,
                        t2_scale=self.t2_scale, beta=self.beta, skew=self.skew, baseline=baseline)

    def describe(self) -> str:
        """The whole loss in one line (the start-up log): the logit loss, then the hidden-state term if any."""
        text = self.spec().describe()
        if self.divergence == "sampled_reverse_kl":
            text += (f", baseline: running mean of f (decay {self.baseline_decay:g})" if self.baseline == "running"
                     else ", baseline: none")
        if self.crosstok is not None:
            text += f", cross-tokenizer: {self.crosstok} over byte-aligned groups"
        h = self.hidden
        if h is not None:
            layers = h.layers if h.layers == "uniform" else ", ".join(f"{s}->{t}" for s, t in sorted(h.layers.items()))
            text += f" + {h.weight:g}*hidden_{h.distance}(layers: {layers}; projection: {h.projection})"
            if h.final_weight:
                text += f" + {h.final_weight:g}*(1 - cos of the final states)"
        return text


class OptimConfig(Section):
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="cosine decays to lr * min_lr_ratio")
    max_grad_norm: float | None = Field(1.0, gt=0)


# ------------------------------------------------------------------------------------------------ batch sources
# Where a step's micro-batches come from (`train.batches`): a source's name, or its section `{source: NAME, ...}`.
# Each source with settings has its section here (a member of `BatchesSpec`, tagged by its name); the source
# itself is a module of `distill/sources/`, found by name in its `SOURCES`.


class DatasetBatches(Section):
    """``dataset``: the data section's examples; a step's rows are a function of (seed, step)."""

    source: Literal["dataset"] = Field("dataset", description="the batch source")


class SamplerSpec(Section):
    """``train.batches.sampler``: the student samples on a server (``distill serve``, SGLang) instead of in the
    training process. Every ``sync_every`` optimizer steps (and before the first sample) the run writes the
    student's weights under ``out_dir/sampler/`` and asks the server to load them (SGLang's
    ``/update_weights_from_disk``); docs/onpolicy.md."""

    server: str = Field(description="base URL of the server running the student, e.g. http://127.0.0.1:8001")
    publish: Literal["weights", "lora_adapter"] = Field(
        "weights", description="weights: the whole student through SGLang's /update_weights_from_disk (distill serve, "
        "SGLang); lora_adapter: a LoRA student's adapters alone through vLLM's /v1/load_lora_adapter (vLLM started "
        "with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, distill serve), sampled as `model`")
    sync_every: int = Field(1, gt=0, description="optimizer steps between two publications of the student's weights")
    model: str | None = Field(None, description="the model name requests carry (default: the server's only one; "
                              "with publish: lora_adapter, the adapter's name, default `student`)")
    api_key_env: str | None = Field(None, description="environment variable holding the server's API key")
    max_in_flight: int = Field(8, gt=0, description="concurrent sampling requests")
    timeout: float = Field(120.0, gt=0, description="seconds per request (a weight update included)")
    retries: int = Field(5, ge=0, description="retries (exponential backoff) on timeouts, refused connections, 5xx")


class OnPolicyBatches(Section):
    """What the on-policy sources share: the student writes the completions of the step's examples' prompts
    with its current weights, and the teacher scores every token of them."""

    source: str = Field(description="the batch source")
    temperature: float = Field(1.0, ge=0.0, description="the student's sampling temperature (0 = greedy)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="the student's nucleus (1 = its whole distribution)")
    max_new_tokens: int = Field(128, gt=0, description="the longest completion the student writes")
    sampler: SamplerSpec | None = Field(
        None, description="sample the student on a server ({server: URL, sync_every: N}); absent: in this process"
    )


class GkdBatches(OnPolicyBatches):
    """``gkd`` (generalized KD): a step trains on the student's samples with probability ``student_fraction``,
    else on the dataset's completions."""

    source: Literal["gkd"] = Field("gkd", description="the batch source")
    student_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="the probability (lambda) that a step's completions are the student's"
    )


class SkdBatches(OnPolicyBatches):
    """``skd`` (speculative KD): the student proposes each token, the teacher replaces those outside its top-K."""

    source: Literal["skd"] = Field("skd", description="the batch source")
    skd_top_k: int = Field(25, ge=1, description="a student token outside the teacher's top-K is replaced")
    skd_top_k_final: int | None = Field(
        None, ge=1, description="K moves linearly from skd_top_k to this over training (default: constant)"
    )
    skd_teacher_temperature: float | None = Field(
        None, ge=0.0, description="the temperature of the teacher's replacement samples (default: the loss's; 0 = argmax)"
    )

    @model_validator(mode="after")
    def _no_sampler(self) -> SkdBatches:
        if self.sampler is not None:
            raise ValueError("train.batches.sampler: skd's student proposes each token against the teacher's "
                             "corrections in this process, which a sampling server cannot do; remove "
                             "train.batches.sampler (or use gkd / distillm)")
        return self


class DistillmBatches(OnPolicyBatches):
    """``distillm`` (DistiLLM's adaptive off-policy schedule): the student's samples, a replay buffer of them, or
    the dataset's completions, by a threshold that grows when the eval loss rises."""

    source: Literal["distillm"] = Field("distillm", description="the batch source")
    replay_capacity: int = Field(1000, gt=0, description="student sequences kept for reuse (per process)")
    adaptive_init: float = Field(0.0, ge=0.0, le=1.0, description="the initial threshold phi")
    adaptive_step: float = Field(0.1, gt=0.0, le=1.0, description="phi grows by this when the eval loss rises")
    adaptive_loss_eps: float = Field(0.1, ge=0.0, description="a rise of at least this in eval loss")


class OtherBatches(Section):
    """A source without settings of its own: any other name in ``distill/sources``' ``SOURCES`` (the training
    run refuses a name that is not there)."""

    source: str = Field(description="the batch source")


BATCH_SETTINGS: dict[str, type[Section]] = {
    "dataset": DatasetBatches, "gkd": GkdBatches, "skd": SkdBatches, "distillm": DistillmBatches,
}


def _batches_kind(value: Any) -> str | None:
    source = value.get("source") if isinstance(value, dict) else getattr(value, "source", None)
    if not isinstance(source, str):
        return None
    return source if source in BATCH_SETTINGS else "other"


BatchesSpec = Annotated[
    Annotated[DatasetBatches, Tag("dataset")] | Annotated[GkdBatches, Tag("gkd")] | Annotated[SkdBatches, Tag("skd")]
    | Annotated[DistillmBatches, Tag("distillm")] | Annotated[OtherBatches, Tag("other")],
    Discriminator(_batches_kind, custom_error_type="batches_source", custom_error_message=(
        "name the source: train.batches: NAME, or train.batches: {source: NAME, ...its settings}")),
]


def _onpolicy_moved(data: dict) -> str:
    """What to write instead of the ``onpolicy`` section, whose keys are now the on-policy sources' own."""
    old = data["onpolicy"] if isinstance(data["onpolicy"], dict) else {}
    train = data.get("train") if isinstance(data.get("train"), dict) else {}
    batches = train.get("batches", "dataset")
    name = batches.get("source") if isinstance(batches, dict) else batches
    spec = BATCH_SETTINGS.get(name) if isinstance(name, str) else None
    if spec is None or not issubclass(spec, OnPolicyBatches):
        return (f"the `onpolicy` section is gone and train.batches={name} has no on-policy settings: remove it (an "
                "on-policy source takes its settings in train.batches, e.g. train.batches: {source: gkd, "
                "student_fraction: 0.5})")
    keep = {"source": name, **{k: v for k, v in old.items() if k in spec.model_fields}}
    dropped = [k for k in old if k not in spec.model_fields]
    section = ", ".join(f"{k}: {_scalar(v)}" for k, v in keep.items())
    overrides = " ".join(f"train.batches.{k}={_scalar(v)}" for k, v in keep.items())
    return (f"the `onpolicy` section is now part of train.batches: write train.batches: {{{section}}} (or "
            f"{overrides}) and remove `onpolicy`"
            + (f"; drop {', '.join(dropped)} (not settings of {name})" if dropped else ""))


def _scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n").removesuffix("\n...")


class TrainLoopConfig(Section):
    """The ``train`` section: where a step's micro-batches come from, how many steps, the batch per process,
    gradient accumulation, precision and the seed of the data order."""

    batches: BatchesSpec = Field(
        default_factory=DatasetBatches, description="where a step's micro-batches come from: a source's name "
        "(dataset = the data section's examples; gkd / skd / distillm = completions the student writes for the "
        "examples' prompts) or its section {source: NAME, ...its settings}"
    )
    max_steps: int = Field(100, gt=0)
    batch_size: int = Field(8, gt=0, description="examples per micro-batch per process")
    grad_accum: int = Field(1, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0

    @field_validator("batches", mode="before")
    @classmethod
    def _a_name(cls, value: Any) -> Any:
        return {"source": value} if isinstance(value, str) else value


class EvalConfig(Section):
    every: int = Field(0, ge=0, description="evaluate every N steps (0: only at the end)")
    batch_size: int = Field(8, gt=0)
    max_batches: int | None = Field(
        None, gt=0, description="evaluate this many batches, evenly spread over the eval split (default: all)"
    )


class CheckpointConfig(Section):
    every: int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end)")
    keep_last: int = Field(2, gt=0)


class LogConfig(Section):
    every: int = Field(10, gt=0)
    tensorboard: bool = False
    progress: bool = True


# ------------------------------------------------------------------------------------------------ teachers
# A teacher is one of these specs; `distill.teachers.open_teacher` is the one place that branches on which.
# A new kind of teacher adds a spec here (and a tag in `_teacher_kind`) and a module in teachers/.


class TeacherCacheSpec(Section):
    """A teacher given by its offline targets (``distill cache``) instead of a live model."""

    cache: str = Field(description="the out_dir of `distill cache`")
    topk_tail: bool = Field(True, description="top-k caches: keep the tail mass as a class (false: renormalize)")


class ServerTeacherSpec(Section):
    """A teacher behind an HTTP server (``distill serve``, vLLM, SGLang): scored on token ids through its
    prompt log-probabilities (top-k + the realized token + the tail mass; ``top_k: all``, the whole vocabulary
    and no tail), or (``signal: hidden``, ``distill serve`` only) through its final hidden states and its
    output layer, downloaded once: the dense signal of a teacher in this process."""

    server: str = Field(description="base URL, e.g. http://127.0.0.1:8000")
    model: str | None = Field(None, description="the model name the server serves (default: the server's only one)")
    tokenizer: str | None = Field(
        None, description="a local copy of the server's tokenizer (directory, hub id, 'byte'): distill cache needs "
        "it; distill generate sends token ids with it and text without"
    )
    api: Literal["auto", "vllm", "sglang"] = Field(
        "auto", description="vllm: /v1/completions with prompt_logprobs (also distill serve); sglang: /generate"
    )
    top_k: Annotated[int, Field(gt=0)] | Literal["all"] = Field(
        20, description="log-probs per position (servers cap it: vLLM's --max-logprobs); all: the whole vocabulary "
        "(prompt_logprobs: -1; the server needs --max-logprobs -1), no tail"
    )
    signal: Literal["logprobs", "hidden"] = Field(
        "logprobs", description="logprobs: the server's prompt log-probs (top_k); hidden: its final hidden states "
        "(distill serve's return_hidden_states) and its output layer (GET /v1/output_head, once), the exact dense "
        "signal"
    )
    realized_token: bool = Field(
        True, description="keep the sequence's own token as a class when it is outside the top-k (false: top-k + tail)"
    )
    api_key_env: str | None = Field(None, description="environment variable holding the API key")

    @field_validator("tokenizer")
    @classmethod
    def _a_tokenizer(cls, ref: str | None) -> str | None:
        return None if ref is None else check_reference(ref, "a tokenizer directory, hub id, or 'byte'")

    @field_validator("top_k", mode="before")
    @classmethod
    def _a_count_or_all(cls, value: Any) -> Any:
        if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return value
        raise ValueError(f"top_k={value!r}: give a count > 0 of log-probs per position, or all for the whole "
                         "vocabulary (what a server sends as prompt_logprobs: -1)")

    @model_validator(mode="after")
    def _hidden_through_completions(self) -> ServerTeacherSpec:
        if self.signal == "hidden" and self.api == "sglang":
            raise ValueError("signal: hidden reads distill serve's /v1/completions (return_hidden_states); set "
                             "api: auto or vllm, or signal: logprobs for SGLang's /generate")
        return self

    max_in_flight: int = Field(8, gt=0, description="concurrent requests")
    timeout: float = Field(60.0, gt=0, description="seconds per request")
    retries: int = Field(5, ge=0, description="retries (exponential backoff) on timeouts, refused connections, 5xx")
    check_tokenizer: bool = Field(True, description="compare the server's /tokenize with the student's tokenizer")
    determinism_tolerance: float = Field(
        1e-3, ge=0, description="refuse a server whose two scorings of one sequence differ by more (nats)"
    )


class MemberFields(Section):
    """What a teacher of a mixture adds to its own spec (``teacher.teachers``)."""

    name: str | None = Field(None, description="the name its KL is logged under (default: teacher<i>)")
    weight: float = Field(1.0, description="its share of the mixture (weights are normalized to sum to 1)")
    temperature: float | None = Field(None, gt=0, description="its own temperature (default: loss.temperature)")


class ModelMember(ModelSpec, MemberFields):
    """A live model in a mixture."""


class CacheMember(TeacherCacheSpec, MemberFields):
    """A cache of teacher targets in a mixture."""


class ServerMember(ServerTeacherSpec, MemberFields):
    """A teacher server in a mixture."""


class MixtureTeacherSpec(Section):
    """Several teachers at once (docs/methods.md §9): the student matches the weighted mixture of their
    distributions (``mix: probability``) or the weighted sum of its divergences to each (``mix: loss``)."""

    teachers: list[Annotated[
        Annotated[ModelMember, Tag("live")] | Annotated[CacheMember, Tag("cache")]
        | Annotated[ServerMember, Tag("server")], Discriminator(lambda v: _teacher_kind(v))]] = Field(
        description="the teachers, each a live model, a cache or a server, with weight, temperature and name")
    mix: Literal["probability", "loss"] = Field(
        "probability", description="probability: D(sum_k w_k p_k || q); loss: sum_k w_k D(p_k || q)")

    @model_validator(mode="after")
    def _weights(self) -> MixtureTeacherSpec:
        if not self.teachers:
            raise ValueError("teacher.teachers: give at least one teacher")
        for i, member in enumerate(self.teachers):
            if not member.weight >= 0 or member.weight == float("inf"):
                raise ValueError(f"teacher.teachers[{i}].weight={member.weight:g}: weights must be finite and >= 0")
        if sum(m.weight for m in self.teachers) <= 0:
            raise ValueError("teacher.teachers: the weights sum to 0; give at least one teacher a positive weight")
        names = self.names()
        if len(set(names)) != len(names):
            raise ValueError(f"teacher.teachers: names must differ, got {names}")
        return self

    def names(self) -> list[str]:
        return [m.name or f"teacher{i}" for i, m in enumerate(self.teachers)]


class SelfTeacherSpec(Section):
    """Self-distillation (docs/methods.md §11): the teacher is the student itself, as the exponential moving
    average of its weights (``self: ema``) or as a frozen copy of its weights taken every ``every`` steps
    (``self: snapshot``, born-again networks within one run). Kept in the run's checkpoints."""

    self_: Literal["ema", "snapshot"] = Field(alias="self", description="ema: moving average; snapshot: frozen copy")
    decay: float = Field(0.999, ge=0.0, lt=1.0, description="ema: teacher <- decay * teacher + (1 - decay) * student")
    every: int | None = Field(None, gt=0, description="snapshot: copy the student's weights every N steps")
    start: int = Field(0, ge=0, description="plain CE until this step (the teacher is still followed)")

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True,
                              serialize_by_alias=True)

    @model_validator(mode="after")
    def _every(self) -> SelfTeacherSpec:
        if self.self_ == "snapshot" and self.every is None:
            raise ValueError("teacher.self=snapshot needs teacher.every (steps between the frozen copies)")
        return self


class PeersTeacherSpec(Section):
    """Co-distillation (docs/methods.md §13): the student and its ``peers`` train in the same run on the same
    batches, each distilling from the others' predictions (their mixture in probability space) with
    ``1 - loss.alpha`` as the weight of the divergence, after ``burn_in`` steps of plain CE. Every peer is saved
    as a Hugging Face checkpoint in ``OUT/peers/peer<i>``; its weights and optimizer state are in checkpoints."""

    peers: list[ModelSpec] = Field(description="the other models, trained with the student (path or config)")
    burn_in: int = Field(0, ge=0, description="steps of plain CE for every model before they distill")

    @model_validator(mode="after")
    def _some(self) -> PeersTeacherSpec:
        if not self.peers:
            raise ValueError("teacher.peers: give at least one model to co-distill with")
        return self


class StudentBaseTeacherSpec(Section):
    """The teacher is the LoRA student's own base model, its adapters switched off for the teacher's forward
    pass: no second copy of the weights (needs ``student.lora``)."""

    student_base: Literal[True] = Field(description="true: the student's base model without its adapters")


def _teacher_kind(value: Any) -> str:
    for kind, spec in (("cache", TeacherCacheSpec), ("server", ServerTeacherSpec), ("teachers", MixtureTeacherSpec),
                       ("self", SelfTeacherSpec), ("peers", PeersTeacherSpec),
                       ("student_base", StudentBaseTeacherSpec)):
        if isinstance(value, spec) or (isinstance(value, dict) and kind in value):
            return kind
    return "live"


def shares_student(spec: Any) -> str | None:
    """The tag of a teacher built on the weights of the student being trained (self-distillation follows them, a
    LoRA student's base is them), or None."""
    kind = _teacher_kind(spec) if spec is not None else None
    return kind if kind in ("self", "student_base") else None


# A live model, a cache, a server, several teachers, the student itself or its peers; the discriminator keeps errors to
# the branch that was meant.
TeacherSpec = Annotated[
    Annotated[ModelSpec, Tag("live")] | Annotated[TeacherCacheSpec, Tag("cache")]
    | Annotated[ServerTeacherSpec, Tag("server")] | Annotated[MixtureTeacherSpec, Tag("teachers")]
    | Annotated[SelfTeacherSpec, Tag("self")] | Annotated[PeersTeacherSpec, Tag("peers")]
    | Annotated[StudentBaseTeacherSpec, Tag("student_base")],
    Discriminator(_teacher_kind),
]


# What generates or captures (distill generate, distill cache): a model in this process or a server.
ModelOrServer = Annotated[
    Annotated[ModelSpec, Tag("live")] | Annotated[ServerTeacherSpec, Tag("server")], Discriminator(_teacher_kind)
]


class TrainConfig(Section):
    out_dir: str = "runs/train"
    student: ModelSpec
    teacher: TeacherSpec | None = None
    data: DataConfig
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainLoopConfig = TrainLoopConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()

    @model_validator(mode="after")
    def _student_base_needs_lora(self) -> TrainConfig:
        if isinstance(self.teacher, StudentBaseTeacherSpec) and self.student.lora is None:
            raise ValueError("teacher.student_base=true is the student's base model with its LoRA adapters off, but "
                             "the student has no adapters: set student.lora (e.g. student.lora.r=8) or use another teacher")
        if isinstance(self.teacher, ModelSpec) and self.teacher.lora is not None:
            raise ValueError("teacher.lora: LoRA adapters are trained on the student only; remove teacher.lora")
        return self

    @model_validator(mode="after")
    def _crosstok_needs_one_teacher(self) -> TrainConfig:
        if self.loss.crosstok is None:
            return self
        what = f"loss.crosstok={self.loss.crosstok}"
        if isinstance(self.teacher, TeacherCacheSpec):
            raise ValueError(f"{what}: a cache holds the teacher's top-k at the positions of the tokenization it was "
                             "built on (the student's), but across tokenizers the loss needs the teacher's rows of its "
                             "own tokenization of each batch (and of the student's samples under gkd). Serve the "
                             "teacher instead (teacher: {server: URL, tokenizer: ...}, e.g. distill serve or vLLM), "
                             "use it live, or set loss.crosstok=null")
        if not isinstance(self.teacher, (ModelSpec, ServerTeacherSpec)):
            kind = "no teacher" if self.teacher is None else f"teacher: {{{_teacher_kind(self.teacher)}: ...}}"
            raise ValueError(f"{what} distills from one teacher with its own tokenizer, live (teacher: {{path: ..., "
                             f"tokenizer: ...}} or {{config: ...}}) or served (teacher: {{server: URL, tokenizer: "
                             f"...}}), but the run has {kind}; mixed teachers are not supported across tokenizers: "
                             "use one teacher or set loss.crosstok=null")
        if isinstance(self.teacher, ServerTeacherSpec):
            if self.teacher.tokenizer is None:
                raise ValueError(f"{what}: teacher.tokenizer is not set; a served teacher with another tokenizer "
                                 "needs a local copy of it (a directory or hub id: the one the server loads) to "
                                 "tokenize each batch's text for it and to build W")
            if self.teacher.top_k != "all" and self.teacher.signal == "logprobs" and not self.teacher.realized_token:
                raise ValueError(f"{what}: teacher.realized_token=false drops the teacher's own next token when it is "
                                 "outside the top-k, but a group of several teacher tokens needs the later tokens' "
                                 "log-probs; set teacher.realized_token=true (the default)")
        if not isinstance(self.train.batches, (DatasetBatches, GkdBatches)):
            why = {"skd": " (SKD's teacher replaces a student token with a token of its own vocabulary, which the "
                          "student's tokens cannot hold)"}.get(self.train.batches.source, "")
            raise ValueError(f"{what} trains on the dataset's examples or GKD's mix of them and the student's own "
                             f"samples (re-tokenized for the teacher); train.batches={self.train.batches.source} is not "
                             f"supported across tokenizers{why}: set train.batches to dataset or gkd, or "
                             "loss.crosstok=null")
        if self.loss.hidden is not None:
            raise ValueError(f"{what}: loss.hidden compares hidden states position by position, which two "
                             "tokenizations do not share; set loss.hidden=null")
        if self.loss.divergence not in DIVERGENCES:
            raise ValueError(f"{what}: loss.divergence={self.loss.divergence} is an on-policy objective; choose one of "
                             f"{', '.join(DIVERGENCES)}")
        return self

    @model_validator(mode="before")
    @classmethod
    def _no_onpolicy_section(cls, data: Any) -> Any:
        if isinstance(data, dict) and "onpolicy" in data:
            raise ValueError(_onpolicy_moved(data))
        return data

    @model_validator(mode="after")
    def _onpolicy_needs_prompts(self) -> TrainConfig:
        if isinstance(self.train.batches, OnPolicyBatches) and self.data.packing:
            raise ValueError(
                f"train.batches={self.train.batches.source} writes completions for the examples' prompts, which packed "
                "blocks do not have: set data.packing=false (with prompt_response or messages data)"
            )
        return self


class CacheConfig(Section):
    """``distill cache``: which teacher, which data, which targets, where."""

    out_dir: str = "runs/cache"
    teacher: ModelOrServer
    data: DataConfig
    mode: Literal["topk", "sampled", "hybrid"] = "topk"
    k: int = Field(64, gt=0, description="top-k: ids kept per token")
    n: int | None = Field(
        None, gt=0, description="sampled: draws per token, with replacement (default 50); hybrid: draws at a tail of "
        "mass 1 outside the head, ceil(n * tail) at each token (default 16)"
    )
    head: int = Field(1, gt=0, description="hybrid: the most probable ids kept with their probabilities")
    temperature: float = Field(1.0, gt=0, description="targets are softmax(logits / temperature)")
    prob_bits: int | None = Field(
        None, ge=2, le=16, description="top-k probability code bits (default: auto, <= 3 B/entry)"
    )
    tail_bits: Literal[8, 16] | None = Field(None, description="top-k tail-mass code bits (default: 16 from k=32, else 8)")
    splits: list[Literal["train", "eval"]] | None = Field(
        None, description="build_datasets splits to capture (default: train, and eval when the data has one)"
    )
    batch_size: int = Field(8, gt=0, description="examples per teacher forward (per process)")
    shard_examples: int = Field(256, gt=0, description="examples per shard file")
    seed: int = Field(0, description="sampled, hybrid: seed of the draws")
    vocab_policy: Literal["truncate", "error"] = "truncate"
    logits_memory_mb: int = Field(256, gt=0, description="memory for one chunk of teacher logits")
    progress: bool = True


class PromptsConfig(Section):
    """Where ``distill generate``'s prompts come from and how they become token ids."""

    source: str = Field(description="local file (.jsonl/.json/.parquet/.csv), local directory, or hub dataset id")
    split: str = "train"
    format: Literal["auto", "prompt", "messages"] = Field(
        "auto", description="prompt: a text field; messages: chat messages rendered with the chat template"
    )
    prompt_field: str = "prompt"
    messages_field: str = "messages"
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra arguments to apply_chat_template (e.g. enable_thinking)"
    )
    max_prompts: int | None = Field(None, gt=0, description="the first N prompts only")

    @field_validator("source")
    @classmethod
    def _a_source(cls, ref: str) -> str:
        return check_reference(ref, DATA_SOURCE)


class SamplingConfig(Section):
    """How the generating model picks tokens; every parameter is explicit (the checkpoint's
    generation_config is never read)."""

    temperature: float = Field(1.0, ge=0.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = no top-k")
    max_new_tokens: int = Field(256, gt=0)
    stop_ids: list[int] = Field(default_factory=list, description="token ids that end a sample besides eos")


class GenerateConfig(Section):
    """``distill generate``: prompts -> N samples each from a model -> scored -> kept -> written."""

    out_dir: str = "runs/generate"
    teacher: ModelOrServer
    prompts: PromptsConfig
    sampling: SamplingConfig = SamplingConfig()
    n: int = Field(1, gt=0, description="samples per prompt")
    seed: int = Field(0, description="with the prompt and the sample index, seeds each sample")
    scorer: Literal["logprob", "verifier", "none"] = Field(
        "logprob", description="logprob: the model's mean log-prob of its sample; verifier: `verifier`"
    )
    verifier: str | None = Field(None, description="module:function(prompt, completion) -> float")
    keep: Literal["best", "top", "all"] = Field("best", description="per prompt: best-of-N, the top `keep_top`, or all")
    keep_top: int = Field(1, gt=0)
    keep_unfinished: bool = Field(False, description="keep samples that hit max_new_tokens without a stop token")
    batch_size: int = Field(16, gt=0, description="sequences decoded at once (per process)")
    shard_prompts: int = Field(256, gt=0, description="prompts per output shard")
    vocab_policy: Literal["truncate", "error"] = "truncate"
    progress: bool = True

    @model_validator(mode="after")
    def _verifier_given(self) -> GenerateConfig:
        if self.scorer == "verifier" and not self.verifier:
            raise ValueError("scorer=verifier needs `verifier: module:function` (e.g. distill.tasks.arithmetic:verify)")
        return self


class SpeculativeConfig(Section):
    """``distill eval``: each model as the speculative-decoding draft of the (live) teacher."""

    gammas: list[int] = Field(default_factory=lambda: [1, 2, 4, 8], description="draft tokens per round")
    prompts: int = Field(16, gt=0, description="prompts from the evaluated split")
    prompt_tokens: int = Field(32, gt=0, description="text data: the first N tokens of an example are its prompt")
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8], description="speed-up measured at these batches")
    reps: int = Field(3, gt=0, description="timed repetitions (medians)")
    seed: int = 0

    @model_validator(mode="after")
    def _positive(self) -> SpeculativeConfig:
        bad = [g for g in self.gammas if g < 1]
        if bad or not self.gammas:
            raise ValueError(f"gammas must be >= 1 (the draft proposes at least one token), got {self.gammas}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be >= 1, got {self.batch_sizes}")
        return self


class LmEvalConfig(Section):
    """Downstream tasks through lm-evaluation-harness (``pip install 'distill[lm-eval]'``), run on every model."""

    tasks: list[str] = Field(min_length=1, description="task names (lm-eval's, or defined in include_path)")
    include_path: str | None = Field(None, description="a directory of task YAML files (tasks with local data)")
    include_defaults: bool | None = Field(
        None, description="also index lm-eval's built-in tasks (default: only when include_path is not given)")
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | None = Field(None, gt=0, description="at most this many documents per task")
    batch_size: int = Field(8, gt=0)


class EvalRunConfig(Section):
    """``distill eval``: models (and a teacher) on a dataset; optionally each model as a speculative draft and on
    lm-eval tasks."""

    out: str = Field("runs/eval/eval.json", description="the JSON written (a markdown table goes to stdout)")
    models: dict[str, ModelSpec] = Field(description="name -> model (path or config)")
    teacher: TeacherSpec | None = None
    data: DataConfig | None = None
    split: Literal["eval", "train"] = Field("eval", description="which split of the data section to evaluate")
    batch_size: int = Field(8, gt=0)
    max_batches: int | None = Field(None, gt=0, description="this many batches, evenly spread (default: all)")
    divergences: list[Literal["reverse_kl", "tvd", "jsd", "jeffreys"]] = Field(
        default_factory=lambda: ["reverse_kl", "tvd"], description="besides forward KL, with a teacher"
    )
    vocab_policy: Literal["truncate", "error"] = "truncate"
    speculative: SpeculativeConfig | None = None
    lm_eval: LmEvalConfig | None = None
    progress: bool = True

    @model_validator(mode="after")
    def _some_model(self) -> EvalRunConfig:
        if not self.models:
            raise ValueError("models: give at least one model to evaluate (name: {path: DIR})")
        if self.data is None and self.lm_eval is None:
            raise ValueError("data: give a data section to evaluate on (or lm_eval: {tasks: [...]} alone)")
        if self.data is None and (self.teacher is not None or self.speculative is not None):
            raise ValueError("data: a teacher and speculative need a data section (their metrics are on its split)")
        return self


# ------------------------------------------------------------------------------------------------ pruning


class PruneTargetConfig(Section):
    """The pruned model's sizes: explicit (an unset size stays the model's), or a parameter budget that
    shrinks the ``axes`` by one common ratio (docs/methods.md §10)."""

    num_hidden_layers: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = Field(
        None, description="a multiple of num_key_value_heads, at most the model's query heads per KV group each"
    )
    num_key_value_heads: int | None = Field(
        None, description="KV groups kept whole (default: the model's; alone, the query heads per group are kept)"
    )
    params: float | None = Field(
        None, gt=0, description="a parameter budget instead of sizes: a count (e.g. 1.2e9) or a fraction (0, 1)"
    )
    axes: list[Literal["num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads"]] = Field(
        default_factory=lambda: ["hidden_size", "intermediate_size"],
        description="what a budget shrinks (default: width of the embeddings and MLP, Minitron's best)",
    )
    multiple_of: int = Field(1, gt=0, description="a budget rounds hidden_size and intermediate_size to this")

    @model_validator(mode="after")
    def _sizes_or_budget(self) -> PruneTargetConfig:
        sizes = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                             "num_key_value_heads") if getattr(self, k) is not None]
        if sizes and self.params is not None:
            raise ValueError(f"give explicit sizes ({', '.join(sizes)}) or a parameter budget (params), not both")
        if not sizes and self.params is None:
            raise ValueError("give the pruned sizes (num_hidden_layers, hidden_size, intermediate_size, "
                             "num_attention_heads, num_key_value_heads) or a parameter budget (params)")
        return self


class ImportanceConfig(Section):
    """How units are ranked: activations on ``samples`` calibration examples of the data section."""

    samples: int = Field(512, gt=0, description="calibration examples, evenly spread over the train split "
                         "(the Minitron papers use 512-1024)")
    batch_size: int = Field(8, gt=0)
    layer_metric: Literal["loss", "cosine"] = Field(
        "loss", description="depth ranking: loss = calibration loss increase when the layer is skipped (one "
        "pass per layer); cosine = 1 - cos(block input, block output)"
    )


class PruneConfig(Section):
    """``distill prune``: a model, calibration data, target sizes -> a smaller HF checkpoint in out_dir."""

    out_dir: str = "runs/prune"
    model: ModelSpec
    data: DataConfig
    target: PruneTargetConfig
    importance: ImportanceConfig = ImportanceConfig()
    report: bool = Field(True, description="also score width-only and depth-only plans of the same size")
    overwrite: bool = Field(False, description="replace an existing out_dir written by an earlier distill prune "
                            "(default: refuse it, as distill train refuses an existing run)")
