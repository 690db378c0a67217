"""Progress of long steps on stderr (loading, each pass, writing, verification
samples). A step shows only once it has run for a second, so small models stay
quiet. Commands show it when stderr is a terminal (NORMFOLD_PROGRESS=1 forces
it, =0 turns it off), never with --quiet or when --json writes to stdout."""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")
SHOW_AFTER_S = 1.0


class Progress:
    """Reports steps on `stream` when `enabled`; `Progress()` reports nothing."""

    def __init__(self, enabled: bool = False, stream: TextIO | None = None, show_after: float | None = None):
        self.enabled, self.stream = enabled, stream or sys.stderr
        self.show_after = SHOW_AFTER_S if show_after is None else show_after

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Around one step: 'normfold: <what> ...' once it has run `show_after`
        seconds, then its duration when it ends."""
        if not self.enabled:
            yield
            return
        shown = threading.Event()

        def show() -> None:
            shown.set()
            self.stream.write(f"normfold: {what} ...")
            self.stream.flush()

        start = time.perf_counter()
        timer = threading.Timer(self.show_after, show)
        timer.daemon = True
        if self.show_after <= 0:
            show()
        else:
            timer.start()
        ended = "stopped"
        try:
            yield
            ended = f"{time.perf_counter() - start:.1f} s"
        finally:
            timer.cancel()
            if shown.is_set():
                self.stream.write(f" {ended}\n")
                self.stream.flush()

    def each(self, items: Iterable[T], what: str, total: int | None = None) -> Iterable[T]:
        """`items`, with a progress bar once iterating takes `show_after` seconds."""
        return tqdm(items, desc=f"normfold: {what}", total=total, file=self.stream, disable=not self.enabled,
                    delay=self.show_after, leave=False, unit="")


    def bar(self, total: int, what: str, unit: str = ""):
        """A progress bar over `total` units of work (a silent stand-in when not
        enabled), shown at once: for work that is long by nature (data passes)."""
        return tqdm(total=total, desc=f"normfold: {what}", unit=unit, file=self.stream, disable=not self.enabled,
                    leave=False, dynamic_ncols=True)


def progress_for(quiet: bool, to_stdout: bool) -> Progress:
    """The progress a command shows: on a terminal (or NORMFOLD_PROGRESS=1), never
    with -q or when its report goes to stdout."""
    forced = os.environ.get("NORMFOLD_PROGRESS")
    wanted = sys.stderr.isatty() if forced is None else forced not in ("", "0")
    return Progress(enabled=wanted and not quiet and not to_stdout)
