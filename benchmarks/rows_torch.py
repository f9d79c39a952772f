"""PyTorch rows: multihess beside hand-written torch.func / autograd code and the peers.

Hand-written products (torch.func and autograd, the best a user would write):

* HVP: forward-over-reverse ``jvp(grad(f))``; reverse-over-reverse ``vjp(grad(f))``
  rebuilt per product and, amortized, with the pullback built once; double
  backward with the gradient graph kept (amortized) or rebuilt per product.
* GGN: ``jvp`` of the network, the analytic softmax Hessian, ``vjp``.
* 10-probe trace: ``vmap`` over the probes of the pullback of the gradient
  (built once), ``vmap`` of forward-over-reverse, and a loop over the kept graph.
* Exact GGN diagonal: per-sample VJPs (``vmap``) of the columns of the square
  root of the softmax Hessian, one class at a time.

PyTorch's fused attention kernels have no second derivative, so on the
transformer the hand-written rows fail as written; they are repeated inside
``sdpa_kernel(SDPBackend.MATH)``, the fix a user would apply.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np
from harness import (
    DENSITY_PROBES,
    DENSITY_TOL,
    EIGEN_RTOL,
    EIGEN_TOL,
    STEPS,
    Bench,
    as_numpy,
    describe,
    estimate,
    matched_lanczos_row,
    top_eigenvalue_rows,
    top_node,
)
from models import Model, torch_models

import multihess as mh

PROBES = 10


def models(scale: str, device: str) -> dict[str, Model]:
    return torch_models(scale, device)


def sync(device: str) -> Callable[[Any], Any]:
    import torch

    def wait(out: Any) -> Any:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    return wait


def run(name: str, spec: Model, bench: Bench) -> None:
    import torch
    from torch.func import functional_call, grad, jvp, vjp, vmap

    model, x, y = spec.model, spec.x, spec.y
    device = x.device
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [p.numel() for p in params.values()]
    n = sum(sizes)
    loss_fn = torch.nn.functional.cross_entropy
    rng = np.random.default_rng(0)

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.float32, device=device)

    def to_tree(flat: torch.Tensor) -> dict:
        return {k: t.view(p.shape) for (k, p), t in zip(params.items(), torch.split(flat, sizes))}

    def flat_of(tree: Any) -> torch.Tensor:
        vals = tree.values() if isinstance(tree, dict) else tree
        return torch.cat([t.reshape(-1) for t in vals])

    def loss_of(p: dict) -> torch.Tensor:
        return loss_fn(functional_call(model, p, (x,)), y)

    def gradient() -> Any:
        return torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))

    bench.add("gradient", "hand-written", "autograd forward + backward", gradient)
    v = tensor(rng.standard_normal(n))
    tree_v = to_tree(v)
    Z = tensor(rng.choice([-1.0, 1.0], size=(PROBES, n)))
    math_attention = _math_attention(model) if name == "transformer" else None
    variants = [("", contextlib.nullcontext)]
    if math_attention is not None:
        variants.append((", math attention", math_attention))

    # --- Hessian-vector products
    def double_backward() -> Any:
        ps = list(model.parameters())
        g = torch.autograd.grad(loss_fn(model(x), y), ps, create_graph=True)
        return torch.autograd.grad(g, ps, list(tree_v.values()))

    for suffix, ctx in variants:
        with ctx():
            bench.add(
                "hvp",
                "hand-written",
                f"torch.func fwd∘rev{suffix}",
                lambda: jvp(grad(loss_of), (params,), (tree_v,))[1],
                as_numpy,
            )
            bench.add(
                "hvp",
                "hand-written",
                f"torch.func rev∘rev{suffix}",
                lambda: vjp(grad(loss_of), params)[1](tree_v)[0],
                as_numpy,
            )
            bench.add("hvp", "hand-written", f"double backward{suffix}", double_backward, as_numpy)
            what = f"torch.func rev∘rev, pullback built once{suffix}"
            try:
                pullback = vjp(grad(loss_of), params)[1]
            except Exception as err:
                bench.fail("hvp", "hand-written", what, describe(err))
            else:
                bench.add("hvp", "hand-written", what, lambda pb=pullback: pb(tree_v)[0], as_numpy)
                del pullback
            what = f"double backward, gradient graph kept{suffix}"
            try:
                ps = list(model.parameters())
                kept = torch.autograd.grad(loss_fn(model(x), y), ps, create_graph=True)
            except Exception as err:
                bench.fail("hvp", "hand-written", what, describe(err))
            else:
                bench.add(
                    "hvp",
                    "hand-written",
                    what,
                    lambda g=kept, ps=ps: torch.autograd.grad(g, ps, list(tree_v.values()), retain_graph=True),
                    as_numpy,
                )
                del kept
    H = mh.hessian(model, data=(x, y), loss="cross_entropy")
    G = mh.ggn(model, data=(x, y), loss="cross_entropy")
    bench.add("hvp", "multihess", "H @ v (operator built once)", lambda: H @ v, as_numpy)

    # --- GGN-vector products
    def ggn_product() -> Any:
        f = lambda p: functional_call(model, p, (x,))  # noqa: E731
        z, jv = jvp(f, (params,), (tree_v,))
        prob = torch.softmax(z, dim=1)
        hz = prob * (jv - (prob * jv).sum(1, keepdim=True)) / z.shape[0]  # softmax Hessian, mean over batch
        return vjp(f, params)[1](hz)[0]

    for suffix, ctx in variants:
        with ctx():
            bench.add("ggn", "hand-written", f"torch.func jvp, H_z, vjp{suffix}", ggn_product, as_numpy)
    bench.add("ggn", "multihess", "G @ v (operator built once)", lambda: G @ v, as_numpy)

    # --- 10-probe traces on the same probes Z; checked against multihess products with Z
    with contextlib.suppress(Exception):
        bench.reference("trace", (as_numpy(H.matmat(Z.T)).T * as_numpy(Z)).sum(1), source="multihess H.matmat(Z)")
    for suffix, ctx in variants:

        def trace_rev_rev() -> Any:
            flat = flat_of(params)

            def g_flat(w: torch.Tensor) -> torch.Tensor:
                return flat_of(grad(loss_of)(to_tree(w)))

            _, pullback = vjp(g_flat, flat)
            return (vmap(lambda z: pullback(z)[0])(Z) * Z).sum(1)

        def trace_fwd_rev() -> Any:
            flat = flat_of(params)
            g_flat = lambda w: flat_of(grad(loss_of)(to_tree(w)))  # noqa: E731
            return (vmap(lambda z: jvp(g_flat, (flat,), (z,))[1])(Z) * Z).sum(1)

        def trace_loop() -> Any:
            ps = list(model.parameters())
            g = torch.autograd.grad(loss_fn(model(x), y), ps, create_graph=True)
            out = []
            for z in Z:
                hz = torch.autograd.grad(g, ps, list(to_tree(z).values()), retain_graph=True)
                out.append((flat_of(hz) * z).sum())
            return torch.stack(out)

        with ctx():
            bench.add(
                "trace",
                "hand-written",
                f"vmap over probes, rev∘rev pullback built once{suffix}",
                trace_rev_rev,
                as_numpy,
            )
            bench.add("trace", "hand-written", f"vmap over probes, fwd∘rev{suffix}", trace_fwd_rev, as_numpy)
            bench.add("trace", "hand-written", f"loop over the kept gradient graph{suffix}", trace_loop, as_numpy)
    ref = bench.refs.get("trace")
    if ref is not None:
        bench.reference("trace_estimate", ref.value.mean(), ref.value.std(ddof=1) / np.sqrt(PROBES), ref.source)
    bench.add(
        "trace",
        "multihess",
        "mh.trace(H, 10), Hutchinson",
        lambda: mh.trace(H, num_probes=PROBES, seed=0),
        estimate,
        check_as="trace_estimate",
    )

    # --- exact GGN diagonal and trace
    def ggn_diag() -> Any:
        def per_sample(p: dict, xn: torch.Tensor, sn: torch.Tensor) -> torch.Tensor:
            return (functional_call(model, p, (xn[None],))[0] * sn).sum()

        with torch.no_grad():
            prob = torch.softmax(model(x), dim=1)
        out = {k: torch.zeros_like(p) for k, p in params.items()}
        for c in range(prob.shape[1]):
            # Column c of S = (diag(√p) − p √pᵀ)/√N, per sample.
            s = (-prob * prob[:, c : c + 1].sqrt()) / x.shape[0] ** 0.5
            s[:, c] += prob[:, c].sqrt() / x.shape[0] ** 0.5
            g = vmap(grad(per_sample), in_dims=(None, 0, 0))(params, x, s)
            for k in out:
                out[k] += (g[k] ** 2).sum(0)
        return out

    bench.add("ggn_diag", "hand-written", "per-sample vmap(grad) through √H_z, class by class", ggn_diag, as_numpy)
    bench.add(
        "ggn_diag", "multihess", "mh.diagonal(G, method='exact')", lambda: mh.diagonal(G, method="exact"), estimate
    )
    ref = bench.refs.get("ggn_diag")
    if ref is not None:
        bench.reference("ggn_trace", ref.value.sum(), source=ref.source)
    bench.add("ggn_trace", "multihess", "mh.trace(G, method='exact')", lambda: mh.trace(G, method="exact"), estimate)
    backpack_rows(model, x, y, names, bench)

    # --- top eigenvalue, checked against Lanczos run to convergence
    top_eigenvalue_rows(bench, H)

    # --- dense Hessian of the last layer's block
    head = {k: params[k] for k in spec.head}

    def hand_dense() -> Any:
        def f(hp: dict) -> torch.Tensor:
            return loss_of({**params, **hp})

        blocks = torch.func.hessian(f)(head)
        rows = [torch.cat([blocks[a][b].reshape(head[a].numel(), -1) for b in head], 1) for a in head]
        return torch.cat(rows, 0)

    for suffix, ctx in variants:
        with ctx():
            bench.add("dense", "hand-written", f"torch.func.hessian (fwd∘rev){suffix}", hand_dense, as_numpy)
    H_head = mh.hessian(model, data=(x, y), loss="cross_entropy", params=list(spec.head))
    bench.add(
        "dense",
        "multihess",
        "mh.hessian(..., params=head).dense(), operator built once",
        H_head.dense,
        as_numpy,
    )
    bench.add(
        "build",
        "multihess",
        "mh.hessian(...) @ v, operator built per call",
        lambda: mh.hessian(model, data=(x, y), loss="cross_entropy") @ v,
        as_numpy,
        check_as="hvp",
    )
    peer_rows(name, model, x, y, v, Z, bench, H)


def _math_attention(model: Any) -> Callable[[], Any] | None:
    """PyTorch's math attention kernel, and the encoder layers' Python path.

    In eval mode ``nn.TransformerEncoderLayer`` takes a fused fast path
    whenever no parameter requires a gradient, as inside ``torch.func``
    transforms, and that path has no forward-mode derivative; train mode
    (dropout is 0, there is no BatchNorm) computes the same function.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None

    @contextlib.contextmanager
    def ctx() -> Any:
        training = model.training
        model.train()
        try:
            with sdpa_kernel(SDPBackend.MATH):
                yield
        finally:
            model.train(training)

    return ctx


