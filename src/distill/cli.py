"""The ``distill`` command: every sub-command is registered here (``PARSERS``), each a thin shell around the
Python API (:mod:`distill.api`; ``quickstart`` and ``report`` around their command modules, ``serve`` around
:mod:`distill.server.app`); errors are reported here, once, without a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import textwrap
import typing

from huggingface_hub.errors import StrictDataclassError
from pydantic import BaseModel

from distill import __version__, api
from distill.commands import quickstart, report
from distill.config import CacheConfig, EvalRunConfig, GenerateConfig, PruneConfig, TrainConfig
from distill.errors import NonFiniteLossError, TeacherServerError
from distill.server.app import serve

logger = logging.getLogger("distill")


def _sections(ann) -> list[type[BaseModel]]:
    """The config sections an annotation can hold, through ``| None``, unions, ``Annotated``, lists and dicts."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(ann):
        found += [m for m in _sections(arg) if m not in found]
    return found


def _entry(key: str, ann) -> str:
    """How a section is written: ``key``, ``key[i]`` (a list of them), ``key.<name>`` (a mapping of them)."""
    origins = {typing.get_origin(a) for a in (ann, *typing.get_args(ann))}
    return f"{key}[i]" if list in origins else f"{key}.<name>" if dict in origins else key


def _section_lines(key: str, models: list[type[BaseModel]], indent: str, note: str = "") -> list[str]:
    """``key: every key`` of a section, wrapped (never cut), then its own sections; a section that is one of
    several kinds (a teacher) lists each kind's keys. ``note`` follows the key on the first line only."""
    if len(models) > 1:
        lines = [f"{indent}{key}{note}, one of:"]
        for model in models:
            lines += _section_lines(key, [model], indent + "  ", _tag(model))
        return lines
    fields = models[0].model_fields
    names = [field.alias or name for name, field in fields.items()]
    head = f"{indent}{key}{note}: "
    lines = textwrap.wrap(", ".join(names), width=110, initial_indent=head, subsequent_indent=" " * len(head),
                          break_on_hyphens=False)
    for name, field in fields.items():
        subs = _sections(field.annotation)
        if subs:
            lines += _section_lines(_entry(f"{key}.{field.alias or name}", field.annotation), subs, indent + "  ")
    return lines


def _tag(model: type[BaseModel]) -> str:
    """`` (source: gkd)``: the field that says which kind of a section this is (one allowed value), if any."""
    for name, field in model.model_fields.items():
        values = typing.get_args(field.annotation)
        if typing.get_origin(field.annotation) is typing.Literal and len(values) == 1 and isinstance(values[0], str):
            return f" ({field.alias or name}: {values[0]})"
    return ""


def _describe(model: type[BaseModel], indent: str = "  ") -> str:
    """A config model's keys with their defaults, and every key of every section (every kind of teacher
    included), for ``--help``."""
    lines = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        subs = _sections(field.annotation)
        if subs:
            optional = " (optional)" if not field.is_required() and field.default is None else ""
            lines += _section_lines(_entry(key, field.annotation), subs, indent, optional)
        else:
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            literal = typing.get_origin(field.annotation) is typing.Literal
            one_of = f"; one of {', '.join(map(str, typing.get_args(field.annotation)))}" if literal else ""
            about = f": {field.description}" if field.description else ""
            lines.append(textwrap.fill(f"{key} (default {default}{one_of}){about}", 110, initial_indent=indent,
                                       subsequent_indent=indent + "    "))
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    result = api.train(args.config, *args.overrides, resume=args.resume)
    summary = {"steps": result.steps, "tokens": result.tokens, **result.metrics}
    logger.info("done: %s", ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in summary.items()))
    return 0


