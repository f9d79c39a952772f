"""Backend dispatch: by type, by name, by registration and by entry point."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import multihess as mh


def test_numpy_only_input_names_no_framework() -> None:
    with pytest.raises(TypeError, match="could not tell which framework"):
        mh.hessian(lambda w: (w**2).sum(), np.ones(3))


def test_unknown_model_type_is_a_clear_error() -> None:
    class NotAModel:
        shape = (3,)

    with pytest.raises(TypeError, match="belongs to no known backend"):
        mh.hessian(lambda w: w, NotAModel())


def test_register_backend_by_class() -> None:
    from multihess.backends.torch_backend import TorchBackend

    @mh.register_backend
    class RenamedTorch(TorchBackend):
        name = "renamed_torch"

    w = torch.tensor([1.0, -2.0], dtype=torch.float64)
    H = mh.hessian(lambda w: (w**3).sum(), w, backend="renamed_torch")
    assert H.backend.name == "renamed_torch"
    # d²/dw² Σ w³ = diag(6 w)
    assert np.allclose(H.dense().numpy(), np.diag([6.0, -12.0]), rtol=0, atol=1e-12)
    with pytest.raises(TypeError, match="Backend subclass"):
        mh.register_backend(object)


def test_entry_point_backend(tmp_path: pathlib.Path) -> None:
    """A third party's backend, found through the entry-point group ``multihess.backends``."""
    (tmp_path / "thirdparty_curv.py").write_text(
        textwrap.dedent(
            """
            from multihess.backends.torch_backend import TorchBackend

            class ThirdPartyBackend(TorchBackend):
                name = "thirdparty"
            """
        )
    )
    dist = tmp_path / "thirdparty_curv-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-curv\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[multihess.backends]\nthirdparty = thirdparty_curv:ThirdPartyBackend\n")
    code = textwrap.dedent(
        """
        import torch, multihess as mh
        w = torch.tensor([1.0, 2.0], dtype=torch.float64)
        H = mh.hessian(lambda w: (w ** 4).sum(), w, backend="thirdparty")
        print(H.backend.name, H.dense().diagonal().tolist())
        """
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    # d²/dw² Σ w⁴ = 12 w²
    assert result.stdout.split() == ["thirdparty", "[12.0,", "48.0]"]
