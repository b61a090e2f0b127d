"""Turn requests recorded by `record_proxy.py` into corpus fixtures (`tests/corpus/*.json`).

    python tests/clients/save_shapes.py RECORDING.jsonl INDEX NAME --source "claude-code X.Y.Z" \
        [--replace OLD=NEW ...] [--describe TEXT]

INDEX counts the recorded requests from 0 (egress lines are skipped). The fixture keeps the
method's path, query, the headers a client sends (credentials, Host, Content-Length and
Connection dropped) and the body, with what would identify the machine replaced: `--replace`
pairs (a temporary HOME and project directory, a prompt), the kernel version, and Claude Code's
session and device ids.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
DROPPED_HEADERS = {"x-api-key", "authorization", "cookie", "proxy-authorization", "host",
                   "content-length", "connection"}
SESSION_ID = "00000000-0000-4000-8000-000000000000"
DEVICE_ID = "0" * 64
_KERNEL = re.compile(r"(OS Version: \w+) [^\s\\\"]+")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _metadata(body: dict[str, Any]) -> None:
    user_id = body.get("metadata", {}).get("user_id")
    if not isinstance(user_id, str) or not user_id.startswith("{"):
        return
    ids = json.loads(user_id)  # Claude Code sends a JSON object as a string
    ids.update({k: SESSION_ID for k in ids if k.endswith("session_id")})
    ids.update({k: DEVICE_ID for k in ids if k == "device_id"})
    body["metadata"]["user_id"] = json.dumps(ids, separators=(",", ":"))


def fixture(record: dict[str, Any], name: str, source: str,
            replacements: list[tuple[str, str]], describe: str | None) -> dict[str, Any]:
    headers = {k: v for k, v in record["headers"].items() if k.lower() not in DROPPED_HEADERS}
    if "x-claude-code-session-id" in headers:
        headers["x-claude-code-session-id"] = SESSION_ID
    text = json.dumps(record["body"])
    for old, new in replacements:
        text = text.replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1])
    text = _KERNEL.sub(r"\1 6.0.0", text)
    body = json.loads(text)
    _metadata(body)
    out: dict[str, Any] = {"name": name, "source": source}
    if describe:
        out["description"] = describe
    out.update(path=record["path"], query=record["query"], headers=headers, body=body)
    leftover = _UUID.findall(json.dumps(out))
    if set(leftover) - {SESSION_ID}:
        raise SystemExit(f"{name}: ids left in the fixture: {sorted(set(leftover))}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recording", type=Path)
    parser.add_argument("index", type=int)
    parser.add_argument("name")
    parser.add_argument("--source", required=True)
    parser.add_argument("--replace", action="append", default=[], metavar="OLD=NEW")
    parser.add_argument("--describe")
    args = parser.parse_args()
    records = [r for r in map(json.loads, args.recording.read_text().splitlines())
               if "egress" not in r]
    pairs = [tuple(p.split("=", 1)) for p in args.replace]
    data = fixture(records[args.index], args.name, args.source, pairs, args.describe)  # type: ignore[arg-type]
    path = CORPUS / f"{args.name}.json"
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {path.name} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
