"""`meterline replay`: rebuild usage windows of a time range from Kafka; re-publish dead letters.

`meterline replay --from T1 --to T2 ...` runs the group's callback (no sub-command);
`meterline replay dlq` is the one sub-command.
"""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Annotated, Any

import typer

from meterline.output import cli_errors, fail, print_json, print_table

app = typer.Typer(
    invoke_without_command=True,
    help="Rebuild usage_records windows in [--from, --to) from the events topic.",
)


def _instant(value: str, option: str) -> datetime:
    """An RFC 3339 instant; InvalidInput (one line, JSON under --json) rather than typer's
    BadParameter, which prints a usage box even under --json."""
    from shared.errors import InvalidInput
    from shared.events import parse_timestamp

    try:
        return parse_timestamp(value)
    except ValueError as exc:
        raise InvalidInput(f"{option}: {exc} (e.g. 2026-11-24T10:00:00Z)") from None


@app.callback()
def replay_range(
    ctx: typer.Context,
    from_: Annotated[
        str | None,
        typer.Option("--from", help="Range start, RFC 3339 (inclusive; widened to its window)."),
    ] = None,
    to: Annotated[
        str | None,
        typer.Option("--to", help="Range end, RFC 3339 (exclusive; widened to its window)."),
    ] = None,
    organization: Annotated[
        str | None, typer.Option("--organization", help="Only this organization's id.")
    ] = None,
    metric: Annotated[str | None, typer.Option("--metric", help="Only this metric.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Compute and print the changes; write nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Replay [--from, --to): every window in range ends equal to its distinct accepted events."""
    if ctx.invoked_subcommand is not None:
        return
    if from_ is None or to is None:
        raise fail(
            "both --from and --to are required (or use `meterline replay dlq`)", as_json=as_json
        )
    with cli_errors(as_json):
        import uuid

        from meterline.commands.context import engine, settings
        from services.aggregator.replay import ReplayRequest, replay
        from services.aggregator.topic_reader import KafkaTopicReader
        from shared.errors import InvalidInput

        try:
            organization_id = uuid.UUID(organization) if organization else None
        except ValueError:
            raise InvalidInput(f"--organization: {organization!r} is not an id") from None
        request = ReplayRequest(
            start=_instant(from_, "--from"),
            end=_instant(to, "--to"),
            organization_id=organization_id,
            metric=metric,
            dry_run=dry_run,
        )
        config = settings()
        reader = KafkaTopicReader(config, config.events_topic)
        try:
            report = _with_progress(
                lambda on_record, on_total, on_slice: replay(
                    engine(),
                    config,
                    reader,
                    request,
                    now=datetime.now().astimezone(),
                    on_record=on_record,
                    on_total=on_total,
                    on_slice=on_slice,
                ),
                quiet=as_json,
            )
        finally:
            reader.close()
        _print_report(report, as_json)


def _with_progress(run: Any, *, quiet: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = Console(file=sys.stderr)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        disable=quiet or not console.is_terminal,
        transient=True,
    ) as progress:
        # Records read (phase 1, then each slice's tail), then slices of the range rebuilt.
        records = progress.add_task("records read", total=0)
        slices = progress.add_task("slices rebuilt", total=None, visible=False)

        def on_total(more: int) -> None:
            progress.update(records, total=(progress.tasks[records].total or 0) + more)

        def on_slice(done: int, total: int) -> None:
            progress.update(slices, completed=done, total=total, visible=True)

        return run(lambda: progress.advance(records), on_total, on_slice)


def _print_report(report: Any, as_json: bool) -> None:
    from services.aggregator.replay import change_document

    if as_json:
        print_json(
            {
                "from": report.start,
                "to": report.end,
                "organization_id": report.organization_id,
                "metric": report.metric,
                "dry_run": report.dry_run,
                "records_read": report.records_read,
                "events_counted": report.events_counted,
                "events_recorded": report.events_recorded,
                "windows_changed": report.windows_changed,
                "meter_windows_changed": report.meter_windows_changed,
                "meter_values_changed": report.meter_values_changed,
                "slices": report.slices,
                "changes": [change_document(c) for c in report.changes],
                "skipped": [
                    {
                        "partition": skipped.partition,
                        "offset": skipped.offset,
                        "organization_id": skipped.organization_id,
                        "event_id": skipped.event_id,
                        "reason": skipped.reason,
                    }
                    for skipped in report.skipped
                ],
            }
        )
        return
    for skipped in report.skipped:
        typer.echo(f"warning: {skipped.line()}", err=True)
    mode = "dry run: nothing written" if report.dry_run else "applied"
    typer.echo(
        f"replayed [{report.start.isoformat()}, {report.end.isoformat()}) ({mode}): "
        f"{report.records_read} records read, {report.events_counted} distinct events in range, "
        f"{report.windows_changed} windows changed in {report.slices} slices"
        + (
            f", {report.meter_windows_changed} meter windows and "
            f"{report.meter_values_changed} distinct values changed"
            if report.meter_windows_changed or report.meter_values_changed
            else ""
        )
        + (f", {len(report.skipped)} events skipped (above)" if report.skipped else "")
    )
    if report.changes:
        print_table(
            [
                "metric",
                "quantity before",
                "quantity after",
                "events before",
                "events after",
                "windows changed",
            ],
            [
                [
                    c.metric,
                    c.quantity_before,
                    c.quantity_after,
                    c.events_before,
                    c.events_after,
                    c.windows_changed,
                ]
                for c in report.changes
            ],
        )


@app.command("dlq")
def replay_dlq(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be re-published; send nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Re-publish dead letters with a retryable reason (unknown version, unknown reference,
    database refusal) to the events topic; the others are counted by reason and left."""
    with cli_errors(as_json):
        from meterline.commands.context import settings
        from services.aggregator.dlq_replay import replay_dead_letters

        report = replay_dead_letters(settings(), dry_run=dry_run)
    document = {
        "dry_run": report.dry_run,
        "read": report.read,
        "republished": report.republished,
        "skipped": dict(report.skipped),
        "refused": [
            {
                "partition": refused.partition,
                "offset": refused.offset,
                "event_id": refused.event_id,
                "reason": refused.reason,
            }
            for refused in report.refused
        ],
    }
    if as_json:
        print_json(document)
        return
    for refused in report.refused:
        typer.echo(f"warning: {refused.line()}", err=True)
    verb = "would re-publish" if dry_run else "re-published"
    skipped = ", ".join(f"{code}: {n}" for code, n in sorted(report.skipped.items())) or "none"
    typer.echo(f"{report.read} dead letters read, {verb} {report.republished}; left: {skipped}")
