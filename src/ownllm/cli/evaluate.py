"""`ownllm eval ...`: perplexity, QA metrics, LLM-as-judge, harness tasks, base vs tuned."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ownllm.cli.options import (
    DtypeOpt,
    JsonOpt,
    MaxNewTokensOpt,
    ModelArg,
    SeedOpt,
    StrategyOpt,
    TemperatureOpt,
    TopPOpt,
    at_least_one,
    check_url,
    quiet_model_libraries,
    sampling_params,
)
from ownllm.errors import OwnLLMError

DataOpt = Annotated[Path, typer.Option("--data", help="the evaluation data")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="folder for per-item results and the summary")]


def _progress(total: int, label: str) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True)
    return progress, progress.add_task(label, total=total)


def _check_out(out: Path | None) -> None:
    """Results are written into --out after all the work: a path that cannot be a folder fails first."""
    if out is not None:
        from ownllm.data.files import check_output_folder

        check_output_folder(out, param="out")


def _check_text_inputs(data: Path) -> None:
    """Text files (a .txt/.md file or a folder of them) must be UTF-8: say which is not before a model loads.
    JSONL is checked line by line when it is read."""
    from ownllm.data.files import read_text_file

    if data.is_dir():
        for file in sorted(p for p in data.rglob("*") if p.suffix.lower() in (".txt", ".md") and p.is_file()):
            read_text_file(file, param="data")
    elif not data.exists():
        raise OwnLLMError(f"no such file: {data}", kind="not_found", param="data")
    elif data.suffix.lower() != ".jsonl":
        read_text_file(data, param="data")


def _print_summary(title: str, summary: dict[str, Any], as_json: bool) -> None:
    from rich.table import Table

    from ownllm.cli.render import out

    if as_json:
        out.print_json(json.dumps(summary, default=float))
        return
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    out.print(table)


def perplexity(
    model: ModelArg,
    data: DataOpt,
    max_length: Annotated[int | None, typer.Option(help="window length (default min(context, 1024))")] = None,
    stride: Annotated[int | None, typer.Option(help="window step (default half the window)")] = None,
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Sliding-window perplexity over text files, a folder, or the assistant turns of chat JSONL."""
    from dataclasses import asdict

    _check_text_inputs(data)
    quiet_model_libraries()
    from ownllm.cli.render import err
    from ownllm.evaluate.perplexity import load_documents
    from ownllm.evaluate.perplexity import perplexity as score
    from ownllm.generate.open import open_engine

    engine = open_engine(model, dtype=dtype, backend="transformers")
    documents = load_documents(engine, data)
    progress, task = _progress(sum(sum(d.scored) for d in documents), "scoring tokens")
    with progress:
        result = score(engine, documents, max_length=max_length, stride=stride,
                       progress=lambda n: progress.advance(task, n))
    for note in result.notes:
        err.print(f"[yellow]note: {note}[/yellow]")
    summary = asdict(result)
    summary.pop("notes")
    _print_summary(f"perplexity of {model} on {data}", summary, as_json)


