"""The `ferry` command: one entry point, a subcommand per process."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys

from pydantic import ValidationError

from shared.broker import TopologyMismatch
from shared.errors import FerryError
from shared.logging import configure_logging
from shared.migrate import SchemaOutOfDate
from shared.providers import ProviderConfigError
from shared.settings import Settings

FAKE_PROVIDER_PORT = 8090


def _migrate(settings: Settings) -> None:
    from shared.migrate import migrate

    asyncio.run(migrate(settings.database_url))


def _dev(settings: Settings, workers: int) -> int:
    """Everything at once for a local run, supervised by honcho."""
    from honcho.manager import Manager

    _migrate(settings)
    env = dict(os.environ)
    me = [sys.executable, "-m", "shared.cli"]
    manager = Manager()
    if settings.anthropic_api_key is None:
        env["ANTHROPIC_BASE_URL"] = f"http://127.0.0.1:{FAKE_PROVIDER_PORT}"
        manager.add_process(
            "fake-provider", shlex.join([*me, "fake-provider", "--port", str(FAKE_PROVIDER_PORT)]),
            env=env,
        )
    manager.add_process("api", shlex.join([*me, "api"]), env=env)
    # Each process serves /metrics on its own port: workers 9101.., the sweeper 9100.
    base_port = settings.metrics_port
    for i in range(1, workers + 1):
        port = str(base_port + i if base_port else 0)
        manager.add_process(f"worker.{i}", shlex.join([*me, "worker"]),
                            env={**env, "FERRY_METRICS_PORT": port})
    manager.add_process("sweeper", shlex.join([*me, "sweeper"]),
                        env={**env, "FERRY_METRICS_PORT": str(base_port)})
    manager.loop()
    return manager.returncode or 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ferry", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="create the database if missing and apply migrations")
    sub.add_parser("api", help="run the HTTP front door")
    sub.add_parser("worker", help="run a worker that executes jobs")
    sub.add_parser("sweeper", help="delete expired results periodically")
    fake = sub.add_parser("fake-provider", help="run the fake Anthropic/OpenAI upstream")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=FAKE_PROVIDER_PORT)
    dev = sub.add_parser("dev", help="migrate, then run api, workers, sweeper (and the fake "
                                     "provider when no ANTHROPIC_API_KEY is set)")
    dev.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    if args.command == "fake-provider":
        from fakeprovider.server import run

        run(args.host, args.port)
        return 0

    try:
        settings = Settings()
    except ValidationError as exc:
        return _fail(args.command, _settings_problem(exc))
    configure_logging(settings.log_format, settings.log_level)
    try:
        return _run(args, settings)
    except StartupError as exc:
        return _fail(args.command, str(exc))
    except FerryError as exc:
        return _fail(args.command, exc.message)
    except OSError as exc:  # e.g. the port is taken
        return _fail(args.command, f"{exc.strerror or exc} (check FERRY_HOST / FERRY_PORT)")


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "migrate":
        _migrate(settings)
    elif args.command == "api":
        from api.app import run as run_api

        run_api(settings)
    elif args.command == "worker":
        from worker.main import run_worker

        run_worker(settings)
    elif args.command == "sweeper":
        from worker.main import run_sweeper

        run_sweeper(settings)
    elif args.command == "dev":
        return _dev(settings, args.workers)
    return 0


# Start-up failures an operator fixes by configuration: one line, no traceback.
StartupError = (SchemaOutOfDate, TopologyMismatch, ProviderConfigError)


def _fail(command: str, message: str) -> int:
    print(f"ferry {command}: {message}", file=sys.stderr)
    return 1


def _settings_problem(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in error["loc"]) or "settings"
    return f"invalid setting {where.upper()}: {error['msg']}"


if __name__ == "__main__":
    sys.exit(main())
