"""Progress for long waits: a live line on a terminal, silence elsewhere
(tests, CI, pipes), so logs stay clean."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

_FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


class Progress:
    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.timings: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time `name`; on a terminal, animate a line until it ends."""
        t0 = time.perf_counter()
        done = threading.Event()
        painter = None
        if self.enabled:
            painter = threading.Thread(target=self._paint, args=(name, t0, done), daemon=True)
            painter.start()
        try:
            yield
        finally:
            done.set()
            if painter is not None:
                painter.join()
            seconds = time.perf_counter() - t0
            self.timings.append((name, seconds))
            if self.enabled:
                self.stream.write(f"\r\x1b[K✓ {name} ({seconds:.2f} s)\n")
                self.stream.flush()

    def _paint(self, name: str, t0: float, done: threading.Event) -> None:
        i = 0
        while not done.wait(0.1):  # a screen refresh rate, not a wait for something
            frame = _FRAMES[i % len(_FRAMES)]
            self.stream.write(f"\r\x1b[K{frame} {name}… {time.perf_counter() - t0:.1f} s")
            self.stream.flush()
            i += 1
