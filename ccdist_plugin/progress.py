"""Progress display: a tqdm bar when stderr is a terminal, plain log lines otherwise.

A bar redrawn in a log file or a CI log is noise, so bars appear only on a terminal. Elsewhere the
training loop logs one line per epoch itself, and :func:`progress_bar` can log one line per finished
loop (e.g. per metric of an evaluation) through ``done``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = ["on_terminal", "progress_bar"]

T = TypeVar("T")


def on_terminal() -> bool:
    """Whether stderr (where tqdm draws) is an interactive terminal."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(
    iterable: Iterable[T] | None = None,
    *,
    desc: str = "",
    total: int | None = None,
    enabled: bool = True,
    unit: str = "batch",
    done: Callable[[str], None] | None = None,
) -> Any:
    """A tqdm bar over ``iterable`` (or a manual one with ``total``) that is drawn only when ``enabled``
    and stderr is a terminal.

    When no bar is drawn, ``enabled`` is true and ``done`` is given, iterating ``iterable`` to its end
    sends one line to ``done``: ``"<desc>: <n> <unit>(s) in <seconds> s"``. Without an iterable the
    result is tqdm's object (``update``, ``set_postfix``, ``close`` work whether drawn or not).
    """
    draw = enabled and on_terminal()
    bar = tqdm(iterable, desc=desc, total=total, disable=not draw, leave=False, unit=unit)
    if iterable is None or draw or not enabled or done is None:
        return bar
    return _logged(iterable, desc, unit, done)


def _logged(iterable: Iterable[T], desc: str, unit: str, done: Callable[[str], None]) -> Iterator[T]:
    start, count = time.perf_counter(), 0
    for item in iterable:
        count += 1
        yield item
    plural = "" if count == 1 else ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")
    done(f"{desc}: {count} {unit}{plural} in {time.perf_counter() - start:.1f} s")
