"""pytest plugin: new torch tensors on CUDA, for running the conformance suite on a GPU.

The suite makes its torch arrays with the array namespace's ``asarray``, which
follows torch's default device; it has no device option of its own.  Usage::

    PYTHONPATH=benchmarks python -m multihess.conformance --backend torch --backend jax -p cuda_default_device

JAX needs nothing: it places arrays on its default device, the GPU when
``jax[cuda]`` is installed.
"""

from __future__ import annotations


def pytest_configure(config: object) -> None:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("cuda_default_device: torch sees no CUDA device")
    torch.set_default_device("cuda")
