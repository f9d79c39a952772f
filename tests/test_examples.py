"""The seed examples at their ``--quick`` size: each runs in a subprocess within a time bound, and its numbers
are checked against what theory or an independent computation says they must be."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIME_BOUND = 240  # seconds; the quick runs take 5–40 s on two busy CPU cores


def run_example(name: str, *args: str) -> str:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=TIME_BOUND,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def table_rows(text: str, title: str) -> dict[str, list[str]]:
    """The rows of the markdown table under the bold line starting with ``title``: first cell → the other cells."""
    block = text[text.index(f"**{title}") :]
    rows = {}
    for line in block.splitlines()[2:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] not in ("layer", "initialization", "direction") and not cells[0].startswith("---"):
            rows[cells[0]] = cells[1:]
    return rows


def extremes(cell: str) -> tuple[float, float]:
    """``"lo – hi (median)"`` → ``(lo, hi)``."""
    lo, hi = re.match(r"(\S+) – (\S+) ", cell).groups()
    return float(lo), float(hi)


def test_fig3_frameworks_agree_and_exact_layers_are_exact(tmp_path):
    out = run_example("seed_fig3_chain_rule_error.py", "--out", str(tmp_path))
    lenet = table_rows(out, "LeNet-5 variant, tanh")
    tf, torch, jax, spread = (lenet["dense3"][i] for i in (1, 2, 3, 4))
    # The last dense layer enters the logits linearly: G equals H on its block, up to float32 rounding.
    assert all(extremes(c)[1] < 1e-6 for c in (tf, torch, jax))
    for layer in ("conv1", "conv2", "dense1", "dense2", "all"):
        lows = [extremes(c)[0] for c in lenet[layer][1:4]]
        assert min(lows) > 1e-4  # tanh layers before the last: the curvature effect is there
        # Same weights in TensorFlow, PyTorch and JAX: the same errors, to float32 accuracy.
        assert float(lenet[layer][4]) < 1e-4 * min(lows) + 1e-6
    # A ReLU ResNet is piecewise linear in any one layer: every single layer is exact, the whole gradient is not.
    resnet = table_rows(out, "resnet")
    assert all(extremes(cells[0])[1] < 1e-6 for name, cells in resnet.items() if name != "all")
    assert extremes(resnet["all"][0])[0] > 1e-4
    # The transformer's attention and normalization are not; its MLP output and head enter linearly.
    transformer = table_rows(out, "transformer")
    assert extremes(transformer["query"][0])[0] > 1e-6 and extremes(transformer["embed"][0])[0] > 1e-4
    assert extremes(transformer["mlp2"][0])[1] < 1e-6 and extremes(transformer["head"][0])[1] < 1e-6
    assert float(transformer["embed"][-1]) < 1e-4 * extremes(transformer["embed"][0])[0]  # Keras == PyTorch
    assert sorted(p.name for p in tmp_path.glob("fig3_lenet_tanh_*.png")) == [
        f"fig3_lenet_tanh_{layer}.png" for layer in ("all", "conv1", "conv2", "dense1", "dense2", "dense3")
    ]


def test_fig1_curvature_matches_second_differences(tmp_path):
    out = run_example("seed_fig1_landscape.py", "--out", str(tmp_path))
    rows = table_rows(out, "Loss landscape")
    assert set(rows) == {"1", "2"}
    for exact, difference in rows.values():
        # dᵀHd from multihess against a float64 central difference of the loss (error O(h²) = 1e-4 relative).
        assert float(exact) == pytest.approx(float(difference), rel=2e-3)
    for name in ("landscape_contour.png", "landscape_surface.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fig4_curvature_scale_and_training():
    out = run_example("seed_fig4_curvature_init.py")
    rows = table_rows(out, "Lowest training cross-entropy")
    assert set(rows) == {
        "ReLU, curvature-driven (target 10)",
        "ReLU, He normal",
        "tanh, Glorot uniform",
        "tanh, orthogonal",
    }
    reached = re.search(r"gᵀHg/‖g‖² = (\S+)", rows["ReLU, curvature-driven (target 10)"][2]).group(1)
    assert float(reached) == pytest.approx(10.0, rel=1e-3)  # the bisection hit its target
    for name, (loss, seed_value, _) in rows.items():
        # Two epochs of SGD must beat the uniform prediction, whose cross-entropy is ln 10 = 2.303.
        assert float(loss.split()[0]) < 2.302585, name
        assert seed_value in ("0.399", "0.486", "0.507", "0.533")
