"""`tunegate evals run`: compare models on a held-out file from the command line.

Creates an eval on a running tunegate (a local file is uploaded first), follows its progress,
then prints the models side by side (each metric with its 95 % interval, the difference with
the baseline and the judge's rates) and the verdict. `--json` prints the eval object instead.
Exit status: 0 when the eval succeeded, 1 when it failed or was cancelled (or on an error).
"""

from __future__ import annotations

import json
import time
from contextlib import closing
from pathlib import Path
from typing import Annotated, Any

import typer

from app.files.client import TunegateClient
from app.jobs.client import JobsClient, surely_unsent

evals_cli = typer.Typer(help="Evaluate models on held-out data.", no_args_is_help=True)

EVALS = "/v1/evals"
FINISHED = frozenset({"succeeded", "failed", "cancelled"})
_RATES = ("accuracy", "exact_match", "f1", "json_valid")


def _cell(metric: dict[str, Any] | None) -> str:
    if not metric:
        return "-"
    return f"{metric['value']:.3f} [{metric['ci_low']:.3f}, {metric['ci_high']:.3f}]"


def _difference(metric: dict[str, Any] | None) -> str:
    if not metric:
        return "-"
    return (
        f"{metric['difference']:+.3f} [{metric['ci_low']:+.3f}, {metric['ci_high']:+.3f}] "
        f"{metric['verdict'].replace('_', ' ')}"
    )


def side_by_side(found: dict[str, Any]) -> Any:
    """The eval's results as a rich Table: one column per model, one row per metric."""
    from rich.table import Table

    results = found["results"]
    models: list[str] = found["models"]
    table = Table(title=f"{found['id']}: {results['examples']} examples ({results['task']})")
    table.add_column("metric")
    for index, model in enumerate(models):
        table.add_column(model + (" (baseline)" if index == 0 else ""), overflow="fold")
    aggregates = results["models"]
    comparisons = {c["model"]: c["metrics"] for c in results["comparisons"]}
    for name in _RATES:
        if not any(name in aggregates[m] for m in models):
            continue
        table.add_row(name, *(_cell(aggregates[m].get(name)) for m in models))
        table.add_row(
            f"  vs {models[0]}",
            "",
            *(_difference(comparisons.get(m, {}).get(name)) for m in models[1:]),
        )
    for name, key in (("latency p50 (ms)", "latency_ms"),):
        table.add_row(name, *(str((aggregates[m].get(key) or {}).get("p50", "-")) for m in models))
    table.add_row("errors", *(str(aggregates[m]["errors"]) for m in models))
    judge = results.get("judge")
    if judge:
        rates = {c["model"]: c for c in judge["comparisons"]}
        table.add_row(
            "judge win/tie/loss",
            "",
            *(f"{rates[m]['wins']}/{rates[m]['ties']}/{rates[m]['losses']}" for m in models[1:]),
        )
    return table


@evals_cli.command("run")
def evals_run(
    models: Annotated[
        str, typer.Option(help="Comma-separated model ids; the first is the baseline.")
    ],
    file: Annotated[
        str, typer.Option("--file", help="Held-out chat JSONL: a local path or a file id.")
    ],
    api_key: Annotated[
        str,
        typer.Option(
            "--api-key", envvar="TUNEGATE_API_KEY", help="A tunegate key (env TUNEGATE_API_KEY)."
        ),
    ],
    judge: Annotated[str | None, typer.Option(help="A judge model (needs --rubric).")] = None,
    rubric: Annotated[str | None, typer.Option(help="What a better answer is.")] = None,
    ignore_case: Annotated[bool, typer.Option(help="Compare answers case-insensitively.")] = False,
    max_examples: Annotated[int, typer.Option(min=1, max=10_000)] = 1000,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between polls.")] = 2.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the eval as JSON.")] = False,
    base_url: Annotated[
        str,
        typer.Option(
            "--base-url", envvar="TUNEGATE_URL", help="Where tunegate answers (env TUNEGATE_URL)."
        ),
    ] = "http://127.0.0.1:8000",
) -> None:
    """Run an eval and print the models side by side with the verdict."""
    from app import cli as main

    names = [name.strip() for name in models.split(",") if name.strip()]
    if len(names) < 2:
        raise main.fail("--models needs at least two models, separated by commas.", 2)
    if (judge is None) != (rubric is None):
        raise main.fail("--judge and --rubric go together.", 2)
    held_out = main.file_or_path(file, "--file")
    body: dict[str, Any] = {
        "models": names,
        "normalize": {"trim": True, "ignore_case": ignore_case},
        "max_examples": max_examples,
    }
    if judge is not None:
        body["judge"] = {"model": judge, "rubric": rubric}
    with (
        main.talking_to(base_url),
        closing(TunegateClient(base_url, api_key)) as files,
        JobsClient(base_url, api_key) as api,
    ):
        if isinstance(held_out, Path):
            held_out = main.upload_file(files, held_out, "evals")
        body["file"] = held_out
        # A create is not safe twice: retried only when it surely never reached tunegate.
        found = dict(api.call("POST", EVALS, surely_unsent, json=body))
        main.say(f"Created {found['id']}; evaluating {', '.join(names)}", "dim")
        found = _follow(api, found, interval)
    if as_json:
        typer.echo(json.dumps(found, indent=2, ensure_ascii=False))
    elif found["status"] == "succeeded":
        # Piped or captured: wide enough that cells are not folded (a terminal keeps its own).
        screen = main.out if main.out.is_terminal else main.console(width=240)
        screen.print(side_by_side(found))
        typer.echo(found["results"]["verdict"] or "No comparison to report.")
    if found["status"] != "succeeded":
        error = found.get("error") or {}
        main.say(f"The eval {found['status']}: {error.get('message', '')}".strip(), "red")
        raise typer.Exit(1)


def _follow(api: JobsClient, found: dict[str, Any], interval: float) -> dict[str, Any]:
    """Poll the eval (reads retried as the jobs client retries them) until it ends."""
    from app import cli as main

    shown = None
    while found["status"] not in FINISHED:
        time.sleep(interval)
        found = dict(api.call("GET", f"{EVALS}/{found['id']}"))
        progress = found["progress"]
        now = (found["status"], progress["completions_done"])
        if now != shown:
            shown = now
            main.say(
                f"{found['status']}: {progress['completions_done']}/"
                f"{progress['completions_total'] or '?'} answers",
                "dim",
            )
    return found
