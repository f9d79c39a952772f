"""Packaging: no framework on import, relative imports only, and a vendored copy that works."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import textwrap
import zipfile

import multihess

PACKAGE_DIR = pathlib.Path(multihess.__file__).parent
REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(code: str, cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_import_loads_no_framework() -> None:
    result = _run(
        """
        import sys
        import multihess
        loaded = [m for m in ("torch", "jax", "tensorflow", "keras", "importlib.metadata") if m in sys.modules]
        print(",".join(loaded))
        """
    )
    assert result.returncode == 0, result.stderr
    loaded = [m for m in result.stdout.strip().split(",") if m]
    assert not [m for m in loaded if m != "importlib.metadata"], loaded


def test_package_code_uses_relative_imports_only() -> None:
    offenders = []
    for root in (REPO / "multihess", REPO / "backends", REPO / "conformance"):
        for path in root.rglob("*.py"):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if re.match(r"\s*(from|import)\s+multihess\b", line):
                    offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "absolute self-imports:\n" + "\n".join(offenders)


def test_vendored_copy_computes_an_hvp(tmp_path: pathlib.Path) -> None:
    wheel_dir = tmp_path / "wheel"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheel_dir.glob("multihess-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    assert (site / "multihess" / "backends" / "torch_backend.py").exists()

    # Copy the installed folder under another parent package, as a vendoring user would.
    vendor = tmp_path / "app" / "myproject" / "_vendor"
    vendor.mkdir(parents=True)
    (vendor.parent / "__init__.py").write_text("")
    (vendor / "__init__.py").write_text("")
    import shutil

    shutil.copytree(site / "multihess", vendor / "curv")
    result = _run(
        """
        import sys
        import torch
        from myproject._vendor import curv
        assert "multihess" not in sys.modules, "the vendored copy imported the installed package"
        w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
        H = curv.hessian(lambda w: (w ** 4).sum() + w[0] * w[1], w)
        print((H @ torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)).tolist())
        """,
        cwd=tmp_path / "app",
    )
    assert result.returncode == 0, result.stderr
    # d²/dw² of Σw⁴ + w0 w1 at (1, 2, 3), first column: (12·1², 1, 0)
    assert result.stdout.strip() == "[12.0, 1.0, 0.0]"
