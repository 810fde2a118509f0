"""Log lines that name the service and say, on every line, when the model's weights are random.

Messages often carry what clients sent (request ids, error reasons quoting a script): every message is
escaped so that a newline or terminal control sequence in it cannot start a forged line.
"""

from __future__ import annotations

import logging

_state = {"tag": ""}


def escape(text: str, max_chars: int | None = None) -> str:
    """`text` on one line: each non-printable character (newline, CR, ESC, U+2028, ...) as its escape.

    With `max_chars`, a longer text is cut there and says how long it was (a client string may be megabytes).
    """
    if max_chars is not None and len(text) > max_chars:
        text = f"{text[:max_chars]}...({len(text)} chars)"
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class EscapingFormatter(logging.Formatter):
    """Escapes the message; a traceback (exc_info, stack_info) is appended after it, on its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's method name)
        record.message = escape(record.message)
        return super().formatMessage(record)


class _WeightsTag(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.weights = _state["tag"]
        return True


def setup_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.addFilter(_WeightsTag())
    handler.setFormatter(EscapingFormatter(f"%(asctime)s {service} %(levelname)s%(weights)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def mark_random_weights(random_weights: bool) -> None:
    _state["tag"] = " [RANDOM WEIGHTS]" if random_weights else ""
