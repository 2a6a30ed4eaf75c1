"""torch's loggers, silenced for the span of one step."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

__all__ = ["muted"]


@contextlib.contextmanager
def muted(*names: str) -> Iterator[None]:
    """The named loggers drop every record inside the block, and are back as they were after.

    Silenced at the source, by level: torch's handlers hold the stderr of import time, out of
    reach of ``contextlib.redirect_stderr``.
    """
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in names]
    for logger, _ in saved:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)
