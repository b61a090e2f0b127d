"""structlog setup: JSON in production, console in a terminal; context (request_id, job_id,
worker_id) travels in contextvars so every line carries it.

Libraries log through the standard `logging` module (aiohttp, aio-pika, aiormq, asyncio): a
handler renders their records the same way, tracebacks included, so every line a process
writes is one JSON object (in JSON mode), and an uncaught exception too.
"""

from __future__ import annotations

import logging
import sys
from types import TracebackType

import structlog

_SHARED: list[structlog.typing.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    # Tracebacks as structured JSON, without local variables: they may hold request data.
    tracebacks: list[structlog.typing.Processor] = (
        [structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False))]
        if use_json else [])
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    structlog.configure(
        processors=[*_SHARED, *tracebacks, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_SHARED, structlog.stdlib.add_logger_name,
                           structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    *tracebacks, renderer]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Libraries' own chatter stays at warnings (aiohttp's access log is Ferry's own, one line).
    root.setLevel(max(numeric, logging.WARNING))
    sys.excepthook = _log_uncaught


def _log_uncaught(kind: type[BaseException], exc: BaseException,
                  tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    get_logger("ferry").critical("uncaught exception", exc_info=(kind, exc, tb))


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