def _train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="distill a teacher into a student (or train from scratch with no teacher)",
        description="Train a student with token-level knowledge distillation.\n\n"
        "Config sections (YAML file, then key=value overrides such as optim.lr=1e-3):\n" + _describe(TrainConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides with dotted keys, e.g. loss.temperature=2")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    p.set_defaults(func=cmd_train)


QUICKSTART_HELP = """\
Distill a teacher into a student on the Python standard library's own sources and compare it with the
same student trained from scratch. CPU only, no network.

1. corpus: the running interpreter's standard library, split into train/validation by file
2. tokenizer: byte-level BPE trained on the training files
3. teacher: a small Llama trained with cross-entropy, cached in $DISTILL_CACHE (~/.cache/distill)
4. students: same architecture, seed, steps and tokens; one from scratch, one distilled
5. output: results.json, report.md, curves.png and the three HF checkpoints in --out
"""


def cmd_quickstart(args: argparse.Namespace) -> int:
    quickstart.main(args.out, fast=args.fast)
    return 0


def _quickstart_parser(sub) -> None:
    p = sub.add_parser(
        "quickstart",
        help="show distillation beating training from scratch (CPU, no network, minutes)",
        description=QUICKSTART_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--fast", action="store_true", help="smaller models and fewer steps (under 3 minutes)")
    p.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    p.set_defaults(func=cmd_quickstart)


def cmd_cache(args: argparse.Namespace) -> int:
    result = api.cache(args.config, *args.overrides)
    logger.info("done: %s", json.dumps(result.splits))
    return 0


def _cache_parser(sub) -> None:
    p = sub.add_parser(
        "cache",
        help="run a teacher over the data once and store sparse per-token targets (top-k or sampled)",
        description="Capture teacher targets into an offline cache; train from it with teacher: {cache: OUT}.\n"
        "Re-running the same command resumes an interrupted capture.\n\n"
        "Config keys (YAML file, then key=value overrides such as mode=sampled n=50):\n" + _describe(CacheConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML config file (see configs/tiny/cache.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides with dotted keys, e.g. data.seq_len=256")
    p.set_defaults(func=cmd_cache)


def cmd_generate(args: argparse.Namespace) -> int:
    result = api.generate(args.config, *args.overrides)
    counts = result.counts
    logger.info("done: %s", ", ".join(f"{k}={v}" for k, v in counts.items()))
    if not counts.get("kept"):  # complete, but nothing to train on: a pipeline must not go on as if it had data
        print(f"distill: error: no sample was kept, so {result.out_dir} holds no training data (the warning above and "
              "manifest.json's `warnings` say why)", file=sys.stderr)
        return 1
    return 0


def _generate_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="sample N responses per prompt from a teacher, score them, keep the best (sequence-level KD data)",
        description="Generate training text from a teacher: prompts -> N samples each -> scored (the teacher's\n"
        "mean log-prob, a verifier module:function(prompt, completion) -> float, or none) -> kept (best-of-N,\n"
        "top m, all) -> JSONL shards + manifest in out_dir, which `distill train` reads as data.source.\n"
        "Re-running the same command completes an interrupted run. Exits 1 when no sample was kept (the output\n"
        "then holds no training data; manifest.json's `warnings` say why).\n\n"
        "Config keys (YAML file, then key=value overrides such as n=8 sampling.temperature=0.7):\n"
        + _describe(GenerateConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML config file (see configs/tiny/generate.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides with dotted keys, e.g. sampling.top_p=0.9")
    p.set_defaults(func=cmd_generate)


def cmd_serve(args: argparse.Namespace) -> int:
    serve(args.model_dir, host=args.host, port=args.port, name=args.name, api_key_env=args.api_key_env,
          max_logprobs=args.max_logprobs, logprobs_mode=args.logprobs_mode, dtype=args.dtype)
    return 0


def _serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a Hugging Face model over an OpenAI-compatible HTTP API (a teacher for other machines)",
        description="Serve MODEL_DIR over HTTP: /v1/models, /v1/completions (with vLLM's prompt_logprobs and\n"
        "return_tokens_as_token_ids), /v1/chat/completions, /tokenize, /health. Concurrent requests are batched\n"
        "on the model. Errors come back in OpenAI's error shape. Train from it with teacher: {server: URL}.\n"
        "Needs the serve extra: pip install 'distill[serve]'.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model_dir", help="a Hugging Face model directory (with its tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default=None, help="the model name clients send (default: the directory's name)")
    p.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="require `Authorization: Bearer $VAR` (the key is read from this environment variable)")
    p.add_argument("--max-logprobs", type=int, default=20,
                   help="the most top log-probs a request may ask for (default 20, as vLLM; -1: no cap, the whole vocabulary)")
    p.add_argument("--logprobs-mode", choices=["raw", "processed"], default="raw",
                   help="raw: log-probs at T=1 whatever the request (vLLM's default); processed: at its temperature")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.set_defaults(func=cmd_serve)


def cmd_eval(args: argparse.Namespace) -> int:
    api.evaluate(args.config, *args.overrides)
    return 0


def _eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate models (loss, calibration, KL/TVD/agreement to a teacher, speed as a speculative draft, lm-eval tasks)",
        description="Evaluate one or more models on a data section's split: loss, perplexity, bits per byte, ECE,\n"
        "top-1 accuracy; with a teacher, forward KL and `divergences` with their spread over positions and top-1\n"
        "agreement; with `speculative`, each model as the teacher's draft (acceptance, tokens per target call,\n"
        "wall-clock speed-up, and the prediction from alpha-hat); with `lm_eval`, lm-evaluation-harness tasks on\n"
        "each model (pip install 'distill[lm-eval]'). JSON to `out`, a markdown table to stdout.\n\n"
        "Config keys (YAML file, then key=value overrides such as max_batches=4):\n" + _describe(EvalRunConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML config file (see configs/tiny/eval.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. models.student.path=runs/x/student")
    p.set_defaults(func=cmd_eval)


def cmd_preflight(args: argparse.Namespace) -> int:
    api.preflight(args.config, *args.overrides, batches=args.batches, json_out=args.json)
    return 0


def _preflight_parser(sub) -> None:
    p = sub.add_parser(
        "preflight",
        help="before training: teacher and student loss on the run's data, vocabulary fit, the teacher's cost",
        description="Measure a training run before it starts, on a few batches of its own data (the train split\n"
        "and the eval split when there is one): the teacher's loss and bits per byte, the student's starting loss\n"
        "and bits per byte (the gap), the tokenizer's length against each output layer and how many of the\n"
        "sample's tokens each covers, one teacher signal against one student forward + backward on the same\n"
        "micro-batch (measured once; a cache's size on disk instead of a forward), and what the quickstart's\n"
        "measurement says to expect. Takes the config `distill train` takes; `distill train` logs the same report.\n\n"
        "Config sections: as `distill train --help` lists them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="a distill train YAML config (see configs/tiny/train.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides with dotted keys, e.g. teacher.path=runs/x/student")
    p.add_argument("--batches", type=int, default=4, help="micro-batches of train.batch_size per split (default 4)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the numbers to FILE as JSON")
    p.set_defaults(func=cmd_preflight)


def cmd_report(args: argparse.Namespace) -> int:
    path = report.main(args.runs, evals=args.eval, out=args.out)
    print(path)
    return 0


def _report_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="one page from training runs and evaluations: curves of several runs, the final table, speculative results",
        description="Write report.md (+ PNG figures) from run directories (their metrics.jsonl: eval curves of every\n"
        "run on shared axes, the train loss, the final evals as a table) and `distill eval` JSON files (their tables;\n"
        "acceptance rate and tokens per target call against gamma for speculative drafts).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="*", help="run directories (out_dir of distill train)")
    p.add_argument("--eval", action="append", default=[], metavar="FILE", help="a distill eval JSON (repeatable)")
    p.add_argument("--out", default="runs/report", help="output directory (default: runs/report)")
    p.set_defaults(func=cmd_report)


def cmd_prune(args: argparse.Namespace) -> int:
    result = api.prune(args.config, *args.overrides)
    logger.info("done: %s parameters -> %s, calibration loss %.4f -> %.4f", f"{result.params[0]:,}",
                f"{result.params[1]:,}", *result.calibration_loss)
    return 0


def _prune_parser(sub) -> None:
    p = sub.add_parser(
        "prune",
        help="structured pruning (Minitron): remove layers, heads, MLP neurons, embedding channels by importance",
        description="Prune a Hugging Face model (llama, mistral, qwen2, qwen3, gemma2) to smaller sizes: importance of heads,\n"
        "MLP neurons, embedding channels and layers from activations on calibration data (the data section),\n"
        "then the weights sliced into an ordinary HF checkpoint in out_dir, with prune_report.json/.md (the\n"
        "calibration loss of the chosen, width-only and depth-only plans). Then distill it from the original:\n"
        "  distill train CONFIG student.path=OUT_DIR student.config=null teacher.path=MODEL\n\n"
        "Config keys (YAML file, then key=value overrides such as target.hidden_size=2048):\n" + _describe(PruneConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML config file (see configs/tiny/prune.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides with dotted keys, e.g. target.params=0.5")
    p.set_defaults(func=cmd_prune)


PARSERS = {"train": _train_parser, "cache": _cache_parser, "generate": _generate_parser, "serve": _serve_parser,
           "eval": _eval_parser, "report": _report_parser, "quickstart": _quickstart_parser,
           "prune": _prune_parser, "preflight": _preflight_parser}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill",
        description="Knowledge distillation of large language models: make a small student behave like a teacher.",
    )
    parser.add_argument("--version", action="version", version=f"distill {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    for add in PARSERS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[distill] %(message)s"))
    logger.handlers = [h for h in logger.handlers if not isinstance(h, logging.StreamHandler)
                       or isinstance(h, logging.FileHandler)] + [handler]
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    logger.propagate = False

    try:
        return args.func(args)
    except TeacherServerError as exc:  # the run stopped (exit 1, not a config problem); what to do depends on the command
        print(f"distill: error: {server_advice(str(exc), args.command)}", file=sys.stderr)
        return 1
    except NonFiniteLossError as exc:  # the run stopped; the message says what to do
        print(f"distill: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as exc:  # bad input: the message names it and says what to do
        print(f"distill: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not _refused_model_config(exc):
            raise
        # A config.json on disk that transformers refuses (a config section is checked when it is read).
        print(f"distill: error: transformers refused a model's config: {' '.join(str(exc).split())}; fix the "
              "model's config.json or its config section", file=sys.stderr)
        return 2


# What to do once a teacher server answers again, for the commands other than train (whose checkpoints the
# server error already speaks of: rerun with --resume).
SERVER_ADVICE = {
    "cache": "once it answers again, run the same `distill cache` command: it continues after the last complete shard",
    "generate": "once it answers again, run the same `distill generate` command: it continues after the last "
                "complete shard",
    "eval": "once it answers again, run the same `distill eval` command",
}
_TRAINING_ADVICE = re.compile(r";? *a training run stops here.*--resume\)")


def server_advice(message: str, command: str | None) -> str:
    """A teacher server's error with the advice that fits ``command``."""
    advice = SERVER_ADVICE.get(command or "")
    if advice is None:
        return message
    return _TRAINING_ADVICE.sub("", message).rstrip(". ") + f". {advice[0].upper()}{advice[1:]}."


def _refused_model_config(exc: Exception) -> bool:
    """Whether ``exc`` is huggingface_hub's refusal of a (transformers) config value."""
    return isinstance(exc, StrictDataclassError)


if __name__ == "__main__":
    sys.exit(main())
