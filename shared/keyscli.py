"""`ferry keys create|list|update|revoke`: gateway keys from the command line. `create` prints
the new key's secret as the last line of its output (it is shown only then)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from pydantic import ValidationError

from shared.keyadmin import KeyChanges, NewKey, create_key, update_key, view
from shared.keystore import KeyExists, KeyStore, NoSuchKey
from shared.migrate import require_schema
from shared.settings import Settings
from shared.store import Store

LIMIT_FLAGS = (("--rpm", "requests per minute"), ("--tpm", "tokens per minute"),
               ("--concurrency", "sync/stream requests in flight"),
               ("--max-pending", "async jobs not finished yet"))


def add_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="manage gateway keys (FERRY_AUTH=keys)",
                          description=__doc__, epilog="reads DATABASE_URL")
    verbs = keys.add_subparsers(dest="verb", required=True)
    for verb in ("create", "update"):
        parser = verbs.add_parser(verb, help=f"{verb} a key")
        parser.add_argument("name")
        for flag, what in LIMIT_FLAGS:
            parser.add_argument(flag, type=int, metavar="N",
                                help=f"limit of {what}" + (" (0 removes it)"
                                                           if verb == "update" else ""))
        parser.add_argument("--models", metavar="GLOB[,GLOB...]",
                            help="models the key may use, e.g. 'claude-*,openai/gpt-5*' "
                                 "(default: all)" + ("; '' allows all" if verb == "update"
                                                     else ""))
        parser.add_argument("--expires-in", type=float, metavar="DAYS",
                            help="the key stops working after this many days")
        if verb == "create":
            parser.add_argument("--secret", help="use this secret instead of a new one (to "
                                                 "carry a key over from another gateway)")
    verbs.add_parser("list", help="list keys (never their secrets)")
    revoke = verbs.add_parser("revoke", help="revoke a key: every api refuses it at once")
    revoke.add_argument("name")


def _changes(args: argparse.Namespace) -> tuple[dict[str, Any], set[str]]:
    values: dict[str, Any] = {}
    for flag, _ in LIMIT_FLAGS:
        field = flag[2:].replace("-", "_")
        value = getattr(args, field)
        if value is not None:
            values[field] = value or None  # 0: remove the limit
    if args.models is not None:
        values["models"] = [m for m in args.models.split(",") if m.strip()]
    if args.expires_in is not None:
        values["expires_in_days"] = args.expires_in
    return values, set(values)


def run(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_run(args, settings))


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    store = await Store.connect(settings.database_url, min_size=1, max_size=1,
                                timeout_s=settings.db_connect_timeout_s)
    try:
        await require_schema(store)
        keystore = KeyStore(store)
        try:
            return await _verb(args, keystore)
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            field = ".".join(str(p) for p in error["loc"])
            print(f"ferry keys {args.verb}: {field}: {error['msg']}", file=sys.stderr)
        except (KeyExists, NoSuchKey, ValueError) as exc:
            print(f"ferry keys {args.verb}: {exc}", file=sys.stderr)
        return 1
    finally:
        await store.close()


async def _verb(args: argparse.Namespace, keystore: KeyStore) -> int:
    if args.verb == "list":
        for key in map(view, await keystore.all()):
            limits = " ".join(f"{k}={v}" for k, v in key["limits"].items() if v is not None)
            print(f"{key['name']}\t{key['prefix']}…\t{key['status']}\t"
                  f"{limits or 'no limits'}\tmodels={','.join(key['models']) or '*'}\t"
                  f"expires={key['expires_at'] or 'never'}")
        return 0
    if args.verb == "revoke":
        record = await keystore.revoke(args.name)
        print(f"revoked {record.name} ({record.prefix}…): every api refuses it now")
        return 0
    values, given = _changes(args)
    if args.verb == "update":
        record = await update_key(keystore, args.name, KeyChanges.model_validate(values), given)
        print(f"updated {record.name}: {view(record)['limits']}, "
              f"models={','.join(record.models) or '*'}")
        return 0
    spec = NewKey.model_validate({**{k: v for k, v in values.items() if v is not None},
                                  "name": args.name, "secret": args.secret})
    record, secret = await create_key(keystore, spec)
    print(f"created key {record.name} ({record.prefix}…); its secret is shown only now:")
    print(secret)
    return 0
