"""Prompt directives: `[[fake:NAME=VALUE,...]]` in the last user message steers the answer.

Names are strict: an unknown name, a missing or malformed value is an `InvalidRequest` (400),
so a typo cannot let a test pass silently with the default behaviour.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# The largest `huge_delta`: big enough for any line-length test, small enough not to exhaust
# the memory of a shared test machine by mistake.
MAX_HUGE_DELTA = 64 * 1024 * 1024

_DIRECTIVE = re.compile(r"\[\[fake:([^\]]*)\]\]")
_DIRECTIVE_WITH_SPACE = re.compile(r"\s*\[\[fake:[^\]]*\]\]\s*")
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")

# New directives that only make sense on a streamed answer, and those only on a plain one: sent
# with the other kind they are refused, so a test cannot pass without the fault it asked for.
# (`error_after`, `chunks` and `stream_delay` predate this and stay ignored on plain requests.)
STREAM_ONLY = ("drop_after", "stall_after")
PLAIN_ONLY = ("bad_json",)


class InvalidRequest(ValueError):
    """The request (or a directive in it) is malformed: answered with a 400."""


@dataclass(frozen=True)
class Directives:
    delay: float = 0.0
    status: int | None = None
    retry_after: str | None = None
    fail_times: int | None = None
    tool: str | None = None
    tools: int = 1
    blocks: int = 1
    chunks: int | None = None
    stream_delay: float = 0.0
    error_after: int | None = None
    # Restrict `status` / `fail_*` to one model or one presented API key (fallback and
    # key-rotation tests): other models and keys are answered normally.
    fail_model: str | None = None
    fail_key: str | None = None
    # Misbehaving upstream: cut the connection, or go silent, after N content deltas.
    drop_after: int | None = None
    stall_after: int | None = None
    huge_delta: int | None = None
    bad_json: bool = False

    @property
    def failure_status(self) -> int | None:
        """The status to fail with, if this request is meant to fail at all."""
        if self.fail_times is not None:
            return self.status or 500
        return self.status

    def check_mode(self, stream: bool) -> None:
        """Refuse a directive that cannot act on this kind of request, rather than ignore it."""
        wrong = PLAIN_ONLY if stream else STREAM_ONLY
        names = [name for name in wrong if getattr(self, name) not in (None, False)]
        if names:
            kind = "streamed" if stream else "non-streamed"
            raise InvalidRequest(f"fake directive {names[0]!r} does not apply to a {kind} request")


def parse_directives(text: str) -> tuple[Directives, str]:
    """Read every `[[fake:NAME=VALUE,...]]` in `text`; return them and the text without them."""
    values: dict[str, Any] = {}
    for match in _DIRECTIVE.finditer(text):
        for item in match.group(1).split(","):
            name, sep, value = item.strip().partition("=")
            _apply(values, name.strip(), value.strip() if sep else None)
    clean = _DIRECTIVE_WITH_SPACE.sub(" ", text).strip()
    return Directives(**values), clean


def _apply(values: dict[str, Any], name: str, value: str | None) -> None:
    if name == "fail_once":
        values["fail_times"] = 1
        values["status"] = 500 if value is None else _status(name, value)
        return
    if name == "bad_json":
        if value is not None:
            raise InvalidRequest("fake directive 'bad_json' takes no value: [[fake:bad_json]]")
        values[name] = True
        return
    if value is None:
        raise InvalidRequest(f"fake directive {name!r} needs a value: [[fake:{name}=...]]")
    if name in ("delay", "stream_delay"):
        values[name] = _number(name, value)
    elif name == "retry_after":
        _number(name, value)
        values[name] = value  # sent back exactly as written
    elif name == "status":
        values[name] = _status(name, value)
    elif name in ("fail_times", "tools", "blocks", "chunks"):
        values[name] = _integer(name, value, minimum=1)
    elif name in ("error_after", "drop_after", "stall_after"):
        values[name] = _integer(name, value, minimum=0)
    elif name == "huge_delta":
        size = _integer(name, value, minimum=1)
        if size > MAX_HUGE_DELTA:
            raise InvalidRequest(f"fake directive huge_delta={value!r}: at most {MAX_HUGE_DELTA}")
        values[name] = size
    elif name in ("fail_model", "fail_key"):
        values[name] = value
    elif name == "tool":
        if not _TOOL_NAME.match(value):
            raise InvalidRequest(f"fake directive tool={value!r}: not a valid tool name")
        values[name] = value
    else:
        # A typo must not let a test pass silently with the default behaviour.
        raise InvalidRequest(f"unknown fake directive {name!r}")


def _number(name: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise InvalidRequest(f"fake directive {name}={value!r}: not a number") from None
    if not number >= 0:
        raise InvalidRequest(f"fake directive {name}={value!r}: must be >= 0")
    return number


def _integer(name: str, value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise InvalidRequest(f"fake directive {name}={value!r}: not an integer") from None
    if number < minimum:
        raise InvalidRequest(f"fake directive {name}={value!r}: must be >= {minimum}")
    return number


def _status(name: str, value: str) -> int:
    code = _integer(name, value, minimum=400)
    if code > 599:
        raise InvalidRequest(f"fake directive {name}={value!r}: must be a 4xx or 5xx status")
    return code
