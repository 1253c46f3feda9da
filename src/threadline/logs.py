"""Structured logs: one JSON object per line on stderr (or key=value for humans in a terminal).

Both our loggers and third-party stdlib loggers (uvicorn, asyncpg) go through the same
structlog formatter so a log shipper sees one format.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

__all__ = ["AccessLog", "configure_logging"]


class AccessLog:
    """Which requests get an access-log line (``THREADLINE_ACCESS_LOG``).

    A line costs more server CPU than the rest of a small append's bookkeeping (a log record,
    the structlog chain, JSON rendering, a write), so on a busy instance logging every request
    is the operator's choice, not the default: ``errors`` logs responses with status >= 400
    (and requests that failed before answering), ``sample:N`` those and one in N of the rest,
    ``all`` every request, ``off`` none. Metrics count every request whatever this says."""

    __slots__ = ("_every", "_seen")

    def __init__(self, every: int | None) -> None:
        self._every = every  # None: errors only; 0: nothing
        self._seen = 0

    @classmethod
    def parse(cls, value: str) -> AccessLog:
        if value == "all":
            return cls(1)
        if value == "errors":
            return cls(None)
        if value == "off":
            return cls(0)
        kind, _, every = value.partition(":")
        if kind != "sample" or not every.isdigit() or int(every) < 1:
            raise ValueError(f"access log must be all, errors, off or sample:N, not {value!r}")
        return cls(int(every))

    def wants(self, status: int) -> bool:
        """Whether this request, answered with ``status``, is logged."""
        every = self._every
        if every == 0:
            return False
        if status >= 400 or every == 1:
            return True
        if every is None:
            return False
        self._seen += 1
        if self._seen >= every:
            self._seen = 0
            return True
        return False


def _drop_color_message(
    logger: object, method: str, event: structlog.types.EventDict
) -> structlog.types.EventDict:
    # uvicorn adds an ANSI-coloured copy of its message for terminals; JSON consumers want one.
    event.pop("color_message", None)
    return event


def configure_logging(level: str = "INFO", fmt: Literal["json", "console"] = "json") -> None:
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        _drop_color_message,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's access log prints query strings, which may carry ?token=; we log requests ourselves.
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
