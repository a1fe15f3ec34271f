"""What a person at the terminal sees while a sweep runs: every bar and step line redraws at
least once a second, so no phase goes quiet (a minute-long trial, a store's migrations,
torch.export of the final model)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType

from tqdm import tqdm

TICK_SECONDS = 1.0  # tqdm's elapsed time and rate move on this often
POLL_SECONDS = 5.0  # other processes' trials are read from the study this often


class Ticker:
    """Redraw ``bar`` every TICK_SECONDS from a daemon thread and call ``poll`` every
    POLL_SECONDS (news from other processes), until the ``with`` block ends."""

    def __init__(self, bar: tqdm, poll: Callable[[], None] | None = None) -> None:
        self.bar, self.poll = bar, poll
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.tick, name="lstm_sweep-progress", daemon=True)

    def tick(self) -> None:
        since_poll = 0.0
        while not self.stopped.wait(TICK_SECONDS):
            since_poll += TICK_SECONDS
            if self.poll is not None and since_poll >= POLL_SECONDS:
                since_poll = 0.0
                self.poll()
            self.bar.refresh()

    def __enter__(self) -> tqdm:
        if not self.bar.disable:
            self.thread.start()
        return self.bar

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()


@contextmanager
def step(text: str, enabled: bool) -> Iterator[None]:
    """One line naming a step that has no count (loading, checking, registering) with its
    elapsed time, redrawn each second and erased when the step ends. Only on a terminal: in a
    log the redraws would be noise, and a one-line error must stay one line."""
    bar = tqdm(
        desc=text,
        bar_format="{desc} {elapsed}",
        leave=False,
        file=sys.stderr,
        disable=not (enabled and sys.stderr.isatty()),
    )
    try:
        with Ticker(bar):
            yield
    finally:
        bar.close()
