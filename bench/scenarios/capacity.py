"""Scenario 11: per-component ceilings, and what they mean at 10x and 100x (docs/scaling.md).

Three phases on the bench's stack, each measured for the CPU every process used:
1. submits only (no worker running): N durable async submits, closed loop;
2. the same N jobs drained by 2 workers (zero-latency upstream);
3. sync requests, closed loop, 2 workers.
From these: CPU milliseconds per request for the api, the workers, RabbitMQ and PostgreSQL;
WAL bytes and stored bytes per job. The projection multiplies them out for target rates, at
70 % utilisation, into api and worker processes (one core each: each is one asyncio loop),
RabbitMQ and PostgreSQL cores, and the single-queue and single-primary limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench.context import Bench
from bench.cpu import CpuUse
from bench.load import Target
from bench.procs import progress
from bench.scenarios.jobs import _submit, _wait
from bench.stack import ferry_headers, sync_body

UTILISATION = 0.7
# Async jobs per second (submitted and run): 1 M jobs an hour, then 10x and 100x that, and the
# issue's 10,000 submits/s.
TARGETS = (278, 2_780, 10_000, 27_800)
SYNC_CONNECTIONS = 64


@dataclass(frozen=True)
class Costs:
    """CPU milliseconds per request by component, and the rate they were measured at."""

    rate: float  # requests/s the phase achieved
    ms: dict[str, float]


def _per_request(cpu: CpuUse, count: int) -> Costs:
    rate = count / cpu.wall_s if cpu.wall_s else 0.0
    groups = {"api": "api", "workers": "workers", "rabbitmq": "rabbitmq",
              "postgres": "postgres(all)"}
    ms = {name: cpu.cores.get(key, 0.0) / rate * 1000 if rate else 0.0
          for name, key in groups.items()}
    return Costs(rate, ms)


async def run_capacity(b: Bench) -> None:
    scenario = "11 capacity"
    count = 4000 if b.quick else 20_000
    b.stack.stop_workers()
    await b.reset()
    await b.settle()
    wal0 = await b.db.wal_bytes()
    submitted, submit_cpu = await b.measured(lambda: _submit(b, scenario, "capacity", count))
    wal1 = await b.db.wal_bytes()
    submit = _per_request(submit_cpu, submitted.ok)
    progress(f"{scenario}: {submitted.ok} submits at {submit.rate:.0f}/s; draining")

    async def drain() -> None:
        await b.stack.start_workers(2, wait_interactive=False)
        await _wait(b, submitted.ok, timeout_s=600)

    _, run_cpu = await b.measured(drain)
    wal2 = await b.db.wal_bytes()
    span = await b.db.async_job_span()
    run_seconds = (span.last_completed or 0) - (span.first_started or 0)
    run = _per_request(run_cpu, submitted.ok)
    # The drain's wall clock includes the workers' start; the jobs table's span does not.
    run_rate = span.count / run_seconds if run_seconds > 0 else run.rate
    stored = await b.db.bytes_per_job()
    await b.stack.wait_worker_ready()
    await b.settle()
    sync_target = Target("ferry", f"{b.stack.api_url}/anthropic/v1/messages", sync_body(),
                         ferry_headers())
    sync_result, sync_cpu = await b.measured(lambda: b.closed(
        scenario, sync_target, SYNC_CONNECTIONS, "", duration=b.seconds(10, 4), record=False))
    sync = _per_request(sync_cpu, sync_result.ok)

    jobs = max(submitted.ok, 1)
    wal_per_job = (wal2 - wal0) / jobs
    wal_split = f"{(wal1 - wal0) / jobs / 1024:.1f} + {(wal2 - wal1) / jobs / 1024:.1f} KiB"
    job_ms = {k: submit.ms[k] + run.ms[k] for k in submit.ms}
    how = ("CPU ticks of each process group over the phase (/proc), divided by the requests "
           "it completed; PostgreSQL and RabbitMQ are shared with the rest of the machine")
    b.report.figure(scenario, "async submit: ms of CPU per submit (api / RabbitMQ / PostgreSQL)",
                    _ms(submit, "api", "rabbitmq", "postgres"),
                    f"{submitted.ok} submits, closed loop 64 conns, no worker",
                    f"{submit_cpu.wall_s:.1f} s", how + f"; {submit.rate:.0f} submits/s")
    b.report.figure(scenario, "async run: ms of CPU per job (workers / RabbitMQ / PostgreSQL)",
                    _ms(run, "workers", "rabbitmq", "postgres"),
                    f"{submitted.ok} queued jobs drained by 2 workers, upstream 0 ms",
                    f"{run_seconds:.1f} s", how + f"; {run_rate:.0f} jobs/s in the jobs table")
    b.report.figure(scenario, "sync: ms of CPU per request (api / workers / RabbitMQ / "
                    "PostgreSQL)", _ms(sync, "api", "workers", "rabbitmq", "postgres"),
                    f"closed loop {SYNC_CONNECTIONS} conns, 2 workers, upstream 0 ms",
                    f"{sync_cpu.wall_s:.1f} s", how + f"; {sync.rate:.0f} requests/s")
    b.report.figure(scenario, "WAL per async job (submit + run); bytes stored per finished job",
                    f"{wal_per_job / 1024:.1f} KiB ({wal_split}); {stored / 1024:.1f} KiB",
                    f"{submitted.ok} jobs", "",
                    "pg_stat_wal.wal_bytes before and after (cluster-wide); "
                    "pg_total_relation_size of jobs, job_results, job_payloads / rows")
    for target in TARGETS:
        b.report.figure(scenario, f"at {target:,} async jobs/s ({target * 3600 / 1e6:.1f} M "
                        "jobs/hour): what it takes", _projection(job_ms, wal_per_job, target),
                        "projection", "", f"the CPU per job above × the rate / "
                        f"{UTILISATION:.0%} utilisation; queue: one queue's work on one core")
    progress(f"{scenario}: per job {job_ms}, WAL {wal_per_job:.0f} B, stored {stored:.0f} B")
    b.stack.stop_workers()
    await b.reset()


def _ms(costs: Costs, *names: str) -> str:
    return " / ".join(f"{costs.ms[n]:.3f}" for n in names)


def _projection(job_ms: dict[str, float], wal_per_job: float, rate: float) -> str:
    def cores(name: str) -> float:
        return rate * job_ms[name] / 1000 / UTILISATION

    # One quorum queue's work runs on one Erlang process: at most one core per queue.
    queues = max(1, math.ceil(cores("rabbitmq")))
    return (f"api ×{math.ceil(cores('api'))}, workers ×{math.ceil(cores('workers'))}, "
            f"RabbitMQ {cores('rabbitmq'):.1f} cores (≥{queues} job queue(s)), "
            f"PostgreSQL primary {cores('postgres'):.1f} cores, "
            f"WAL {rate * wal_per_job / 2**20:.1f} MiB/s")
