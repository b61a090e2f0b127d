"""What the fake provider answers: the reply derived from the prompt and its directives.

Nothing here knows a wire format; `dialects` spells an `Answer` as Anthropic or OpenAI.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal

# Re-exported: callers read directives and answers from one place.
from fakeprovider.directives import Directives, InvalidRequest, parse_directives

__all__ = [
    "Answer",
    "Directives",
    "InvalidRequest",
    "Prompt",
    "StopReason",
    "ThinkingDisplay",
    "ToolCall",
    "build_answer",
    "count_words",
    "cut_at_stop",
    "first_words",
    "huge_filler",
    "lead_split",
    "new_id",
    "parse_directives",
    "sign_thinking",
    "split_json",
    "split_text",
]

StopReason = Literal["end_turn", "max_tokens", "tool_use", "stop_sequence"]
# How the request asked to see thinking: "shown" (summarized or full text) or "omitted" (an
# empty `thinking` text, the signature only).
ThinkingDisplay = Literal["shown", "omitted"]

TOOL_CALL_TOKENS = 10
MIN_TOOL_JSON_PIECES = 3

_WORD = re.compile(r"\S+")
_WORD_WITH_SPACE = re.compile(r"\s*\S+\s*|\s+")


@dataclass(frozen=True)
class Prompt:
    """The parts of a request the answer depends on, whatever the wire format."""

    model: str
    text: str  # the last user message's text, directives included
    input_words: int
    max_tokens: int | None = None
    stream: bool = False
    include_usage: bool = False
    stop_sequences: tuple[str, ...] = ()
    thinking: ThinkingDisplay | None = None


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    input: dict[str, Any]


@dataclass(frozen=True)
class Answer:
    id: str
    model: str
    texts: list[str]
    tool_calls: list[ToolCall]
    stop_reason: StopReason
    input_tokens: int
    output_tokens: int
    # The thinking block, when the request enabled thinking: its text ("" when the display is
    # omitted) and the signature of the full thinking text.
    thinking: str | None = None
    signature: str | None = None
    stop_sequence: str | None = None
    # How many leading characters of the first text block go out as one delta (`huge_delta`).
    lead: int = 0


@dataclass
class _Budget:
    limit: int | None
    used: int = 0
    cut: bool = False

    def take(self, words: int) -> int:
        """How many of `words` still fit; marks the answer cut when not all do."""
        room = words if self.limit is None else max(0, min(words, self.limit - self.used))
        if room < words:
            self.cut = True
        self.used += room
        return room


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def count_words(text: str) -> int:
    return len(text.split())


def sign_thinking(thinking: str) -> str:
    """A stable stand-in for Anthropic's opaque signature: base64 of the text's SHA-256, so a
    test can check that a thinking block came back unaltered."""
    return base64.b64encode(hashlib.sha256(thinking.encode()).digest()).decode()


def huge_filler(size: int) -> str:
    """`size` bytes that count as one word: a run of `x` and a space before the reply."""
    return "x" * (size - 1) + " "


def build_answer(
    prompt: Prompt, directives: Directives, clean_text: str, answer_id: str, tool_id_prefix: str
) -> Answer:
    """Derive the reply from the prompt, in the order a model writes it: thinking, text, tool
    calls. `max_tokens` counts words (a tool call costs 10) across all three, thinking included
    as Anthropic bills it; a stop sequence ends the text before its first match."""
    budget = _Budget(prompt.max_tokens)
    thinking = signature = None
    thought_words = 0
    if prompt.thinking is not None:
        thought = f"thinking about: {clean_text}"
        thought_words = budget.take(count_words(thought))
        thought = first_words(thought, thought_words)
        signature = sign_thinking(thought)
        # An omitted display hides the text, not its cost: output_tokens still counts it.
        thinking = thought if prompt.thinking == "shown" else ""
    reply = f"echo: {clean_text}"
    if directives.blocks == 1:
        candidates = [reply]
    else:
        candidates = [f"{reply} [{i}]" for i in range(directives.blocks)]
    filler = huge_filler(directives.huge_delta) if directives.huge_delta else ""
    candidates[0] = filler + candidates[0]
    candidates, stop_sequence = cut_at_stop(candidates, prompt.stop_sequences)
    texts: list[str] = []
    for text in [] if budget.cut else candidates:
        words = count_words(text)
        kept = budget.take(words)
        if kept or (words == 0 and text):
            texts.append(text if kept == words else first_words(text, kept))
        if budget.cut:
            break
    tool_calls: list[ToolCall] = []
    if directives.tool is not None and stop_sequence is None:
        for n in range(1, directives.tools + 1):
            if budget.cut or budget.take(TOOL_CALL_TOKENS) < TOOL_CALL_TOKENS:
                break
            call_input = {"query": clean_text, "n": n}
            tool_calls.append(ToolCall(new_id(tool_id_prefix), directives.tool, call_input))
    stop: StopReason
    if budget.cut:
        stop, stop_sequence = "max_tokens", None
    elif stop_sequence is not None:
        stop = "stop_sequence"
    else:
        stop = "tool_use" if tool_calls else "end_turn"
    text_words = sum(count_words(t) for t in texts)
    return Answer(
        id=answer_id,
        model=prompt.model,
        texts=texts,
        tool_calls=tool_calls,
        stop_reason=stop,
        input_tokens=max(1, prompt.input_words),
        output_tokens=thought_words + text_words + TOOL_CALL_TOKENS * len(tool_calls),
        thinking=thinking,
        signature=signature,
        stop_sequence=stop_sequence,
        lead=min(len(filler), len(texts[0])) if filler and texts else 0,
    )


def cut_at_stop(texts: list[str], stops: tuple[str, ...]) -> tuple[list[str], str | None]:
    """The texts up to (not including) the first stop sequence a model would have written, and
    that sequence. "First" is the match that ends first, as generation stops the moment a
    sequence is complete; among matches ending at the same place, the longest."""
    for index, text in enumerate(texts):
        best: tuple[int, int, str] | None = None  # (end, -length, sequence)
        for stop in stops:
            at = text.find(stop) if stop else -1
            if at >= 0 and (best is None or (at + len(stop), -len(stop)) < best[:2]):
                best = (at + len(stop), -len(stop), stop)
        if best is not None:
            end, negative_length, stop = best
            return [*texts[:index], text[: end + negative_length]], stop
    return texts, None


def first_words(text: str, n: int) -> str:
    """`text` up to the end of its n-th word, spacing kept."""
    if n <= 0:
        return ""
    matches = list(_WORD.finditer(text))
    return text if n >= len(matches) else text[: matches[n - 1].end()]


def split_text(text: str, pieces: int | None) -> list[str]:
    """Split into `pieces` deltas, or one per word (trailing space kept) when None.

    The concatenation is always exactly `text`, and no piece is empty.
    """
    if not text:
        return []
    if pieces is None:
        return _WORD_WITH_SPACE.findall(text)
    return _even_split(text, min(pieces, len(text)))


def lead_split(text: str, lead: int, pieces: int | None) -> list[str]:
    """`split_text`, but the first `lead` characters in one piece of their own (`huge_delta`)."""
    return ([text[:lead]] if lead else []) + split_text(text[lead:], pieces)


def split_json(encoded: str, pieces: int | None) -> list[str]:
    """Split a tool's input JSON into at least three `partial_json` pieces."""
    return _even_split(encoded, min(max(MIN_TOOL_JSON_PIECES, pieces or 0), len(encoded)))


def _even_split(text: str, pieces: int) -> list[str]:
    size, extra = divmod(len(text), pieces)
    out, start = [], 0
    for i in range(pieces):
        end = start + size + (1 if i < extra else 0)
        out.append(text[start:end])
        start = end
    return out
