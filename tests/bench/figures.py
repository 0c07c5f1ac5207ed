"""The headline figures of one `make bench` run, printed at its end as one line `BENCH {json}`.

Each benchmark records what it measured (`record(name=value)`); `bench_line()` adds the ratios
between figures of the same run, so that a reader (or a script comparing two commits) takes the
ratios first. A figure a run did not measure is absent from the line, and so is every ratio that
needs it: a benchmark run alone prints its own figures only.
"""

from __future__ import annotations

import json

_measured: dict[str, float] = {}

# name of the ratio: (numerator, denominator), both figures of the same run.
RATIOS = {
    "ingest_per_raw": ("ingest_requests_per_s", "raw_producer_records_per_s"),
    "aggregator_per_ingest": ("aggregator_events_per_s", "ingest_events_per_s"),
    "aggregator1_per_ingest1": ("aggregator1_events_per_s", "ingest1_events_per_s"),
    "e2e_per_ingest": ("e2e_events_per_s", "ingest_events_per_s"),
    "e2e2_per_e2e": ("e2e2_events_per_s", "e2e_events_per_s"),
    "metered_per_plain": ("metered_events_per_s", "aggregator_events_per_s"),
    "storm_per_fresh": ("storm_events_per_s", "storm_fresh_events_per_s"),
}


def record(**figures: float) -> None:
    """Keep figures of this run (a later value of the same name replaces the earlier one)."""
    _measured.update({name: float(value) for name, value in figures.items()})


def measured(name: str) -> float | None:
    return _measured.get(name)


def _rounded(value: float) -> float:
    """Shares and ratios keep three decimals, rates and times one."""
    return round(value, 3) if abs(value) < 10 else round(value, 1)


def bench_line() -> str:
    line: dict[str, float] = {k: _rounded(v) for k, v in sorted(_measured.items())}
    for name, (numerator, denominator) in RATIOS.items():
        if _measured.get(numerator) is not None and _measured.get(denominator):
            line[name] = round(_measured[numerator] / _measured[denominator], 3)
    return "BENCH " + json.dumps(line, sort_keys=True)
