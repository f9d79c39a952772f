"""Progress bars: tqdm when it is installed, nothing otherwise.

Two levels: a bar over the batches of one pass over the data, and a bar over
the passes an estimator plans (a 20-step Lanczos run is 20 passes).

Bars appear only once the work has taken about a second (tqdm's ``delay``),
so quick calls print nothing; ``force`` shows them from the start.  A
vendored copy of ``multihess/`` without tqdm runs the same, silently.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

SHOW_AFTER_SECONDS = 1.0
"""How long work runs before its bar appears."""


def progress_bar(iterable: Iterable[Any], total: int | None, desc: str, force: bool = False) -> Iterable[Any]:
    """``iterable`` wrapped in a tqdm bar that shows after :data:`SHOW_AFTER_SECONDS` (at once with ``force``)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, delay=0.0 if force else SHOW_AFTER_SECONDS, leave=False)


@dataclass
class _Plan:
    """An estimator's planned passes over the data and the bar that counts them (made once it is due)."""

    total: int | None
    desc: str
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    bar: Any = None
    shown: bool = False


_plans = threading.local()


def _active() -> list[_Plan]:
    if not hasattr(_plans, "stack"):
        _plans.stack = []
    return _plans.stack


@contextmanager
def planned_passes(total: int | None, desc: str) -> Iterator[None]:
    """Count the passes over the data made inside this block in a bar ``desc: done/total passes``.

    Estimators announce how many passes they plan (``None`` when unknown, as
    for a report made of several estimators); every pass the operators make
    (:meth:`Problem.batch_sum`) advances the bars of all blocks it is in.
    The bar appears, like the per-pass bar, once the block has run for
    :data:`SHOW_AFTER_SECONDS`, at the first pass with ``progress=True``, and
    never with ``progress=False`` or for operators that make no passes
    (dense matrices).  An estimator that stops early (a converged Lanczos
    run) closes its bar below its plan.

    Examples
    --------
    >>> with planned_passes(3, "demo"):
    ...     for _ in range(3):
    ...         pass_done(progress=False)
    """
    plan = _Plan(total, desc)
    stack = _active()
    stack.append(plan)
    try:
        yield
    finally:
        stack.remove(plan)
        if plan.bar is not None:
            plan.bar.close()


def pass_done(progress: bool | None) -> None:
    """Advance every active plan's bar by one pass (``progress``: the operator's setting)."""
    now = time.monotonic()
    for plan in _active():
        plan.done += 1
        if plan.bar is not None:
            plan.bar.update(1)
        elif not plan.shown and progress is not False and (progress or now - plan.started >= SHOW_AFTER_SECONDS):
            plan.shown = True  # once: without tqdm the bar stays None
            plan.bar = _passes_bar(plan)


def _passes_bar(plan: _Plan) -> Any:
    """A tqdm bar for ``plan`` starting at the passes already made (``None`` without tqdm)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=plan.total, initial=plan.done, desc=plan.desc, unit="pass", leave=False)
