"""The conformance command line: ``python -m multihess.conformance --backend NAME``."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
# A small selection: float64 and float32 Hessian and GGN products of linear regression.
SELECTION = ["-k", "test_matvec and linear_regression"]


def _env(path: pathlib.Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path), env.get("PYTHONPATH", "")])
    # The CLI's own rule applies (a named backend must load); the repository-wide one is not needed here.
    env.pop("MULTIHESS_REQUIRE_BACKENDS", None)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _run(
    args: list[str], cwd: pathlib.Path, code: str | None = None, path: pathlib.Path | None = None
) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "multihess.conformance", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=_env(path), timeout=300)


def test_cli_passes_for_a_working_backend(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("torch")
    result = _run(["--backend", "torch", "-q", *SELECTION], cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "4 passed" in out, out  # the selection really ran, for both dtypes
    assert "multihess conformance for torch: passed" in out


def test_cli_fails_for_a_backend_that_cannot_load(tmp_path: pathlib.Path) -> None:
    result = _run(["--backend", "no_such_backend", "-q", *SELECTION], cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "backend 'no_such_backend' could not be loaded" in out, out
    assert "unknown backend 'no_such_backend'" in out, out
    assert "multihess conformance for no_such_backend: FAILED" in out, out


def test_cli_takes_a_backend_class_by_file_or_module(tmp_path: pathlib.Path) -> None:
    # The autograd backend of tests/, registered by the command line itself: by file, and by module
    # (importable through PYTHONPATH).  Both name the same class, so its tests run once.
    by_file = f"{TESTS / 'autograd_backend.py'}:AutogradBackend"
    result = _run(
        ["--backend", by_file, "--backend", "autograd_backend:AutogradBackend", "-q", "-rA", *SELECTION],
        cwd=tmp_path,
        path=TESTS,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "4 passed" in out, out
    assert "test_matvec[autograd-float64-linear_regression-hessian]" in out, out  # checked under its name
    assert f"multihess conformance for {by_file}, autograd_backend:AutogradBackend: passed" in out, out


def test_cli_fails_for_a_backend_class_that_cannot_load(tmp_path: pathlib.Path) -> None:
    specs = ["no_such_module:Backend", f"{tmp_path / 'missing.py'}:Backend", f"{TESTS / 'autograd_backend.py'}:Nope"]
    args = [arg for spec in specs for arg in ("--backend", spec)]
    result = _run([*args, "-q", "-k", "test_backend_loads"], cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "3 errors" in out, out  # each fails in the backend fixture
    assert "backend 'no_such_module:Backend' could not be loaded: ModuleNotFoundError" in out, out
    assert "FileNotFoundError: no file" in out and "missing.py" in out, out
    assert "has no class 'Nope'" in out, out


def test_cli_needs_a_backend(tmp_path: pathlib.Path) -> None:
    result = _run([], cwd=tmp_path)
    assert result.returncode == 2
    assert "--backend" in result.stderr


def test_cli_without_pytest_says_so(tmp_path: pathlib.Path) -> None:
    # A None entry in sys.modules makes `import pytest` fail as if it were not installed.
    code = (
        "import runpy, sys; sys.modules['pytest'] = None; sys.argv[0] = 'conformance'; "
        "runpy.run_module('multihess.conformance', run_name='__main__')"
    )
    result = _run(["--backend", "torch"], cwd=tmp_path, code=code)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "pytest" in result.stderr and "not installed" in result.stderr


def test_backend_option_from_the_repository_root() -> None:
    # Run from the root, pytest collects the conformance folder through `testpaths`
    # and must accept --backend there too.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--co", "--backend=torch", *SELECTION],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_env(),
        timeout=300,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "test_matvec[torch-float64-linear_regression-hessian]" in out, out
    assert "[jax-" not in out and "[tensorflow-" not in out, out
