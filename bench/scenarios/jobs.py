"""Scenario 4: async jobs end to end. Throughput with 1 and 2 workers against a zero-latency
upstream, and 10,000 jobs in flight at once against a 5 s upstream. Timings come from the
jobs table itself (submitted_at, started_at, completed_at, all set by PostgreSQL's now())."""

from __future__ import annotations

import math

from bench.context import Bench
from bench.load import LoadResult, Target
from bench.procs import BenchError, peak_rss_mib, progress
from bench.report import fmt_rate
from bench.stack import async_headers, sync_body

SUBMIT_CONNECTIONS = 64
SLOW_DELAY_S = 5


def _submit_target(b: Bench, text: str) -> Target:
    return Target("ferry async submit", f"{b.stack.api_url}/anthropic/v1/messages",
                  sync_body(text), async_headers())


async def _submit(b: Bench, scenario: str, text: str, count: int) -> LoadResult:
    result = await b.closed(scenario, _submit_target(b, text), SUBMIT_CONNECTIONS, "",
                            total=count, record=False)
    if result.error_count:
        progress(f"  {result.error_count} submits failed: {result.errors}")
    return result


async def _wait(b: Bench, expected: int, timeout_s: float) -> dict[str, int]:
    counts = await b.db.wait_finished(expected, timeout_s)
    done = counts.get("completed", 0) + counts.get("failed", 0)
    if done < expected:
        raise BenchError(f"only {done} of {expected} jobs finished in {timeout_s:g} s: {counts}")
    if counts.get("failed"):
        progress(f"  {counts['failed']} jobs failed")
    return counts


async def run_jobs(b: Bench) -> None:
    scenario = "4 async jobs"
    count = 1000 if b.quick else 5000
    for workers in (1, 2):
        await _drain(b, scenario, count, workers)
        await _end_to_end(b, scenario, count, workers)
    await _in_flight(b, scenario, 2000 if b.quick else 10_000)
    b.stack.stop_workers()
    await b.reset()


async def _drain(b: Bench, scenario: str, count: int, workers: int) -> None:
    """Queue `count` jobs with no worker running, then start the workers: jobs/s from the
    first job started to the last completed."""
    b.stack.stop_workers()
    await b.reset()
    ok = (await _submit(b, scenario, "job", count)).ok
    progress(f"{scenario}: {ok} jobs queued; starting {workers} worker(s) to drain them")

    async def drain() -> None:
        await b.stack.start_workers(workers, wait_interactive=False)
        await _wait(b, ok, timeout_s=300)

    _, cpu = await b.measured(drain)
    span = await b.db.async_job_span()
    seconds = (span.last_completed or 0) - (span.first_started or 0)
    rate = span.count / seconds if seconds > 0 else 0.0
    b.report.figure(scenario, f"jobs/s, {workers} worker(s), queue drained",
                    f"{fmt_rate(rate)}/s", f"{span.count} jobs queued beforehand, "
                    f"FERRY_WORKER_CONCURRENCY=64, upstream 0 ms", f"{seconds:.2f} s",
                    "completed / (max completed_at − min started_at); CPU: "
                    + cpu.describe())


async def _end_to_end(b: Bench, scenario: str, count: int, workers: int) -> None:
    """Workers running while `count` jobs are submitted: first submit to last completion."""
    b.stack.stop_workers()
    await b.reset()
    await b.stack.start_workers(workers, wait_interactive=False)

    async def submit_and_wait() -> LoadResult:
        submitted = await _submit(b, scenario, "job", count)
        await _wait(b, submitted.ok, timeout_s=300)
        return submitted

    submitted, cpu = await b.measured(submit_and_wait)
    generator_cores = submitted.cpu_s * submitted.generators / cpu.wall_s
    span = await b.db.async_job_span()
    seconds = (span.last_completed or 0) - (span.first_submitted or 0)
    rate = span.count / seconds if seconds > 0 else 0.0
    b.report.figure(scenario, f"jobs/s, {workers} worker(s), submitted while running",
                    f"{fmt_rate(rate)}/s", f"{span.count} jobs, closed-loop "
                    f"{SUBMIT_CONNECTIONS} conns submitting, upstream 0 ms", f"{seconds:.2f} s",
                    "completed / (max completed_at − min submitted_at); CPU: "
                    + cpu.describe(generator_cores))


async def _in_flight(b: Bench, scenario: str, count: int) -> None:
    """`count` jobs against a 5 s upstream, all in flight at once over two workers."""
    b.stack.stop_workers()
    await b.reset()
    ok = (await _submit(b, scenario, f"[[fake:delay={SLOW_DELAY_S}]] slow job", count)).ok
    per_worker = math.ceil(ok / 2)
    progress(f"{scenario}: {ok} slow jobs queued; 2 workers, "
             f"FERRY_WORKER_CONCURRENCY={per_worker}")
    fake_pid = b.procs.get("fake-provider").pid
    fake_rss_before = peak_rss_mib(fake_pid)
    await b.stack.start_workers(2, {"FERRY_WORKER_CONCURRENCY": str(per_worker)},
                                wait_interactive=False)
    await _wait(b, ok, timeout_s=300)
    rss = b.stack.worker_peak_rss()
    span = await b.db.async_job_span()
    peak = await b.db.peak_in_flight()
    spread, run50, run99 = await b.db.pickup_and_run()
    seconds = (span.last_completed or 0) - (span.first_started or 0)
    load = (f"{span.count} jobs queued, upstream {SLOW_DELAY_S} s, 2 workers × "
            f"FERRY_WORKER_CONCURRENCY={per_worker}")
    b.report.figure(scenario, "total time, all jobs in flight at once",
                    f"{seconds:.2f} s", load, f"{seconds:.2f} s",
                    f"max completed_at − min started_at (ideal {SLOW_DELAY_S} s)")
    b.report.figure(scenario, "peak jobs in flight", str(peak), load, f"{seconds:.2f} s",
                    "max overlap of [started_at, completed_at] in the jobs table")
    b.report.figure(scenario, "started_at spread; completed − started p50 / p99",
                    f"{spread:.2f} s; {run50:.2f} / {run99:.2f} s", load, f"{seconds:.2f} s",
                    "from the jobs table: how long jobs waited to be picked up, and how long "
                    f"from pick-up to stored result (the upstream takes {SLOW_DELAY_S} s)")
    b.report.figure(scenario, "worker peak RSS", ", ".join(
        f"{v:.0f} MiB" if v else "?" for v in rss.values()), load, f"{seconds:.2f} s",
        "VmHWM of each worker from /proc/PID/status before it stops")
    fake_rss = peak_rss_mib(fake_pid)
    b.report.note(f"4 async jobs: the fake provider's peak RSS was {fake_rss_before or 0:.0f} "
                  f"MiB before the slow jobs and {fake_rss or 0:.0f} MiB after.")
