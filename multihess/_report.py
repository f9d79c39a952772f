"""A model's curvature in one call: spectrum, traces, per-layer blocks, chain-rule error; as text, JSON and PNGs."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._chain_rule_error import ChainRuleResult, chain_rule_errors
from ._checks import check_count
from ._estimate import Estimate
from ._ggn import GGNOperator
from ._hessian import HessianOperator
from ._problem import build_loss_problem
from ._spectral import SpectralDensity, eigvalsh, spectral_density
from ._summary import summary
from ._trace import trace

PLOT_HINT = "plots need matplotlib: pip install 'multihess[plot]'"
_TRACE_METHODS = ("hutchinson", "hutch++", "xtrace")
_STAGES = (
    "top eigenvalues of H",
    "top eigenvalues of G",
    "trace of H",
    "trace of G",
    "per-layer blocks of H",
    "per-layer blocks of G",
    "spectral density of H",
    "chain-rule error",
)


@dataclass(frozen=True)
class LayerCurvature:
    """Curvature of one parameter group: the diagonal blocks ``H[g, g]`` and ``G[g, g]``.

    Attributes
    ----------
    names : list of str
        The group's parameters.
    size : int
        Number of scalar parameters in the group.
    hessian_trace : Estimate
        Trace of the Hessian block (Hutchinson, with its standard error).
    ggn_trace : Estimate
        Trace of the GGN block (exact).
    hessian_top : float
        Largest eigenvalue of the Hessian block (Lanczos).
    ggn_top : float
        Largest eigenvalue of the GGN block (Lanczos).
    chain_rule : ChainRuleResult
        ``g_gᵀ G g_g`` against ``g_gᵀ H g_g`` with ``g_g`` the gradient on the group.
    """

    names: list[str]
    size: int
    hessian_trace: Estimate
    ggn_trace: Estimate
    hessian_top: float
    ggn_top: float
    chain_rule: ChainRuleResult


@dataclass(frozen=True)
class Report:
    """Everything :func:`report` measured; ``str(report)`` is the table, :meth:`to_dict` the JSON.

    Attributes
    ----------
    num_parameters : int
        Number of scalar parameters (of the selected subset).
    hessian_top, ggn_top : ndarray of float64
        Top eigenvalues of the Hessian ``H`` and of the GGN ``G``, descending.
    hessian_trace : Estimate
        Trace of ``H`` by the chosen randomized method.
    ggn_trace : Estimate
        Exact trace of ``G``.
    layers : dict of str to LayerCurvature
        One entry per parameter group.
    density : SpectralDensity
        Eigenvalue density of ``H`` (stochastic Lanczos quadrature).
    chain_rule : ChainRuleResult
        The approximate chain rule along the whole gradient.
    files : list of Path
        What :func:`report` wrote under ``out`` (empty without ``out``).
    notes : list of str
        Remarks for the reader, e.g. how to get the plots.
    """

    num_parameters: int
    hessian_top: np.ndarray
    ggn_top: np.ndarray
    hessian_trace: Estimate
    ggn_trace: Estimate
    layers: dict[str, LayerCurvature]
    density: SpectralDensity
    chain_rule: ChainRuleResult
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        """The numbers as a plain-text table."""
        return format_table(self)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        """The numbers as JSON-ready Python types (what ``report.json`` holds)."""
        return report_dict(self)


def report(
    model: Any,
    weights: Any = None,
    *,
    data: Any,
    loss: Any,
    params: Any = None,
    groups: Any = None,
    reduction: str = "mean",
    backend: str | None = None,
    k: int = 5,
    num_probes: int = 20,
    trace_method: str = "xtrace",
    density_probes: int = 5,
    density_steps: int = 30,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    progress: bool | None = None,
    verbose: bool = True,
    batch_fn: Any = None,
    cache_data: bool = False,
    distributed: Any = None,
) -> Report:
    """Tell about a model's curvature in one call: spectrum, traces, per-layer blocks, chain-rule error.

    Computes, for the exact Hessian ``H`` and the generalized Gauss-Newton
    matrix ``G`` (the approximate chain rule) of the loss on ``data``:

    - the ``k`` top eigenvalues of ``H`` and of ``G`` (Lanczos, :func:`eigvalsh`);
    - the trace of ``H`` (``trace_method``) and the exact trace of ``G`` (:func:`trace`);
    - per parameter group (default: per layer): traces and top eigenvalues of
      the diagonal blocks of ``H`` and ``G`` (:func:`summary`);
    - the eigenvalue density of ``H`` (:func:`spectral_density`);
    - the chain-rule error ``|gᵀGg − gᵀHg| / ‖g‖²`` along the gradient, whole and
      per group (:func:`chain_rule_error`).

    Parameters
    ----------
    model, weights, data, loss, params, reduction, backend, batch_fn, cache_data, distributed
        As for :func:`hessian`; ``data`` and ``loss`` are required.  ``H``,
        ``G`` and the chain-rule error share one problem, so a one-shot
        iterator with ``cache_data=True`` is read once.
    groups : dict or list, optional
        Parameter groups, as for :func:`summary`; default one per layer.
    k : int
        Number of top eigenvalues (at most the number of parameters).
    num_probes : int
        Probes of the Hessian trace, whole and per group.
    trace_method : {"xtrace", "hutch++", "hutchinson"}
        Estimator of the whole Hessian's trace; the per-group traces use
        Hutchinson with probes batched over the groups.
    density_probes, density_steps : int
        Probes and Lanczos steps of the spectral density.
    seed : int
        One seed for every probe and starting vector: the same numbers in every framework.
    out : str or path, optional
        Folder to write ``report.json`` and, when matplotlib is installed,
        ``density.png`` and ``layers.png`` into (created if missing).
    progress : bool, optional
        Show progress: a tqdm bar when tqdm is installed, else a line per stage
        on stderr.  Default: on when tqdm is installed.  Also passed to the
        operators (bars over passes and batches; ``False`` silences them).
    verbose : bool
        Print the table.

    Returns
    -------
    Report

    Examples
    --------
    >>> r = mh.report(model, data=(x, y), loss="cross_entropy", k=2, progress=False, verbose=False)
    >>> H = mh.hessian(model, data=(x, y), loss="cross_entropy")
    >>> bool(np.isclose(r.hessian_top[0], np.linalg.eigvalsh(H.dense().numpy())[-1]))
    True
    >>> r.layers["2"].chain_rule.relative_error < 1e-12  # the last layer: G == H
    True
    """
    k = check_count(k, "k")
    num_probes = check_count(num_probes, "num_probes")
    density_probes = check_count(density_probes, "density_probes")
    density_steps = check_count(density_steps, "density_steps")
    if trace_method not in _TRACE_METHODS:
        raise ValueError(f"unknown trace_method={trace_method!r}; choose one of {', '.join(map(repr, _TRACE_METHODS))}")
    out = _check_out(out)
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None (automatic), got {type(progress).__name__}")

    # One problem for H, G and the chain-rule error: the data source is opened (or cached) once.
    problem = build_loss_problem(
        model, weights, data, loss, params, reduction, backend, batch_fn, progress, cache_data, distributed
    )
    H, G = HessianOperator(problem), GGNOperator(problem)
    k = min(k, H.shape[0])
    stages = _stages(progress)
    results: dict[str, Any] = {}
    steps: dict[str, Callable[[], Any]] = {
        "top eigenvalues of H": lambda: eigvalsh(H, k=k, seed=seed),
        "top eigenvalues of G": lambda: eigvalsh(G, k=k, seed=seed),
        "trace of H": lambda: trace(H, num_probes=max(num_probes, 3), method=trace_method, seed=seed),
        "trace of G": lambda: trace(G, method="exact"),
        "per-layer blocks of H": lambda: summary(H, groups, num_probes=num_probes, method="hutchinson", seed=seed),
        "per-layer blocks of G": lambda: summary(G, groups, method="exact", seed=seed),
        "spectral density of H": lambda: spectral_density(
            H, num_probes=density_probes, num_steps=density_steps, seed=seed
        ),
        "chain-rule error": lambda: chain_rule_errors(problem, None, groups),
    }
    for stage in stages:
        results[stage] = steps[stage]()

    result = _assemble(H.shape[0], results)
    if out is not None:
        _save(result, out)
    if verbose:
        print(result.table())
    return result


# ----------------------------------------------------------------------
# Argument checks and progress
# ----------------------------------------------------------------------
def _check_out(out: Any) -> Path | None:
    if out is None:
        return None
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a folder path (str or os.PathLike), got {type(out).__name__}")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"out={str(out)!r} is a file; pass a folder for report.json and the plots")
    return path


def _stages(progress: bool | None) -> Iterator[str]:
    """The stages, wrapped in a tqdm bar, a line per stage on stderr, or bare."""
    if progress is False:
        return iter(_STAGES)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _text_progress() if progress else iter(_STAGES)
    return _tqdm_progress(tqdm)


def _tqdm_progress(tqdm: Any) -> Iterator[str]:
    bar = tqdm(_STAGES, desc="report", unit="stage", leave=False)
    for stage in bar:
        bar.set_postfix_str(stage)
        yield stage


def _text_progress() -> Iterator[str]:
    # Without tqdm (e.g. a vendored copy): one line per stage, on stderr so that the table stays clean.
    for i, stage in enumerate(_STAGES, 1):
        print(f"report [{i}/{len(_STAGES)}] {stage}", file=sys.stderr, flush=True)
        yield stage


# ----------------------------------------------------------------------
# Assembling, formatting, saving
# ----------------------------------------------------------------------
def _assemble(n: int, results: dict[str, Any]) -> Report:
    hess_blocks, ggn_blocks = results["per-layer blocks of H"], results["per-layer blocks of G"]
    errors = results["chain-rule error"]
    layers = {}
    for name, h in hess_blocks.items():
        g = ggn_blocks[name]
        size = int(np.size(_numpy(g.diagonal.value)))
        layers[name] = LayerCurvature(
            list(h.names), size, h.trace, g.trace, float(h.top_eigenvalue), float(g.top_eigenvalue), errors[name]
        )
    return Report(
        num_parameters=n,
        hessian_top=np.asarray(results["top eigenvalues of H"], dtype=np.float64),
        ggn_top=np.asarray(results["top eigenvalues of G"], dtype=np.float64),
        hessian_trace=results["trace of H"],
        ggn_trace=results["trace of G"],
        layers=layers,
        density=results["spectral density of H"],
        chain_rule=errors["all"],
    )


def _numpy(a: Any) -> np.ndarray:
    """A framework array on the host (any of the three frameworks), without importing one."""
    if hasattr(a, "detach"):  # torch
        a = a.detach().cpu()
    return np.asarray(a)


def format_table(r: Report) -> str:
    """The report as plain text: whole-model numbers, then one row per group."""

    def values(v: np.ndarray) -> str:
        return ", ".join(f"{x:.4g}" for x in v)

    lines = [
        f"curvature of {r.num_parameters} parameters (H: Hessian, G: Gauss-Newton / approximate chain rule)",
        f"  top eigenvalues of H : {values(r.hessian_top)}",
        f"  top eigenvalues of G : {values(r.ggn_top)}",
        f"  trace of H           : {r.hessian_trace.value:.6g} ± {r.hessian_trace.std_error:.2g} "
        f"({r.hessian_trace.method}, {r.hessian_trace.num_probes} probes)",
        f"  trace of G           : {r.ggn_trace.value:.6g} (exact)",
        f"  chain-rule error     : {r.chain_rule.relative_error:.3g} along the gradient "
        f"(gᵀHg = {r.chain_rule.vHv:.4g}, gᵀGg = {r.chain_rule.vGv:.4g})",
        "",
    ]
    head = ("layer", "params", "tr H", "± tr H", "tr G", "λmax H", "λmax G", "chain-rule error")
    rows = [
        (
            name,
            str(layer.size),
            f"{layer.hessian_trace.value:.4g}",
            f"{layer.hessian_trace.std_error:.2g}",
            f"{layer.ggn_trace.value:.4g}",
            f"{layer.hessian_top:.4g}",
            f"{layer.ggn_top:.4g}",
            f"{layer.chain_rule.relative_error:.3g}",
        )
        for name, layer in r.layers.items()
    ]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    for row in [head, tuple("-" * w for w in widths), *rows]:
        cells = (cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        lines.append("  " + "  ".join(cells))
    for note in r.notes:
        lines.append(f"note: {note}")
    for path in r.files:
        lines.append(f"wrote {path}")
    return "\n".join(lines)


def _estimate_dict(e: Estimate) -> dict[str, Any]:
    return {"value": float(e.value), "std_error": float(e.std_error), "num_probes": e.num_probes, "method": e.method}


def _chain_dict(c: ChainRuleResult) -> dict[str, float]:
    return {"gGg": c.vGv, "gHg": c.vHv, "relative_error": c.relative_error}


def report_dict(r: Report) -> dict[str, Any]:
    """The report's numbers as JSON-ready Python types."""
    return {
        "num_parameters": r.num_parameters,
        "hessian_top_eigenvalues": r.hessian_top.tolist(),
        "ggn_top_eigenvalues": r.ggn_top.tolist(),
        "hessian_trace": _estimate_dict(r.hessian_trace),
        "ggn_trace": _estimate_dict(r.ggn_trace),
        "chain_rule": _chain_dict(r.chain_rule),
        "layers": {
            name: {
                "parameters": layer.names,
                "size": layer.size,
                "hessian_trace": _estimate_dict(layer.hessian_trace),
                "ggn_trace": _estimate_dict(layer.ggn_trace),
                "hessian_top_eigenvalue": layer.hessian_top,
                "ggn_top_eigenvalue": layer.ggn_top,
                "chain_rule": _chain_dict(layer.chain_rule),
            }
            for name, layer in r.layers.items()
        },
        "density": {
            "grid": r.density.grid.tolist(),
            "density": r.density.density.tolist(),
            "sigma": r.density.sigma,
            "nodes": r.density.nodes.tolist(),
            "weights": r.density.weights.tolist(),
        },
    }


