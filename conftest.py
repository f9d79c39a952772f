"""Repository-wide test settings.

With ``MULTIHESS_REQUIRE_BACKENDS`` set (CI sets it to ``torch,jax,tensorflow``)
every named backend must load and no test may be skipped: a skipped test there
means a framework is missing, which is a failure.
"""

from __future__ import annotations

import os

import pytest

REQUIRED = [b for b in os.environ.get("MULTIHESS_REQUIRE_BACKENDS", "").split(",") if b]


def pytest_addoption(parser: pytest.Parser) -> None:
    # The conformance suite's --backend, registered here too: run from the root with no
    # path given, pytest would read "--backend torch" as the path "torch" and reject the
    # option before loading conformance/conftest.py.
    from conformance.conftest import add_backend_option

    add_backend_option(parser)


def pytest_sessionstart(session: pytest.Session) -> None:
    if not REQUIRED:
        return
    import multihess

    missing = []
    for name in REQUIRED:
        try:
            multihess.get_backend(name)
        except Exception as err:  # any failure to load is reported, not skipped
            missing.append(f"{name}: {err}")
    if missing:
        pytest.exit("required backends could not be loaded:\n" + "\n".join(missing), returncode=1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if REQUIRED and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped while MULTIHESS_REQUIRE_BACKENDS is set: {report.longrepr}"