def qa(
    model: ModelArg,
    data: DataOpt,
    out: OutOpt = None,
    batch_size: Annotated[int, typer.Option(help="questions generated together")] = 16,
    max_new_tokens: MaxNewTokensOpt = 64,
    strategy: StrategyOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    seed: SeedOpt = None,
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Answer questions and score them: exact match, token F1, ROUGE-L, contains-answer."""
    at_least_one(batch_size=batch_size)
    _check_out(out)
    quiet_model_libraries()
    from ownllm.evaluate.qa import read_questions, results_as_rows, run_qa, summarize
    from ownllm.evaluate.reports import write_results
    from ownllm.generate.open import open_engine

    params = sampling_params(strategy=strategy, temperature=temperature, top_p=top_p, seed=seed,
                             max_new_tokens=max_new_tokens)
    items = read_questions(data)
    engine = open_engine(model, dtype=dtype)
    progress, task = _progress(len(items), "answering")
    with progress:
        results = run_qa(engine, items, params, batch_size=batch_size, progress=lambda n: progress.advance(task, n))
    summary = summarize(results)
    if out is not None:
        write_results(out, "qa", results_as_rows(results), {"model": model, **summary})
    _print_summary(f"QA: {model} on {data}", summary, as_json)


def judge(
    answers: Annotated[Path, typer.Option("--answers", help="JSONL: question, answer, optional reference")],
    judge: Annotated[str, typer.Option("--judge", help="a local model, or the URL of an OpenAI-compatible server")],
    against: Annotated[Path | None, typer.Option(help="second answers file: pairwise, order swapped")] = None,
    rubric: Annotated[Path | None, typer.Option(help="prompt template file (see ownllm.evaluate.judge)")] = None,
    judge_model: Annotated[str | None, typer.Option(help="model name at the judge URL")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="OWNLLM_JUDGE_API_KEY", help="API key for the URL")] = None,
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Grade answers 1–5 with a reason, or compare two answer files pairwise, with a judge model."""
    from ownllm.data.files import read_text_file
    from ownllm.evaluate import judge as judging
    from ownllm.evaluate.reports import write_results

    _check_out(out)
    items = judging.read_answers(answers, against)
    template = read_text_file(rubric, param="rubric") if rubric is not None else None
    if judge.startswith(("http://", "https://")):
        check_url(judge, param="judge")
        chosen = judging.endpoint_judge(judge, model=judge_model, api_key=api_key)
    else:
        quiet_model_libraries()
        chosen = judging.local_judge(judge)
    progress, task = _progress(len(items), "judging")
    with progress:
        advance = lambda n: progress.advance(task, n)  # noqa: E731
        if against is None:
            rows, summary = judging.judge_scores(chosen, items, rubric=template or judging.SCORE_RUBRIC,
                                                 progress=advance)
        else:
            rows, summary = judging.judge_pairwise(chosen, items, rubric=template or judging.PAIRWISE_RUBRIC,
                                                   progress=advance)
    if out is not None:
        write_results(out, "judge", rows, summary)
    _print_summary(f"judged by {chosen.name}", summary, as_json)


def harness(
    model: ModelArg,
    tasks: Annotated[list[str], typer.Option("--tasks", help="task YAML with local data (repeatable)")],
    limit: Annotated[int | None, typer.Option(help="at most this many documents per task")] = None,
    dtype: DtypeOpt = "auto",
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run lm-evaluation-harness tasks on a local model; data comes from local files only."""
    at_least_one(limit=limit)
    _check_out(out)
    quiet_model_libraries()
    from ownllm.evaluate.harness import run_harness
    from ownllm.generate.open import open_engine
    from ownllm.home import atomic_write_json

    engine = open_engine(model, dtype=dtype, backend="transformers")
    results = run_harness(engine, tasks, limit=limit)
    clean = json.loads(json.dumps(results, default=float))
    if out is not None:
        atomic_write_json(out / "harness.json", clean)
    for name, metrics in clean.items():
        shown = {k: v for k, v in metrics.items() if k not in ("name", "alias")}
        _print_summary(f"{name}", shown, as_json)


def compare(
    base: ModelArg,
    tuned: Annotated[str, typer.Argument(help="the model to compare against the base")],
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", help="report folder")] = Path("eval-report"),
    batch_size: Annotated[int, typer.Option()] = 16,
    max_new_tokens: MaxNewTokensOpt = 64,
    dtype: DtypeOpt = "auto",
) -> None:
    """QA metrics and answer perplexity for BASE and TUNED: report.md, report.json and chart.png."""
    from ownllm.data.files import check_output_folder

    at_least_one(batch_size=batch_size)
    check_output_folder(out, param="out", replaces="report.json")  # replaced whole: never a user's folder
    quiet_model_libraries()
    from ownllm.cli.render import out as console
    from ownllm.evaluate.compare import compare as compare_models
    from ownllm.generate.params import SamplingParams

    report = compare_models(base, tuned, data, out, params=SamplingParams(max_new_tokens=max_new_tokens),
                     batch_size=batch_size, dtype=dtype)
    metrics = report["metrics"]
    for name in metrics["base"]:
        console.print(f"{name:12s} base {metrics['base'][name]:.4f}  tuned {metrics['tuned'][name]:.4f}  "
                      f"delta {metrics['delta'][name]:+.4f}")
    console.print(f"report: {out}/report.md, {out}/report.json, {out}/chart.png")


def sql(
    model: ModelArg,
    db: Annotated[Path, typer.Option("--db", help="the SQLite database the queries run on (opened read-only)")],
    data: DataOpt,
    out: OutOpt = None,
    batch_size: Annotated[int, typer.Option(help="questions generated together")] = 16,
    max_new_tokens: MaxNewTokensOpt = 128,
    timeout: Annotated[float, typer.Option(help="seconds one query may run")] = 2.0,
    limit: Annotated[int | None, typer.Option(help="score only the first N questions")] = None,
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Text-to-SQL by execution: run each generated query read-only and compare its rows with the gold query's."""
    at_least_one(batch_size=batch_size, limit=limit)
    if not 0 < timeout <= 600:  # a hang guard per query: inf (or 1e300) would switch it off
        raise OwnLLMError(f"--timeout must be more than 0 and at most 600 seconds, got {timeout}", param="timeout")
    _check_out(out)
    from ownllm.evaluate import sql as scoring

    database = scoring.ReadOnlyDatabase(db, timeout=timeout)
    items = scoring.read_sql_set(data)[:limit]
    gold = scoring.check_gold(database, items, data)  # a broken gold query stops before a model loads
    quiet_model_libraries()
    from ownllm.evaluate.reports import write_results
    from ownllm.generate.open import open_engine
    from ownllm.generate.params import SamplingParams

    engine = open_engine(model, dtype=dtype)
    progress, task = _progress(len(items), "writing queries")
    with progress:
        results = scoring.run_sql_eval(engine, database, items, gold, SamplingParams(max_new_tokens=max_new_tokens),
                                       batch_size=batch_size, progress=lambda n: progress.advance(task, n))
    summary = scoring.summarize_sql(results)
    if out is not None:
        write_results(out, "sql", scoring.results_as_rows(results), {"model": model, "db": str(db), **summary})
    _print_summary(f"text-to-SQL: {model} on {data}", summary, as_json)


def reward(
    run: Annotated[Path, typer.Argument(help="a reward-model run folder (ownllm finetune --method reward)")],
    data: DataOpt,
    as_json: JsonOpt = False,
) -> None:
    """Pairwise accuracy of a reward model: the share of preference pairs whose chosen reply scores higher."""
    from ownllm.finetune.dataset import load_preference_rows
    from ownllm.finetune.reward_model import check_reward_run

    check_reward_run(run)
    pairs = load_preference_rows(data, "eval reward")  # a line without both answers: named before the model loads
    quiet_model_libraries()
    from ownllm.finetune.reward_model import load_reward_model, pairwise_accuracy

    model, tokenizer = load_reward_model(run)
    _print_summary(f"reward model {run} on {data}", pairwise_accuracy(model, tokenizer, pairs), as_json)


def classify(
    run: Annotated[Path, typer.Argument(help="a classification run folder (ownllm finetune --task classify)")],
    data: DataOpt,
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Accuracy and macro-F1 of a classifier on labelled JSONL; --out adds per-item results and confusion.png."""
    _check_out(out)
    from ownllm.finetune.classify import read_labelled

    items = read_labelled(data)  # a line without a label: named before the model loads
    quiet_model_libraries()
    from ownllm.evaluate.reports import write_results
    from ownllm.finetune.classify import Classifier, evaluate_classifier

    classifier = Classifier(run)
    unknown = [item for item in items if item.label not in classifier.labels]
    if unknown:  # such a line could only ever count as wrong: more likely a typo or the wrong file
        first = unknown[0]
        raise OwnLLMError(f"{data.name} line {first.line}: label '{first.label}' is not one the classifier knows "
                          f"({', '.join(classifier.labels)}); {len(unknown)} line(s) like it", param="data")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    summary, rows = evaluate_classifier(classifier, items, out / "confusion.png" if out is not None else None)
    if out is not None:
        write_results(out, "classify", rows, summary)
    _print_summary(f"classifier {run} on {data}", summary, as_json)
