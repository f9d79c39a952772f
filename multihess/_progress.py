"""Progress bars: tqdm when it is installed, nothing otherwise.

Bars appear only once the work has taken about a second (tqdm's ``delay``),
so quick calls print nothing; ``force`` shows them from the start.  A
vendored copy of ``multihess/`` without tqdm runs the same, silently.
"""

from __future__ import annotations

from collections.abc import Iterable
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
