"""Curvature products side by side with hand-written code and peers, as ratios to one gradient.

Every row runs in one process on the same batch as its framework's gradient.
Before a row is timed its result is checked against the reference of the same
quantity (hand-written code, or multihess where nothing else computes it);
then it is timed as the median of ``--repeats`` repeats after a warm-up (each
repeat the mean of as many calls as fill ``--min-ms``), and its
peak memory is taken on one more call (on a CPU in a second process, whose
heap is set to show it: see ``harness.Memory``).  Results go to
``benchmarks/results/`` (or ``--out``) as JSON and as a markdown table, with
the machine and the versions.  Usage::

    python benchmarks/run.py                        # CPU, small shapes, every installed framework
    python benchmarks/run.py --quick                # every row once, tiny shapes (a smoke test)
    python benchmarks/run.py --device cuda --scale full --frameworks torch jax

PyHessian, curvlinops and BackPACK rows appear when those packages import; a
peer that cannot handle a model gets a row ``fails: <reason>``.  On a CPU the
Lanczos rows depend on NumPy's BLAS threads: OpenBLAS threads keep spinning
after each host-side float64 product and slow down the framework's next
product on the same cores; ``OPENBLAS_NUM_THREADS=1`` avoids it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import Bench, Memory, Row, describe, row_key  # noqa: E402
from models import NAMES  # noqa: E402
from report import write_results  # noqa: E402

FRAMEWORKS = ("torch", "jax", "tensorflow")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (torch moves there; JAX uses its default device)")
    parser.add_argument("--scale", default="small", choices=["tiny", "small", "full"])
    parser.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=FRAMEWORKS)
    parser.add_argument("--models", nargs="+", default=list(NAMES), choices=NAMES)
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per row (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per row before timing")
    parser.add_argument(
        "--min-ms", type=float, default=50.0, help="each repeat averages as many calls as fill this many ms"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch and TensorFlow")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, every row once: a smoke test")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results, or $OUT/results)")
    parser.add_argument("--tag", default=None, help="file name stem of the results (default: device and scale)")
    parser.add_argument("-v", "--verbose", action="count", default=1, help="-v: tracebacks of failing rows")
    parser.add_argument(
        "--no-memory", action="store_true", help="leave the peak memory column empty (skips the CPU memory pass)"
    )
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)  # the CPU memory pass
    args = parser.parse_args()
    if args.quick:
        args.scale, args.repeats, args.warmup, args.min_ms = "tiny", 1, 1, 0.0
    out_dir = Path(args.out or (Path(os.environ["OUT"]) / "results" if os.environ.get("OUT") else HERE / "results"))
    frameworks = [f for f in args.frameworks if importlib.util.find_spec(f) is not None]
    skipped = sorted(set(args.frameworks) - set(frameworks))
    setup(args, frameworks)
    memory = Memory(args.device, measuring=args.memory_only)
    if args.no_memory:
        memory.peaks = {}  # every row's peak unknown: the column stays empty
    elif not (args.quick or args.memory_only) and memory.needs_own_pass:
        memory.peaks = measure_in_own_process(out_dir)
    rows: list[Row] = []
    settings = vars(args) | {"frameworks_run": frameworks, "frameworks_missing": skipped}
    paths = (None, None)
    started = time.time()
    print(
        f"{'framework':>10} {'model':>11} | {'who':<12} {'what':<50} | time, ratio to one gradient, peak memory, check"
    )
    for framework in frameworks:
        module = {"torch": "rows_torch", "jax": "rows_jax", "tensorflow": "rows_tf"}[framework]
        rows_module = __import__(module)
        try:
            specs = rows_module.models(args.scale, args.device)
        except Exception as err:
            rows.append(Row(framework, "-", "gradient", "-", "models", error=f"fails: {describe(err)}"))
            print(f"{framework}: models fail: {describe(err)}")
            continue
        for name in args.models:
            bench = Bench(
                framework,
                name,
                rows_module.sync(args.device),
                args.repeats,
                args.warmup,
                memory,
                rows,
                args.verbose,
                args.quick,
                args.min_ms / 1e3,
                args.memory_only,
            )
            try:
                rows_module.run(name, specs[name], bench)
            except Exception as err:  # a bug in a row's setup: report it, go on with the next model
                rows.append(Row(framework, name, "-", "-", "setup", error=f"fails: {describe(err)}"))
                print(f"{framework:>10} {name:>11} | setup fails: {describe(err)}")
            # Written after every model, so that a run stopped by a time limit keeps what it measured.
            paths = write_results(rows, settings, out_dir, args.tag, time.time() - started)
    if args.memory_only:
        return
    print(f"\nwrote {paths[0]} and {paths[1]} ({time.time() - started:.0f} s)")


def measure_in_own_process(out_dir: Path) -> dict[tuple[str, ...], int | None]:
    """The CPU peaks of every row, from this command run again with ``--memory-only`` (see ``harness.Memory``)."""
    folder = out_dir / "memory-pass"
    command = [sys.executable, __file__, *sys.argv[1:], "--memory-only", "--out", str(folder), "--tag", "memory"]
    print("peak memory: every row once more in its own process, with the heap set to measure (see harness.Memory)")
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    found = folder / "memory.json"
    if done.returncode != 0 or not found.exists():
        print(done.stderr[-3000:])
        print(f"the memory pass failed (exit {done.returncode}): the peak memory column stays empty")
        return {}
    peaks = {row_key(row): row.get("peak_bytes") for row in json.loads(found.read_text())["rows"]}
    shutil.rmtree(folder, ignore_errors=True)
    return peaks


def setup(args: argparse.Namespace, frameworks: list[str]) -> None:
    """Threads and devices, before any framework runs an op."""
    if "tensorflow" in frameworks:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        # With TensorFlow 2.21's oneDNN kernels on (its CPU default), per-sample products under
        # tf.vectorized_map (the exact GGN diagonal) aborted the process with heap corruption on the
        # Keras transformer and ResNet.  The backend now loops where batched matmuls are involved;
        # the benchmarks still run without oneDNN, so that every TF row uses the same kernels.
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
        import tensorflow as tf

        if not args.device.startswith("cuda"):
            tf.config.set_visible_devices([], "GPU")
        if args.threads:
            tf.config.threading.set_intra_op_parallelism_threads(args.threads)
            tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    if "torch" in frameworks:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
    if "jax" in frameworks:
        # JAX would otherwise take 75 % of the GPU's memory up front, leaving torch too little.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        import jax

        if not args.device.startswith("cuda"):
            jax.config.update("jax_platforms", "cpu")


if __name__ == "__main__":
    main()
