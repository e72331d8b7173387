"""Logging: structlog, JSON in production and console on a terminal, with request ids bound per request.

Prompts and completions are never passed to a logger; secrets are redacted by key name as a second guard.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog

from appliance.config import LoggingSettings

SECRET_KEYS = frozenset({"authorization", "api_key", "key", "password", "secret", "token", "prompt", "messages"})


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for name in event.keys() & SECRET_KEYS:
        event[name] = "[redacted]"
    return event


def configure(settings: LoggingSettings) -> None:
    use_json = settings.format == "json" or (settings.format == "auto" and not sys.stderr.isatty())
    renderer: Any = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    level = getattr(logging, settings.level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr, format="%(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _PiiScrubber:
    """A processor applying the privacy policy's `logs` surface to every string value of a record."""

    def __init__(self, scrub: Callable[[str], str]) -> None:
        self.scrub = scrub

    def __call__(self, _: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for name, value in event.items():
            if isinstance(value, str) and len(value) >= 6 and name not in ("timestamp", "level"):
                event[name] = self.scrub(value)
        return event


def install_scrubber(scrub: Callable[[str], str] | None) -> None:
    """From now on pass every record's strings (exceptions included) through `scrub` before rendering; None
    removes it. The app installs the privacy policy's `logs` surface here (appliance/privacy/)."""
    processors = [p for p in structlog.get_config()["processors"] if not isinstance(p, _PiiScrubber)]
    if scrub is not None:
        processors.insert(max(len(processors) - 1, 0), _PiiScrubber(scrub))  # just before the renderer
    structlog.configure(processors=processors)
    for handler in logging.getLogger().handlers:  # the standard library's records (uvicorn's, libraries')
        for old in [f for f in handler.filters if isinstance(f, _StdlibScrubber)]:
            handler.removeFilter(old)
        if scrub is not None:
            handler.addFilter(_StdlibScrubber(scrub))


class _StdlibScrubber(logging.Filter):
    def __init__(self, scrub: Callable[[str], str]) -> None:
        super().__init__()
        self.scrub = scrub

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.scrub(record.getMessage()), None
        if record.exc_info:
            record.exc_text = self.scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
