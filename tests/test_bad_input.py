"""Bad input that only a PyTorch ``nn.Module`` can give gets a clear error.

Everything backend-neutral (vectors, data, losses, parameter selection,
estimator, spectrum and chain-rule arguments) is checked for every backend
by the conformance suite (``conformance/test_bad_input.py``,
``conformance/test_bad_arguments.py``).  What remains here is about modules:
their parameter dicts, frozen parameters, training mode and layer names.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import multihess as mh


@pytest.fixture()
def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    return model, x, y


def test_v_tree_of_a_module(problem) -> None:
    model, x, y = problem
    H = mh.hessian(model, data=(x, y), loss="cross_entropy")
    tree = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    tree["0.weight"] = torch.ones(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"v\['0.weight'\] has shape"):
        H @ tree
    del tree["0.weight"]
    with pytest.raises(ValueError, match="parameters are"):
        H @ tree
    with pytest.raises(TypeError, match="dict keyed by parameter names"):
        H @ [torch.ones_like(p) for p in model.parameters()]


def test_module_without_trainable_parameters(problem) -> None:
    model, x, y = problem
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        mh.hessian(model, data=(x, y), loss="cross_entropy")


def test_module_in_training_mode(problem) -> None:
    _, x, y = problem
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double().train()
    with pytest.raises(ValueError, match="not deterministic.*model.eval"):
        mh.hessian(model, data=(x, y), loss="cross_entropy")
    mh.hessian(model.eval(), data=(x, y), loss="cross_entropy")


class _OneStrayEvaluation(nn.Module):
    """A linear model whose second evaluation alone is off by ``gap`` (a kernel that rounds differently once)."""

    def __init__(self, gap: float) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2).double()
        self.gap, self.calls = gap, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.linear(x)
        return out + self.gap if self.calls == 2 else out


def test_one_stray_evaluation_warns_instead_of_refusing(problem) -> None:
    _, x, _ = problem
    y = torch.zeros(x.shape[0], dtype=torch.long)
    with pytest.warns(RuntimeWarning, match="differed by up to 0.001"):
        mh.hessian(_OneStrayEvaluation(1e-3), data=(x, y), loss="cross_entropy")


def test_nan_in_a_module_parameter(problem) -> None:
    model, x, y = problem
    with torch.no_grad():
        model[0].bias[0] = float("nan")
    with pytest.raises(ValueError, match="parameters contain NaN"):
        mh.ggn(model, data=(x, y), loss="cross_entropy")


def test_exact_diagonal_with_a_torch_loss_function(problem) -> None:
    model, x, y = problem
    G = mh.ggn(model, data=(x, y), loss=nn.functional.cross_entropy)
    for method in ("exact", "mc"):
        with pytest.raises(ValueError, match="callable loss has none: use method='hutchinson' or 'xdiag'"):
            mh.diagonal(G, method=method)


def test_groups_of_a_module_by_submodule(problem) -> None:
    model, x, y = problem
    args = dict(data=(x, y), loss="cross_entropy")
    with pytest.raises(ValueError, match=r"group 'head': params='3\.\*' matches no parameter"):
        mh.chain_rule_error(model, **args, groups={"head": "3.*"})
    with pytest.raises(TypeError, match="groups given as a list must hold parameter names or glob patterns"):
        mh.chain_rule_error(model, **args, groups=[model[0].weight])
    # Without groups, the layers are the submodules holding parameters (the Tanh at index 1 has none).
    report = mh.chain_rule_error(model, **args, direction=torch.zeros(26, dtype=torch.float64))
    assert list(report) == ["all", "0", "2"]
