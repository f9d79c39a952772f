"""Results as JSON and as a markdown table, with the machine and the versions."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from harness import DENSITY_PROBES, QUANTITIES, STEPS, Row

PACKAGES = (
    "multihess",
    "torch",
    "jax",
    "jaxlib",
    "tensorflow",
    "tensorflow-cpu",
    "keras",
    "numpy",
    "scipy",
    "pyhessian",
    "curvlinops-for-pytorch",
    "backpack-for-pytorch",
)
PEERS = ("PyHessian", "curvlinops", "BackPACK")


def machine(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        "device": device,
    }
    if "multihess" in sys.modules:
        source = Path(sys.modules["multihess"].__file__).resolve().parent
        info["multihess_source"] = str(source)
        commit = source.parent / "COMMIT"  # a snapshot of the package made with git archive
        info["multihess_commit"] = commit.read_text().strip() if commit.exists() else _git_head(source.parent)
    if device.startswith("cuda") and "torch" in sys.modules:
        import torch

        info["gpu"] = torch.cuda.get_device_name()
    if "torch" in sys.modules:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    if "jax" in sys.modules:
        import jax

        info["jax_devices"] = [str(d) for d in jax.devices()]
    return info


def _git_head(folder: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def best_hand_written(rows: list[Row]) -> dict[tuple[str, str, str], Row]:
    best: dict[tuple[str, str, str], Row] = {}
    for r in rows:
        if r.who == "hand-written" and r.seconds is not None and r.quantity != "gradient" and r.check != "MISMATCH":
            key = (r.framework, r.model, r.quantity)
            if key not in best or r.seconds < best[key].seconds:
                best[key] = r
    return best


def write_results(rows: list[Row], settings: dict, out_dir: Path, tag: str | None, seconds: float) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = tag or f"{settings['device'].split(':')[0]}-{settings['scale']}"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = {
        "date": when,
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "seconds": round(seconds, 1),
        "machine": machine(settings["device"]),
        "versions": versions(),
        "settings": settings,
    }
    best = best_hand_written(rows)
    payload = dict(meta)
    payload["rows"] = []
    for r in rows:
        d = r.to_json()
        b = best.get((r.framework, r.model, r.quantity))
        if r.who != "hand-written" and b is not None and r.seconds is not None:
            d["vs_best_hand_written"] = r.seconds / b.seconds
        payload["rows"].append(d)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(markdown(rows, meta, best))
    return json_path, md_path


def _fmt_ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}×"


def markdown(rows: list[Row], meta: dict, best: dict) -> str:
    m, s = meta["machine"], meta["settings"]
    lines = [
        f"# Benchmarks: {s['device']}, scale {s['scale']}",
        "",
        f"{meta['date']}; `{meta['command']}`; {meta['seconds']:.0f} s in all.",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in m.items() if v is not None) + ".",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "",
        (
            "`--quick`: each row is called once and that call is timed (compilation included): a smoke test, "
            if s.get("quick")
            else f"Each time is the median of {s['repeats']} repeats after {s['warmup']} warm-up call(s); "
            f"a repeat is the mean of as many calls as fill {s.get('min_ms', 0):g} ms (at least one), "
        )
        + "in one process; "
        "**× grad** divides it by one gradient (forward + backward) of the same model, batch and framework; "
        "**vs hand** divides it by the fastest hand-written row for the same quantity (below 1 is faster). "
        "Peak memory is the growth of the resident set during one call on CPU, measured in a second process "
        "whose heap maps every block over 128 KiB, so that the growth shows (`max_memory_allocated` on CUDA). "
        "**check**: agreement with the reference of the quantity, computed before timing "
        "(relative 2-norm difference, or for estimates with independent probes the difference in combined "
        "standard errors).",
        "",
        "Notes: hand-written rows marked *math attention* run inside `sdpa_kernel(SDPBackend.MATH)` with the "
        "encoder in train mode (dropout 0), the change a user must make for second derivatives of PyTorch's "
        "fused attention; the unmarked rows use the model as it is, as multihess and the peers do. "
        "Eigenvalue rows are checked against Lanczos run to convergence; *unconverged* means more than 1 % off "
        "after 20 iterations. TensorFlow runs with `TF_ENABLE_ONEDNN_OPTS=0` (see `run.py`), and its "
        "hand-written rows with `tf.nn.moments` replaced by a version differentiated through the mean (see "
        "`rows_tf.py`): TensorFlow's own drops second-order terms of LayerNorm, as multihess corrects itself.",
        "",
    ]
    lines += summary(rows, best)
    lines += krylov_cost(rows)
    for framework in dict.fromkeys(r.framework for r in rows):
        for model in dict.fromkeys(r.model for r in rows if r.framework == framework):
            sub = [r for r in rows if r.framework == framework and r.model == model]
            lines += ["", f"## {framework}: {model}", ""]
            lines += [
                "| quantity | who | what | time (ms) | × grad | vs hand | peak MiB | check |",
                "|---|---|---|---:|---:|---:|---:|---|",
            ]
            order = {q: i for i, q in enumerate(QUANTITIES)}
            for r in sorted(sub, key=lambda r: order.get(r.quantity, 99)):
                q = QUANTITIES.get(r.quantity, r.quantity)
                if r.error:
                    lines.append(f"| {q} | {r.who} | {r.what} | {_escape(r.error)} | | | | |")
                    continue
                b = best.get((r.framework, r.model, r.quantity))
                vs = _fmt_ratio(r.seconds / b.seconds) if b is not None and r.who != "hand-written" else ""
                if r is b:
                    vs = "best"
                mem = "" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.1f}"
                lines.append(
                    f"| {q} | {r.who} | {_escape(r.what)} | {r.seconds * 1e3:.2f} | {_fmt_ratio(r.ratio)} | {vs} "
                    f"| {mem} | {r.check} |"
                )
    return "\n".join(lines) + "\n"


UNCHECKED = "check_finite=False"
"""Rows with this in their description skip the finiteness test of their input; the summary leaves them out."""


def summary(rows: list[Row], best: dict) -> list[str]:
    """One line per framework and model: ratios to one gradient, multihess beside the fastest alternative."""
    cols = ["hvp", "ggn", "trace", "ggn_diag", "ggn_trace", "eigen", "eigen_tol", "density"]
    lines = [
        "## Summary: fastest multihess / fastest hand-written / fastest peer, each × one gradient",
        "",
        f"multihess with its default checks; the rows marked `{UNCHECKED}` are in the tables below.",
        "",
        "| framework | model | " + " | ".join(QUANTITIES[c] for c in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for framework, model in dict.fromkeys((r.framework, r.model) for r in rows if r.model != "-"):
        cells = []
        for c in cols:
            sub = [r for r in rows if (r.framework, r.model, r.quantity) == (framework, model, c)]
            # The fastest way through multihess (a flat vector or a tree), as for the others, with its checks on:
            # the rows without them are in the model's table.
            ours = [r for r in sub if r.who == "multihess" and UNCHECKED not in r.what]
            timed = [r for r in ours if not r.error and r.ratio is not None]
            mh = min(timed, key=lambda r: r.ratio) if timed else (ours[0] if ours else None)
            hand = best.get((framework, model, c))
            peers = [r for r in sub if r.who in PEERS and r.ratio is not None]
            peer = min(peers, key=lambda r: r.ratio) if peers else None
            parts = [
                "fails" if mh is not None and mh.error else _fmt_ratio(mh.ratio) if mh is not None else "–",
                _fmt_ratio(hand.ratio) if hand is not None else "–",
                f"{_fmt_ratio(peer.ratio)} {peer.who}" if peer is not None else "–",
            ]
            cells.append(" / ".join(parts))
        lines.append(f"| {framework} | {model} | " + " | ".join(cells) + " |")
    return lines


FLAT_PRODUCT = "H @ v (operator built once)"
"""The product row that Krylov methods make at each step: a flat vector in, a flat vector out."""

TREE_PRODUCT = "H @ tree (operator built once)"


def krylov_cost(rows: list[Row]) -> list[str]:
    """Spectra against the products they are made of: 20 Lanczos steps ÷ 20 Hessian-vector products, same run.

    The steps' products take and give flat vectors, so the first ratio
    divides by the ``H @ v`` row; the second by ``H @ tree`` where a
    framework's flat products cost more than its tree products.  The
    density's starts advance together (20 products of 2 rows each),
    divided by as many flat products as rows (40).
    """
    products = DENSITY_PROBES * STEPS
    lines = [
        "",
        f"## Spectra at the cost of their products: {STEPS} Lanczos steps ÷ {STEPS} Hessian-vector products",
        "",
        "| framework | model | H @ v (ms) | H @ tree (ms) | "
        f"{STEPS} Lanczos steps (ms) | ÷ {STEPS} × H @ v | ÷ {STEPS} × H @ tree | density ÷ {products} × H @ v |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]

    def seconds(framework: str, model: str, quantity: str, what: str | None = None) -> float | None:
        for r in rows:
            if (r.framework, r.model, r.quantity, r.who) == (framework, model, quantity, "multihess"):
                if (what is None or r.what == what) and not r.error and r.seconds is not None:
                    return r.seconds
        return None

    def ratio(total: float | None, count: int, each: float | None) -> str:
        return "–" if total is None or each is None else f"{total / (count * each):.2f}"

    found = False
    for framework, model in dict.fromkeys((r.framework, r.model) for r in rows if r.model != "-"):
        flat = seconds(framework, model, "hvp", FLAT_PRODUCT)
        tree = seconds(framework, model, "hvp", TREE_PRODUCT)
        eigen = seconds(framework, model, "eigen")
        density = seconds(framework, model, "density")
        if eigen is None or (flat is None and tree is None):
            continue
        found = True
        ms = lambda x: "–" if x is None else f"{x * 1e3:.2f}"  # noqa: E731
        lines.append(
            f"| {framework} | {model} | {ms(flat)} | {ms(tree)} | {ms(eigen)} | {ratio(eigen, STEPS, flat)} "
            f"| {ratio(eigen, STEPS, tree)} | {ratio(density, products, flat)} |"
        )
    return lines if found else []


def _escape(text: str) -> str:
    return text.replace("|", "\\|")
