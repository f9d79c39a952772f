"""The docstring examples of the package run, on a small PyTorch network, and their outputs hold.

Each module of ``multihess`` (and its backends) is run through ``doctest``
with a namespace holding ``mh``, ``np``, ``torch`` and a 4-8-3 tanh network
``model`` in float64 with a batch ``(x, y)``.  A module whose examples were
all skipped would not count: every example runs.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import numpy as np
import pytest
import torch

import multihess as mh


def _namespace() -> dict:
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x = torch.randn(32, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=generator)
    return {"mh": mh, "np": np, "torch": torch, "model": model, "x": x, "y": y}


MODULES = sorted(
    f"{package.__name__}.{info.name}"
    for package in (mh,)
    for info in pkgutil.iter_modules(package.__path__)
    if not info.ispkg and info.name != "__main__"
)


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name: str) -> None:
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    # The module's own names first (its helpers), then the shared example objects.
    for test in finder.find(module, module_name, globs={**vars(module), **_namespace()}):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples in {module_name} failed"


def test_every_public_function_has_a_running_example() -> None:
    skipped = []
    for name in mh.__all__:
        obj = getattr(mh, name)
        if callable(obj) and not isinstance(obj, type) and obj.__doc__ and "+SKIP" in obj.__doc__:
            skipped.append(name)
    assert not skipped, f"examples marked +SKIP: {skipped}"
