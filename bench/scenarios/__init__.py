"""The scenarios, by the name `--only` takes, in the order they run."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from bench.context import Bench
from bench.scenarios.batches import run_batches
from bench.scenarios.capacity import run_capacity
from bench.scenarios.faults import run_faults
from bench.scenarios.interactive import run_stream, run_sync
from bench.scenarios.jobs import run_jobs
from bench.scenarios.longpoll import run_longpoll
from bench.scenarios.pacing import run_pacing
from bench.scenarios.submit import run_submit
from bench.scenarios.sweeper import run_sweeper

SCENARIOS: dict[str, Callable[[Bench], Awaitable[None]]] = {
    "sync": run_sync,
    "stream": run_stream,
    "submit": run_submit,
    "jobs": run_jobs,
    "longpoll": run_longpoll,
    "sweeper": run_sweeper,
    "batches": run_batches,
    "faults": run_faults,
    "pacing": run_pacing,
    "capacity": run_capacity,
}
