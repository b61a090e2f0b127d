"""The figures: collected as rows, printed as Markdown tables, written to bench/RESULTS.md."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.load import LoadResult


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "–"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def pct_ms(sorted_s: list[float], pct: float) -> float | None:
    """The `pct` percentile (nearest rank) of ascending seconds, in ms; None if empty."""
    if not sorted_s:
        return None
    return sorted_s[min(len(sorted_s) - 1, round(pct / 100 * (len(sorted_s) - 1)))] * 1000


def fmt_rate(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def fmt_s(seconds: float) -> str:
    return f"{seconds:g} s"


@dataclass
class LatencyRow:
    scenario: str
    target: str
    load: str
    duration: str
    ok: int
    errors: str
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None
    achieved: str
    how: str
    compare: str = ""
    cpu: str = ""


@dataclass
class Figure:
    scenario: str
    figure: str
    value: str
    load: str
    duration: str
    how: str


@dataclass
class Report:
    quick: bool
    latency: list[LatencyRow] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    load_before: str = field(default_factory=lambda: _loadavg())
    context: dict[str, str] = field(default_factory=dict)

    def add_load(self, scenario: str, result: LoadResult, how: str, which: str = "latency",
                 target: str | None = None, cpu: str = "") -> LatencyRow:
        errors = ", ".join(f"{k}×{v}" for k, v in sorted(result.errors.items())) or "0"
        duration = fmt_s(result.duration) if result.total is None else \
            f"{result.span_s:.1f} s (n={result.total})"
        if result.warmup:
            duration += f" (+{result.warmup:g} s warm-up)"
        row = LatencyRow(
            scenario=scenario, target=target or result.target, load=result.describe_load(),
            duration=duration, ok=result.ok, errors=errors,
            p50=result.ms(50, which), p90=result.ms(90, which), p99=result.ms(99, which),
            max=result.ms(100, which), achieved=_achieved(result),
            how=how, cpu=cpu,
        )
        self.latency.append(row)
        return row

    def figure(self, scenario: str, figure: str, value: str, load: str, duration: str,
               how: str) -> None:
        self.figures.append(Figure(scenario, figure, value, load, duration, how))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def markdown(self) -> str:
        out = []
        if self.latency:
            out.append("### Latency (ms)\n")
            out.append("| scenario | target | load | duration | ok | errors | p50 | p90 | p99 "
                       "| max | achieved | compare | how measured | CPU during run (cores) |")
            out.append("|---|---|---|---|--:|---|--:|--:|--:|--:|--:|---|---|---|")
            for r in self.latency:
                out.append(
                    f"| {r.scenario} | {r.target} | {r.load} | {r.duration} | {r.ok} "
                    f"| {r.errors} | {fmt_ms(r.p50)} | {fmt_ms(r.p90)} | {fmt_ms(r.p99)} "
                    f"| {fmt_ms(r.max)} | {r.achieved} | {r.compare} | {r.how} | {r.cpu} |")
        if self.figures:
            out.append("\n### Figures\n")
            out.append("| scenario | figure | value | load | duration | how measured |")
            out.append("|---|---|--:|---|---|---|")
            for f in self.figures:
                out.append(f"| {f.scenario} | {f.figure} | {f.value} | {f.load} | {f.duration} "
                           f"| {f.how} |")
        if self.notes:
            out.append("\n### Notes\n")
            out.extend(f"- {n}" for n in self.notes)
        return "\n".join(out) + "\n"

    def environment(self) -> str:
        lines = [
            f"- date: {self.started}",
            (f"- machine: {os.cpu_count()} cores (`nproc`), {_mem_gib()} GiB memory, "
             f"{platform.platform()}"),
            f"- Python: {platform.python_version()} ({platform.python_implementation()})",
            f"- load average before the run: {self.load_before}; after: {_loadavg()}",
            f"- mode: {'--quick' if self.quick else 'full'}",
        ]
        lines += [f"- {k}: {v}" for k, v in self.context.items()]
        return "\n".join(lines) + "\n"

    def write_results(self, path: Path, how_measured: str) -> None:
        warning = ("**A `--quick` run: it checks the harness; its figures are not ones to "
                   "quote.**\n\n") if self.quick else ""
        path.write_text(
            "# Ferry benchmark results\n\n"
            "Written by `python -m bench --write-results`; rerun it to refresh.\n\n" + warning
            + "## Environment\n\n" + self.environment() + "\n## Results\n\n" + self.markdown()
            + "\n## How measured\n\n" + how_measured
        )


def _achieved(result: LoadResult) -> str:
    text = f"{fmt_rate(result.achieved_rps)}/s"
    if result.over_capacity:
        text += " **over capacity**"
    return text


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _mem_gib() -> str:
    try:
        kb = int(Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1])
        return f"{kb / 1024 / 1024:.0f}"
    except (OSError, ValueError, IndexError):
        return "?"
