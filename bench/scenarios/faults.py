"""Scenario: faults. Runs the fault suite (tests/faults: worker and api kills, an api pause,
PostgreSQL and RabbitMQ stopped under load, the broker connection cut under waiting requests)
and reports, per fault, what Ferry's promise came to: jobs acknowledged, completed, lost,
duplicated upstream calls, and the time to recover. The suite starts its own stacks on a
private PostgreSQL cluster and RabbitMQ node, so the bench's stack is not used here."""

from __future__ import annotations

import asyncio
import re
import sys

from bench.context import Bench
from bench.procs import PROJECT_ROOT, progress

SCENARIO = "faults"
HOW = "tests/faults under pytest: real processes, faults injected under async load"
_LINE = re.compile(r"^FAULT (?P<fault>[^:]+): (?P<fields>.*)$")
_FIELD = re.compile(r"(\w+)=(\[[^\]]*\]|\S+)")


def parse(output: str) -> list[tuple[str, dict[str, str]]]:
    """The suite's `FAULT label: key=value ...` summary lines."""
    rows = []
    for line in output.splitlines():
        match = _LINE.match(line.strip().lstrip("."))
        if match:
            rows.append((match["fault"], dict(_FIELD.findall(match["fields"]))))
    return rows


async def run_faults(b: Bench) -> None:
    b.stack.stop_workers()
    progress("running the fault suite (about 3 minutes)")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pytest", "tests/faults", "-m", "faults", "-s", "-q",
        "-p", "no:cacheprovider", cwd=PROJECT_ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    output = out.decode(errors="replace")
    (b.procs.log_dir / "faults.log").write_text(output)
    rows = parse(output)
    for fault, f in rows:
        if "acknowledged" in f:
            value = (f"acknowledged {f['acknowledged']}, completed {f['completed']}, "
                     f"lost {f['lost']}, duplicated upstream calls {f['duplicated']} "
                     f"(max calls per job {f['max_calls']}), recovered in {f['recovered']}")
            load = f"async submits, {f['submitted']} sent; refused {f.get('refused', '-')}"
            duration = f"settled {f.get('settled', '?')}"
        elif "killed" in f:  # the cluster test's sync requests sent one after another
            value = (f"{f['ok']} of {f['requests']} sync requests answered 200, "
                     f"{f['unclean']} outside the envelope; nodes killed {f['killed']}; "
                     f"answering again {f['recovered_s']} s after each kill")
            load = "sync requests one after another while async submits run"
            duration = "-"
        else:
            value = (f"{f.get('answered_in_guard', '?')} of {f.get('requests', '?')} waiting "
                     f"requests answered, {f.get('clean', '?')} in the envelope, after "
                     f"{f.get('answered_after_s', '?')} s; recovered in {f.get('recovered')}")
            load = "sync/stream requests waiting on a 60 s upstream"
            duration = "-"
        b.report.figure(SCENARIO, fault, value, load, duration, HOW)
    verdict = "passed" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
    b.report.note(f"faults: the suite {verdict}; {len(rows)} summaries; its output is in "
                  f"{(b.procs.log_dir / 'faults.log').relative_to(PROJECT_ROOT)}")
