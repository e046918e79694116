"""`ownllm` command line: parse, call the library, print.

COMMANDS below is the whole CLI: each verb names the function that runs it, each group its own verbs. One module
per capability holds the functions (cli/generate.py, cli/models.py, ...); options more than one verb takes are
declared once in cli/options.py, printing lives in cli/render.py. Every module here imports torch, transformers
and the other heavy libraries inside the verbs that load a model, so the other verbs start in a fraction of a
second.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Annotated, Any, NamedTuple

import typer

from ownllm.cli import data, evaluate, export, finetune, generate, heads, jobs, models, rag, serve
from ownllm.cli.options import settings
from ownllm.collector import end_start_up_pause
from ownllm.errors import OwnLLMError


class Group(NamedTuple):
    """A verb with verbs of its own (`ownllm eval qa`): its help line and its verbs."""

    help: str
    verbs: dict[str, Callable[..., None]]


COMMANDS: dict[str, Callable[..., None] | Group] = {
    "pull": models.pull,
    "models": models.list_models,
    "tokenize": generate.tokenize,
    "generate": generate.generate,
    "chat": generate.chat,
    "estimate": models.estimate,
    "serve": serve.serve,
    "ui": serve.ui,
    "finetune": finetune.finetune,
    "merge": finetune.merge,
    "score": heads.score,
    "classify": heads.classify,
    "export": export.export,
    "quantize": Group("Choose a quantization by measurement on your own model and data.", {
        "compare": export.quantize_compare,
    }),
    "eval": Group("Evaluate models: perplexity, QA, judge, harness, compare, text-to-SQL, reward, classify.", {
        "perplexity": evaluate.perplexity,
        "qa": evaluate.qa,
        "judge": evaluate.judge,
        "harness": evaluate.harness,
        "compare": evaluate.compare,
        "sql": evaluate.sql,
        "reward": evaluate.reward,
        "classify": evaluate.classify,
    }),
    "rag": Group("Answer from your own documents: index, query, ask, eval.", {
        "index": rag.index,
        "query": rag.query,
        "ask": rag.ask,
        "eval": rag.evaluate,
    }),
    "bench": Group("Benchmarks users can run against their own setup.", {
        "serve": serve.bench_serve,
    }),
    "data": Group("Check and clean training data before fine-tuning.", {
        "check": data.check,
        "prepare": data.prepare,
    }),
    "jobs": Group("Fine-tuning jobs on a running server (OpenAI's API, locally).", {
        "upload": jobs.upload,
        "create": jobs.create,
        "list": jobs.list_jobs,
        "show": jobs.show,
        "events": jobs.events,
        "cancel": jobs.cancel,
    }),
}


def _root(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks for errors")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log what happens")] = False,
) -> None:
    settings["debug"], settings["verbose"] = debug, verbose
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:  # libraries that set their own logger to DEBUG (bm25s) stop here
        handler.setLevel(level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:  # transformers' own logging is quieted by the verbs that load it (options.quiet_model_libraries)
        # its optional hub kernel cannot be fetched offline; the built-in CPU path it falls back to is fine
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def build_app() -> typer.Typer:
    """The typer app for COMMANDS."""
    root = typer.Typer(
        name="ownllm",
        help="Run, fine-tune, evaluate and serve your own LLM, locally, on your own data.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )
    root.callback()(_root)
    for name, command in COMMANDS.items():
        if isinstance(command, Group):
            group = typer.Typer(help=command.help, no_args_is_help=True)
            for verb, function in command.verbs.items():
                group.command(name=verb)(function)
            root.add_typer(group, name=name)
        else:
            root.command(name=name)(command)
    return root


app = build_app()


def _usage_error_types() -> tuple[type[Exception], ...]:
    """What typer raises for bad usage: its own exception type since it vendors click, click's before."""
    if hasattr(typer, "TyperException"):
        return (typer.TyperException,)
    import click

    return (click.ClickException,)


def _usage_error(exc: Any) -> str:
    """A usage error (unknown option, a value that is not a number, a missing argument) as one line."""
    message = " ".join(exc.format_message().split()).removesuffix(".")
    message = message[:1].lower() + message[1:] if message[1:2].islower() else message
    ctx = getattr(exc, "ctx", None)
    return f"{message} (see: {ctx.command_path} --help)" if ctx is not None else message


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code (2 for a user error or bad usage, 130 for Ctrl-C)."""
    try:
        return _main(argv)
    finally:
        end_start_up_pause()  # a verb that loaded no model leaves the garbage collector as it found it


def _main(argv: list[str] | None) -> int:
    try:
        code = app(args=argv, prog_name="ownllm", standalone_mode=False)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except _usage_error_types() as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help was printed
            return 2
        print(f"error: {_usage_error(exc)}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except typer.Abort:
        print("interrupted", file=sys.stderr)
        return 130
    except OwnLLMError as exc:
        if settings["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 130 if exc.kind == "interrupted" else 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0


def run() -> None:
    """The `ownllm` console script."""
    raise SystemExit(main())
