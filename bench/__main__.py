"""`python -m bench [--quick] [--peer litellm] [--only SCENARIO ...] [--write-results]`

Starts Ferry's real processes (fake provider, migrate, api, workers, sweeper) with the bench's
own namespace and database, drives them with open- and closed-loop load generators, stops
everything, and prints the figures (progress on stderr, the table on stdout).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import time

from bench import wrk
from bench.context import Bench
from bench.db import BenchDB, drop_database, with_database
from bench.howto import HOW_MEASURED
from bench.peer import LiteLLM
from bench.procs import PROJECT_ROOT, Processes, progress, raise_fd_limit
from bench.profile import Profiler
from bench.report import Report
from bench.scenarios import SCENARIOS
from bench.stack import BASE_ENV, FerryStack

BENCH_DIR = PROJECT_ROOT / "bench"
LOG_DIR = BENCH_DIR / ".logs"
RESULTS = BENCH_DIR / "RESULTS.md"
DATABASE = "ferry_bench"  # fixed (per --name): what a killed run left is removed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="short runs (5 s windows, fewer jobs and rows) to check the harness")
    parser.add_argument("--peer", choices=["litellm"],
                        help="also run scenarios 1 and 2 through this gateway")
    parser.add_argument("--peer-workers", type=int, default=2,
                        help="LiteLLM worker processes (default 2, one per core here)")
    parser.add_argument("--only", nargs="+", choices=list(SCENARIOS), metavar="SCENARIO",
                        help=f"run only these scenarios ({', '.join(SCENARIOS)})")
    parser.add_argument("--workers", type=int, default=2,
                        help="workers serving the sync and stream scenarios (default 2)")
    parser.add_argument("--driver", choices=["auto", "wrk", "python"], default="auto",
                        help="closed-loop (saturation) load generator: wrk (apt-get install "
                             "wrk) or the Python one; auto = wrk if installed")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy the api during the saturation runs (scenarios 1 and 3)")
    parser.add_argument("--ferry-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for every Ferry process of the run (repeatable), e.g. "
                             "FERRY_ADMISSION_TARGET=0.05; the report lists it")
    parser.add_argument("--write-results", action="store_true",
                        help=f"write {RESULTS.relative_to(PROJECT_ROOT)}")
    parser.add_argument("--database-url",
                        default=os.environ.get("DATABASE_URL",
                                               "postgresql://postgres@127.0.0.1:5432/postgres"),
                        help="server to create the bench database on (its database part is "
                             "replaced by --name)")
    parser.add_argument("--name", default=DATABASE,
                        help="the bench's database and namespace (default %(default)s); give "
                             "two runs sharing the services different names")
    parser.add_argument("--amqp-url",
                        default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    args = parser.parse_args(argv)
    for setting in args.ferry_env:
        name, equals, _ = setting.partition("=")
        if not equals or not name.startswith("FERRY_"):
            parser.error(f"--ferry-env {setting!r}: give FERRY_NAME=VALUE")
    if args.driver == "wrk" and not wrk.available():
        parser.error("--driver wrk: wrk is not installed (apt-get install wrk)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    shutil.rmtree(LOG_DIR, ignore_errors=True)
    LOG_DIR.mkdir(parents=True)
    procs = Processes(LOG_DIR)

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT too: a shell starting the bench in the background would have it ignored.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        return asyncio.run(run(args, procs))
    except KeyboardInterrupt:
        progress("interrupted; stopping every process")
        return 130
    finally:
        procs.stop_all(timeout=5)


async def run(args: argparse.Namespace, procs: Processes) -> int:
    report = Report(quick=args.quick)
    BASE_ENV.update(setting.split("=", 1) for setting in args.ferry_env)
    admin_dsn = with_database(args.database_url, "postgres")
    database_url = with_database(args.database_url, args.name)
    namespace = args.name.replace("_", "-")
    stack = FerryStack(procs, namespace, database_url, args.amqp_url)
    selected = args.only or list(SCENARIOS)
    report.context.update({
        "Ferry processes": f"api ×1, workers ×{args.workers} for sync/stream (as stated per "
                           "figure elsewhere), fake provider ×1; RabbitMQ and PostgreSQL shared "
                           "with the rest of the machine",
        "Ferry environment": ", ".join(f"{k}={v}" for k, v in BASE_ENV.items()
                                       if k.startswith("FERRY_")) + ", defaults otherwise",
        "scenarios": " ".join(selected),
        "logs": str(LOG_DIR.relative_to(PROJECT_ROOT)),
    })
    progress(f"namespace {namespace}, database {args.name}, logs in {LOG_DIR}")
    await drop_database(admin_dsn, args.name)
    await stack.delete_topology()
    db: BenchDB | None = None
    failure: BaseException | None = None
    try:
        await stack.start()
        progress(f"Ferry up: api {stack.api_url}, fake provider {stack.fake_url}")
        db = await BenchDB.connect(database_url)
        peer = None
        if args.peer == "litellm":
            peer = LiteLLM(procs, stack.fake_url, workers=args.peer_workers)
            await peer.start()
            report.context["peer"] = (f"LiteLLM {peer.version} proxy, `--num_workers "
                                      f"{peer.workers}`, `POST /v1/messages`")
            progress(f"LiteLLM {peer.version} up at {peer.url}")
        profiler = Profiler(procs, LOG_DIR) if args.profile else None
        if profiler is not None and not profiler.available():
            progress("py-spy not found next to this Python; --profile ignored")
            profiler = None
        use_wrk = args.driver == "wrk" or (args.driver == "auto" and wrk.available())
        report.context["closed-loop driver"] = (
            "wrk (C, 2 threads)" if use_wrk else "Python generator (wrk not installed)")
        bench = Bench(procs, stack, db, report, args.quick, args.workers, peer, profiler,
                      use_wrk)
        for name in selected:
            started = time.monotonic()
            progress(f"=== scenario {name}")
            if name not in ("sync", "stream"):
                stack.stop_workers()
            await SCENARIOS[name](bench)
            progress(f"=== {name} done in {time.monotonic() - started:.0f} s")
        if profiler is not None:
            for summary in profiler.summaries:
                report.note(summary.replace("\n", "\n  "))
    except BaseException as exc:  # noqa: B036 - noted, then re-raised
        failure = exc
        report.note(f"**run incomplete**: {type(exc).__name__}: {exc}")
        raise
    finally:
        await _shutdown(stack, procs, db, admin_dsn, args.name)
        print(report.environment() + "\n" + report.markdown(), flush=True)
        if args.write_results and failure is None:
            report.write_results(RESULTS, HOW_MEASURED)
            progress(f"wrote {RESULTS}")
    return 0


async def _shutdown(stack: FerryStack, procs: Processes, db: BenchDB | None,
                    admin_dsn: str, database: str) -> None:
    progress("stopping every process")
    procs.stop_all()
    try:
        if db is not None:
            await db.close()
        await stack.delete_topology()
        await drop_database(admin_dsn, database)
    except Exception as exc:  # noqa: BLE001 - best effort; the processes are already gone
        progress(f"cleanup: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
