"""What the three commands (run, report, predict) share: input they refuse, or a store that fails
as they open it, said as one line with its exit status, no traceback. Light: no torch here."""

from __future__ import annotations

import sys

from lstm_sweep.config import ConfigError
from lstm_sweep.faults import EXIT_STORE, StoreFailed

EXIT_BAD_INPUT = 2
REFUSED = (ConfigError, StoreFailed)


def refuse(exc: ConfigError | StoreFailed) -> int:
    """Print ``exc`` as the one error line; its exit status: 2 for bad input, EXIT_STORE for a
    store that failed (a full disk, say)."""
    print(f"error: {exc}", file=sys.stderr)
    return EXIT_STORE if isinstance(exc, StoreFailed) else EXIT_BAD_INPUT
