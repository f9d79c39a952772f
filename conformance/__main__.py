"""Command line: run the conformance suite against one or more backends.

Usage::

    python -m multihess.conformance --backend torch [--backend jax ...] [pytest arguments]
    python -m multihess.conformance --backend my_package.curvature:MyBackend
    python -m multihess.conformance --backend path/to/my_backend.py:MyBackend

Runs pytest on this installed folder with the backends named, prints
pytest's report and exits with its status: 0 when every check passed,
non-zero on any failure, including a named backend that cannot be loaded.
Exit status 2 means the command itself could not run (no backend named,
pytest missing).
"""

from __future__ import annotations

import pathlib
import sys

USAGE = """\
usage: python -m multihess.conformance --backend NAME [--backend NAME ...] [pytest arguments]

Checks curvature products, parameter trees and error messages of each named
backend against NumPy float64 oracles, and the backends against each other.

NAME is torch, jax, tensorflow, the name of a backend registered through the
'multihess.backends' entry points, or a backend class not registered anywhere:
module:Class (an importable module) or path/to/file.py:Class (the file's folder
is put on sys.path). Other arguments go to pytest, e.g. -k matvec, -x, -q.
"""

SUITE = pathlib.Path(__file__).resolve().parent


def _named_backends(argv: list[str]) -> list[str]:
    """The values of ``--backend NAME`` and ``--backend=NAME`` in ``argv``."""
    names = []
    for i, arg in enumerate(argv):
        if arg == "--backend" and i + 1 < len(argv):
            names.append(argv[i + 1])
        elif arg.startswith("--backend="):
            names.append(arg.split("=", 1)[1])
    return names


def main(argv: list[str] | None = None) -> int:
    """Run the suite; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    backends = _named_backends(argv)
    if not backends:
        print(USAGE + "\nerror: name at least one backend, e.g. --backend torch", file=sys.stderr)
        return 2
    try:
        import pytest
    except ImportError:
        print(
            "error: the conformance suite runs on pytest, which is not installed; "
            "install it with `pip install pytest` (or `pip install 'multihess[test]'`)",
            file=sys.stderr,
        )
        return 2

    args = [
        str(SUITE),
        # Only this folder's conftest and settings: the suite behaves the same
        # installed from a wheel or run from a source checkout.
        f"--rootdir={SUITE}",
        f"--confcutdir={SUITE}",
        "-p",
        "no:cacheprovider",  # the installed folder may be read-only
        "-ra",
        *argv,
    ]
    status = int(pytest.main(args))
    verdict = "passed" if status == 0 else f"FAILED (pytest exit status {status})"
    print(f"multihess conformance for {', '.join(dict.fromkeys(backends))}: {verdict}")
    return status


if __name__ == "__main__":
    sys.exit(main())
