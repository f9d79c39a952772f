"""Choosing the backends the conformance suite runs against.

``--backend NAME`` (repeatable) names the backends; without it every
built-in backend is tried.  ``NAME`` is what ``mh.get_backend`` accepts (a
built-in name, a registered one, or one of the entry-point group
``multihess.backends``), or a backend class not registered anywhere:
``module:Class`` (an importable module) or ``path/to/file.py:Class`` (the
file's folder is put on ``sys.path`` first, so it may import its siblings).
Such a class is registered with ``mh.register_backend`` and checked under
its ``name``.

A backend named with ``--backend`` that cannot be loaded fails every test
that needs it; a default one that cannot be loaded (its framework is not
installed) is skipped, which the repository's ``MULTIHESS_REQUIRE_BACKENDS``
setting turns into a failure where every framework must be present.
"""

from __future__ import annotations

import importlib
import pathlib
import sys

import pytest

from . import mh

BUILTIN_BACKENDS: tuple[str, ...] = ("torch", "jax", "tensorflow")

_load_errors: dict[str, str] = {}
# "module:Class" or "file.py:Class" -> the registered backend's name (the spec itself when it failed).
_resolved: dict[str, str] = {}


def add_backend_option(parser: pytest.Parser) -> None:
    """Register ``--backend``; a second call (from an enclosing conftest as well as this one) does nothing."""
    group = parser.getgroup("multihess conformance")
    if any("--backend" in option.names() for option in group.options):
        return
    group.addoption(
        "--backend",
        action="append",
        default=None,
        dest="multihess_backends",
        metavar="NAME",
        help="backend to check (repeatable): torch, jax, tensorflow, an entry-point backend's name, "
        "or module:Class / path/to/file.py:Class of a backend class; default: every built-in",
    )


def pytest_addoption(parser: pytest.Parser) -> None:
    add_backend_option(parser)


def requested_backends(config: pytest.Config) -> tuple[list[str], bool]:
    """The backends to check (``module:Class`` specs replaced by their names), and whether they were named."""
    names = config.getoption("multihess_backends", default=None)
    if not names:
        return list(BUILTIN_BACKENDS), False
    return list(dict.fromkeys(_resolve(n) for n in names)), True  # repeated names once, in order


def _resolve(spec: str) -> str:
    """The backend name for ``spec``: a name as it is, or the ``name`` of the class ``module:Class`` registered.

    A class that cannot be imported or registered leaves the spec itself as
    the name, with the reason recorded, so that every test of it fails.
    """
    if ":" not in spec:
        return spec
    if spec not in _resolved:
        _resolved[spec] = spec
        try:
            cls = _import_class(spec)
            mh.register_backend(cls)
            _resolved[spec] = cls.name
        except Exception as err:  # reported as the backend's load failure
            _load_errors[spec] = f"{type(err).__name__}: {err}"
    return _resolved[spec]


def _import_class(spec: str) -> type:
    """The class named by ``module:Class`` or ``path/to/file.py:Class``."""
    target, _, attribute = spec.rpartition(":")
    if not target or not attribute:
        raise ValueError(f"expected module:Class or path/to/file.py:Class, got {spec!r}")
    if target.endswith(".py"):
        path = pathlib.Path(target).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no file {str(path)!r} (from --backend {spec})")
        # The file's folder goes on the path so that it imports as a module with its siblings.
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        target = path.stem
    module = importlib.import_module(target)
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise AttributeError(f"module {target!r} has no class {attribute!r} (from --backend {spec})") from None


def _load(name: str) -> str | None:
    """Load a backend once; the reason it failed, or None."""
    if name not in _load_errors:
        try:
            mh.get_backend(name)
            _load_errors[name] = ""
        except Exception as err:  # any failure to load is reported with its reason
            _load_errors[name] = f"{type(err).__name__}: {err}"
    return _load_errors[name] or None


def pytest_configure(config: pytest.Config) -> None:
    names, _ = requested_backends(config)
    if "jax" in names:
        # float64 problems need JAX's x64 mode, switched on before any JAX array exists.
        try:
            import jax
        except ImportError:
            return  # reported by the backend fixture
        jax.config.update("jax_enable_x64", True)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        names, _ = requested_backends(metafunc.config)
        metafunc.parametrize("backend", names, indirect=True, ids=names)


def _require(config: pytest.Config, name: str) -> None:
    reason = _load(name)
    if reason is None:
        return
    _, explicit = requested_backends(config)
    message = f"backend {name!r} could not be loaded: {reason}"
    if explicit:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """One requested backend's name; fails (named explicitly) or skips (default) when it cannot be loaded."""
    _require(request.config, request.param)
    return request.param


@pytest.fixture
def backends(request: pytest.FixtureRequest) -> list[str]:
    """Every requested backend that loads (all of them must, when named explicitly)."""
    names, explicit = requested_backends(request.config)
    failed = {n: _load(n) for n in names if _load(n) is not None}
    if failed and explicit:
        pytest.fail(
            "requested backends could not be loaded: " + "; ".join(f"{n}: {r}" for n, r in failed.items()),
            pytrace=False,
        )
    return [n for n in names if n not in failed]


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    names, explicit = requested_backends(config)
    failed = {n: _load_errors[n] for n in names if _load_errors.get(n)}
    if not failed:
        return
    terminalreporter.section("multihess conformance: backends that could not be loaded")
    for name, reason in failed.items():
        verdict = "FAILED" if explicit else "skipped"
        terminalreporter.write_line(f"{verdict} backend {name!r}: {reason}")
