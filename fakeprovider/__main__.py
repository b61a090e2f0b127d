"""`python -m fakeprovider --host H --port P`: run the fake provider in the foreground.

The rate limit comes from the environment: FAKE_PROVIDER_RPS, FAKE_PROVIDER_BURST and
FAKE_PROVIDER_KEY_LIMITS (see docs/fake-provider.md).
"""

from __future__ import annotations

import argparse

from fakeprovider.ratelimit import ConfigError
from fakeprovider.server import run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fakeprovider", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args(argv)
    try:
        run(args.host, args.port)
    except ConfigError as exc:
        parser.exit(2, f"fakeprovider: {exc}\n")


if __name__ == "__main__":
    main()
