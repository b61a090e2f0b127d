"""`ferry webhooks add|list|rotate|disable|enable|remove`: the endpoints async jobs may name
(`x-bf-async-webhook: NAME`). `add` and `rotate` print the signing secret as the last line of
their output."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from typing import Any

from shared.migrate import require_schema
from shared.settings import Settings
from shared.store import Store
from shared.webhooks import check_name, check_url, new_secret, rfc3339
from shared.webhookstore import EndpointExists, EndpointReport, NoSuchEndpoint, WebhookStore

ROTATION_GRACE_HOURS = 24.0


def add_parser(sub: Any, epilog: str) -> None:
    hooks = sub.add_parser("webhooks", help="manage webhook endpoints (x-bf-async-webhook)",
                           description=__doc__, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = hooks.add_subparsers(dest="verb", required=True)
    add = verbs.add_parser("add", help="register an endpoint; prints its signing secret last")
    add.add_argument("name", help="what submits name in x-bf-async-webhook")
    add.add_argument("url", help="http:// or https:// URL the deliveries are POSTed to")
    add.add_argument("--include-response", action="store_true",
                     help="put the job's response (or error) inline in the payload")
    add.add_argument("--key", action="append", default=[], metavar="KEY_NAME",
                     help="only jobs of this gateway key may name the endpoint (repeatable; "
                          "default: any caller)")
    verbs.add_parser("list", help="endpoints, with their last delivery, failures in the last "
                                  "24 h and deliveries pending")
    rotate = verbs.add_parser("rotate", help="a new signing secret (printed last); the old "
                                             "one signs too for a grace period")
    rotate.add_argument("name")
    rotate.add_argument("--grace-hours", type=float, default=ROTATION_GRACE_HOURS,
                        metavar="HOURS", help="how long the old secret also signs "
                                              f"(default {ROTATION_GRACE_HOURS:g})")
    for verb, what in (("disable", "refuse submits naming it and send it nothing (pending "
                                   "deliveries fail when due)"),
                       ("enable", "accept it again"),
                       ("remove", "disable and hide it; its pending deliveries fail, its "
                                  "history stays")):
        verbs.add_parser(verb, help=what).add_argument("name")


def run(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_run(args, settings))


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    store = await Store.connect(settings.database_url, min_size=1, max_size=1,
                                timeout_s=settings.db_connect_timeout_s)
    try:
        await require_schema(store)
        try:
            return await _verb(args, WebhookStore(store))
        except (EndpointExists, NoSuchEndpoint, ValueError) as exc:
            print(f"ferry webhooks {args.verb}: {exc.args[0]}", file=sys.stderr)
        return 1
    finally:
        await store.close()


async def _verb(args: argparse.Namespace, hooks: WebhookStore) -> int:
    if args.verb == "list":
        reports = await hooks.report()
        if not reports:
            print("no webhook endpoints (add one with `ferry webhooks add NAME URL`)")
        for report in reports:
            print(_line(report))
        return 0
    if args.verb == "add":
        secret = new_secret()
        endpoint = await hooks.add(check_name(args.name), check_url(args.url), secret,
                                   args.include_response, args.key)
        keys = ",".join(endpoint.keys) or "any caller"
        print(f"added webhook endpoint {endpoint.name} -> {endpoint.url} (keys: {keys}, "
              f"response inline: {'yes' if endpoint.include_response else 'no'}); "
              "its signing secret:")
        print(secret)
        return 0
    if args.verb == "rotate":
        if not 0 <= args.grace_hours <= 24 * 30:
            raise ValueError("--grace-hours is between 0 and 720")
        secret = new_secret()
        endpoint = await hooks.rotate(args.name, secret, args.grace_hours * 3600)
        until = rfc3339(endpoint.previous_until) if endpoint.previous_until else "now"
        print(f"rotated the secret of {endpoint.name}; the previous one also signs until "
              f"{until}. The new signing secret:")
        print(secret)
        return 0
    if args.verb in ("disable", "enable"):
        endpoint = await hooks.set_enabled(args.name, args.verb == "enable")
        print(f"{endpoint.name} {args.verb}d")
        return 0
    endpoint, failed = await hooks.remove(args.name)
    print(f"removed {endpoint.name}; {failed} pending deliveries to it failed")
    return 0


def _line(report: EndpointReport) -> str:
    e = report.endpoint
    if report.last_at is None:
        last = "never"
    else:
        age = (datetime.now(UTC) - report.last_at).total_seconds()
        outcome = report.last_state or "?"
        if report.last_state != "delivered" and (report.last_status or report.last_error):
            detail = f"HTTP {report.last_status}" if report.last_status else report.last_error
            outcome += f" ({str(detail)[:60]})"
        last = f"{_ago(age)} ago, {outcome}"
    return (f"{e.name}\t{e.url}\t{'enabled' if e.enabled else 'disabled'}\t"
            f"keys={','.join(e.keys) or '*'}\tresponse={'yes' if e.include_response else 'no'}"
            f"\tlast={last}\tfailed_24h={report.failed_24h}\tpending={report.pending}")


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"
