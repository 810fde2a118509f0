"""Log lines that name the service and say, on every line, when the model's weights are random."""

from __future__ import annotations

import logging

_state = {"tag": ""}


class _WeightsTag(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.weights = _state["tag"]
        return True


def setup_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.addFilter(_WeightsTag())
    handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s%(weights)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def mark_random_weights(random_weights: bool) -> None:
    _state["tag"] = " [RANDOM WEIGHTS]" if random_weights else ""