def _save(r: Report, out: Path) -> None:
    """``report.json`` always; ``density.png`` and ``layers.png`` when matplotlib is installed (else a note)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    path.write_text(json.dumps(report_dict(r), indent=1))
    r.files.append(path)
    try:
        import matplotlib
    except ImportError:
        r.notes.append(PLOT_HINT)
        return
    r.files.extend(_plots(r, out, matplotlib))


def _plots(r: Report, out: Path, matplotlib: Any) -> list[Path]:
    # A non-interactive canvas: the report may run on a machine without a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    del matplotlib  # imported by the caller only to learn whether it is installed
    paths = []
    fig = Figure(figsize=(5, 3.2), dpi=90)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.semilogy(r.density.grid, np.maximum(r.density.density, 1e-12))
    ax.set_xlabel("eigenvalue of H")
    ax.set_ylabel("density")
    ax.set_title(f"spectral density of the Hessian ({r.num_parameters} parameters)", fontsize=9)
    fig.tight_layout()
    paths.append(out / "density.png")
    fig.savefig(paths[-1])

    names = list(r.layers)
    x = np.arange(len(names))
    fig = Figure(figsize=(max(5.0, 0.7 * len(names) + 2), 6.5), dpi=90)
    FigureCanvasAgg(fig)
    panels = fig.subplots(3, 1, sharex=True)
    pairs = [
        ("trace", [r.layers[n].hessian_trace.value for n in names], [r.layers[n].ggn_trace.value for n in names]),
        ("top eigenvalue", [r.layers[n].hessian_top for n in names], [r.layers[n].ggn_top for n in names]),
    ]
    for ax, (label, h, g) in zip(panels[:2], pairs):
        ax.bar(x - 0.2, h, 0.4, label="Hessian H")
        ax.bar(x + 0.2, g, 0.4, label="GGN G")
        ax.set_ylabel(label, fontsize=8)
        ax.legend(fontsize=7)
    errors = [max(r.layers[n].chain_rule.relative_error, 1e-16) for n in names]
    panels[2].bar(x, errors, 0.5, color="tab:red")
    panels[2].set_yscale("log")
    panels[2].set_ylabel("|gᵀGg − gᵀHg| / ‖g‖²", fontsize=8)
    panels[2].set_xticks(x, names, rotation=30, ha="right", fontsize=7)
    panels[0].set_title("per-layer curvature", fontsize=9)
    fig.tight_layout()
    paths.append(out / "layers.png")
    fig.savefig(paths[-1])
    return paths