def backpack_rows(model: Any, x: Any, y: Any, names: list[str], bench: Bench) -> None:
    """BackPACK's DiagGGNExact: the exact GGN diagonal in one extended backward pass."""
    if importlib.util.find_spec("backpack") is None:
        return
    import torch
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    what = "DiagGGNExact"
    try:
        import torch.nn as nn

        ext = copy.deepcopy(model)
        ext = extend(ext) if isinstance(ext, nn.Sequential) else extend(ext, use_converter=True)
        lossf = extend(nn.CrossEntropyLoss())
        ps = [p for p in ext.parameters() if p.requires_grad]

        def diag() -> list:
            for p in ps:
                p.grad = None
            with backpack(DiagGGNExact()):
                lossf(ext(x), y).backward()
            return [p.diag_ggn_exact for p in ps]

        with torch.enable_grad():
            diag()
    except Exception as err:  # unsupported layers or graphs
        bench.fail("ggn_diag", "BackPACK", what, describe(err))
        bench.fail("ggn_trace", "BackPACK", what + ", summed", describe(err))
        return
    bench.add("ggn_diag", "BackPACK", what, diag, as_numpy)
    bench.add("ggn_trace", "BackPACK", what + ", summed", lambda: sum(d.sum() for d in diag()), lambda t: as_numpy(t))


