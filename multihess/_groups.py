"""Parameter groups: one per layer by default, or named by the user with names, globs or arrays."""

from __future__ import annotations

from typing import Any

from ._problem import select_names


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: its name up to the last ``"."`` or ``"/"`` (the name itself if none)."""
    cut = max(name.rfind("."), name.rfind("/"))
    return name[:cut] if cut > 0 else name


def resolve_groups(named: list[tuple[str, Any]], groups: Any, among: str) -> dict[str, list[str]]:
    """Group name → parameter names, in the order of ``named``.

    Parameters
    ----------
    named : list of (str, array)
        The parameters groups may draw from, in order; the arrays let a group
        name its parameters by the arrays themselves.
    groups : None, dict or list
        ``None``: one group per layer (:func:`layer_of`).  A dict maps group
        names to parameter names, glob patterns or arrays (one or a list); a
        list of names or patterns makes one group of each, keyed by itself.
    among : str
        What ``named`` is, for error messages (e.g. ``"the operator's parameters"``).
    """
    if groups is None:
        out: dict[str, list[str]] = {}
        for name, _ in named:
            out.setdefault(layer_of(name), []).append(name)
        return out
    if isinstance(groups, dict):
        items = list(groups.items())
    elif isinstance(groups, (list, tuple)):
        for g in groups:
            if not isinstance(g, str):
                raise TypeError(
                    f"groups given as a list must hold parameter names or glob patterns, got {type(g).__name__}; "
                    "use a dict {group_name: parameters} to group arrays"
                )
        items = [(g, g) for g in groups]
    else:
        raise TypeError(
            f"groups must be None, a dict {{group_name: names or patterns}} or a list of patterns, "
            f"got {type(groups).__name__}"
        )
    if not items:
        raise ValueError("groups is empty; leave it out for one group per layer")
    out = {}
    for key, spec in items:
        if not isinstance(key, str):
            raise TypeError(f"group names must be strings, got {key!r}")
        try:
            out[key] = select_names(named, spec)
        except ValueError as err:
            raise ValueError(f"group {key!r}: {err} (among {among})") from None
    return out
