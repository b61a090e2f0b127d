"""The `ferry` command: one entry point, a subcommand per process."""

from __future__ import annotations

import argparse
import asyncio
import sys
from importlib.metadata import PackageNotFoundError, version

from pydantic import ValidationError

from shared import keyscli, webhookscli
from shared.broker import TopologyMismatch
from shared.errors import FerryError
from shared.logging import configure_logging
from shared.migrate import SchemaOutOfDate
from shared.providers import ProviderConfigError
from shared.settings import Settings, env_help

FAKE_PROVIDER_PORT = 8090

# Start-up failures an operator fixes by configuration: one line, no traceback.
StartupError = (SchemaOutOfDate, TopologyMismatch, ProviderConfigError)


def _version() -> str:
    try:
        return version("ferry")
    except PackageNotFoundError:
        return "unknown"


def _migrate(settings: Settings, wait_s: float = 0.0) -> None:
    from shared.migrate import migrate_when_reachable

    asyncio.run(migrate_when_reachable(settings.database_url, wait_s))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferry", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ferry {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str, *groups: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text,
                              epilog=env_help(*groups),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    migrate = command("migrate", "create the database if missing and apply migrations",
                      "database")
    migrate.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                         help="keep trying this long while the database cannot be reached "
                              "(a container starting beside it)")
    command("api", "run the HTTP front door", "database", "broker", "api", "auth", "results",
            "batches", "providers", "logs")
    command("worker", "run a worker that executes jobs and delivers webhooks", "database",
            "broker", "worker", "webhooks", "providers", "logs")
    command("sweeper", "delete expired results and reconcile lost jobs", "database", "broker",
            "sweeper", "logs")
    fake = sub.add_parser("fake-provider", help="run the fake Anthropic/OpenAI upstream",
                          epilog="reads FAKE_PROVIDER_RPS, FAKE_PROVIDER_BURST, "
                                 "FAKE_PROVIDER_KEY_LIMITS (docs/fake-provider.md)")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=FAKE_PROVIDER_PORT)
    dev = command("dev", "migrate, then run the api, workers, the sweeper (and the fake "
                         "provider when no ANTHROPIC_API_KEY is set); creates a local key "
                         "on first run", "database", "broker", "api", "auth", "providers")
    dev.add_argument("--workers", type=int, default=2)
    dev.add_argument("--port", type=int, help="the api's port (default FERRY_PORT, 8080)")
    dev.add_argument("--fake-provider-port", type=int, default=FAKE_PROVIDER_PORT)
    dev.add_argument("--metrics-port", type=int,
                     help="first /metrics port of the workers and sweeper "
                          "(default FERRY_METRICS_PORT, 9100)")
    keyscli.add_parser(sub)
    webhookscli.add_parser(sub, env_help("database"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
    except OSError as exc:  # e.g. the port is taken, the database refused the connection
        return _fail(args.command, _os_problem(exc, settings))


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "migrate":
        _migrate(settings, args.wait)
    elif args.command == "api":
        from api.app import run as run_api

        run_api(settings)
    elif args.command == "worker":
        from worker.main import run_worker

        run_worker(settings)
    elif args.command == "sweeper":
        from worker.main import run_sweeper

        run_sweeper(settings)
    elif args.command == "keys":
        return keyscli.run(args, settings)
    elif args.command == "webhooks":
        return webhookscli.run(args, settings)
    elif args.command == "dev":
        from shared.devrun import run_dev

        return run_dev(settings, args)
    return 0


def _fail(command: str, message: str) -> int:
    print(f"ferry {command}: {message}", file=sys.stderr)
    return 1


def _settings_problem(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in error["loc"]) or "settings"
    return f"invalid setting {where.upper()}: {error['msg']}"


def _os_problem(exc: OSError, settings: Settings) -> str:
    text = exc.strerror or str(exc)
    if "Connect call failed" in str(exc) or isinstance(exc, ConnectionRefusedError):
        return f"cannot connect ({text}): check DATABASE_URL and AMQP_URL"
    if "address already in use" in text.lower():
        return f"port {settings.port} is in use: set FERRY_PORT (or stop what holds it)"
    return f"{text}: check FERRY_HOST / FERRY_PORT, DATABASE_URL and AMQP_URL"


if __name__ == "__main__":
    sys.exit(main())