def peer_rows(name: str, model: Any, x: Any, y: Any, v: Any, Z: Any, bench: Bench, mh_hessian: Any) -> None:
    """PyHessian and curvlinops on the same model and batch, where installed."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    sizes = [p.numel() for p in params]
    tree = [t.reshape(p.shape) for t, p in zip(torch.split(v, sizes), params)]
    if importlib.util.find_spec("pyhessian") is not None:
        from pyhessian import hessian as pyhessian_hessian
        from pyhessian.utils import hessian_vector_product

        try:
            comp = pyhessian_hessian(model, torch.nn.functional.cross_entropy, data=(x, y), cuda=x.is_cuda)
        except Exception as err:  # the fused-attention transformer fails here
            failed = [("hvp", "HVP"), ("trace", "trace"), ("eigen", "top eigenvalue"), ("eigen_tol", "top eigenvalue")]
            failed.append(("density", "spectral density"))
            for q, what in failed:
                bench.fail(q, "PyHessian", what, describe(err))
        else:
            bench.add(
                "hvp",
                "PyHessian",
                "hessian_vector_product, gradient graph kept",
                lambda: hessian_vector_product(comp.gradsH, comp.params, tree),
                as_numpy,
            )

            def trace() -> list:
                torch.manual_seed(0)
                return comp.trace(maxIter=PROBES, tol=0.0)

            bench.add(
                "trace",
                "PyHessian",
                f"trace(maxIter={PROBES}), Hutchinson",
                trace,
                lambda s: (np.mean(s), np.std(s, ddof=1) / np.sqrt(len(s))),
                check_as="trace_estimate",
            )
            # A fixed number of iterations, then PyHessian's defaults (its tol: the relative change per iteration).
            found: dict[str, float] = {}
            for quantity, what, iterations, stop, tol in (
                ("eigen", f"eigenvalues(maxIter={STEPS}), power iteration", STEPS, 0.0, EIGEN_TOL),
                (
                    "eigen_tol",
                    f"eigenvalues(maxIter=100, tol={EIGEN_RTOL:g}), its defaults",
                    100,
                    EIGEN_RTOL,
                    EIGEN_RTOL,
                ),
            ):

                def first(e: list, quantity: str = quantity) -> np.ndarray:
                    found[quantity] = float(e[0])
                    return np.asarray(e[:1], np.float64)

                bench.add(
                    quantity,
                    "PyHessian",
                    what,
                    lambda iterations=iterations, stop=stop: comp.eigenvalues(maxIter=iterations, tol=stop)[0],
                    first,
                    tol=tol,
                )
            if "eigen_tol" in found:  # multihess at the accuracy PyHessian's defaults reached
                matched_lanczos_row(bench, mh_hessian, "PyHessian's defaults", found["eigen_tol"])
            bench.add(
                "density",
                "PyHessian",
                f"density(iter={STEPS}, n_v={DENSITY_PROBES}), full reorthogonalization",
                lambda: comp.density(iter=STEPS, n_v=DENSITY_PROBES)[0],
                top_node,
                tol=DENSITY_TOL,
            )
            del comp
    if importlib.util.find_spec("curvlinops") is not None:
        from curvlinops import GGNLinearOperator, HessianLinearOperator, hutchinson_trace

        try:
            data, criterion = [(x, y)], torch.nn.CrossEntropyLoss()  # curvlinops reads .reduction
            H = HessianLinearOperator(model, criterion, params, data, check_deterministic=False)
            G = GGNLinearOperator(model, criterion, params, data, check_deterministic=False)
        except Exception as err:
            for q in ("hvp", "ggn", "trace"):
                bench.fail(q, "curvlinops", "operator", describe(err))
            return
        bench.add("hvp", "curvlinops", "HessianLinearOperator @ v", lambda: H @ v, as_numpy)
        bench.add("ggn", "curvlinops", "GGNLinearOperator @ v", lambda: G @ v, as_numpy)
        bench.add(
            "trace",
            "curvlinops",
            f"hutchinson_trace(H, {PROBES})",
            lambda: (torch.manual_seed(0), hutchinson_trace(H, PROBES))[1],
            as_numpy,
            check_as="trace_estimate",
        )
