"""``mh.report`` in all three frameworks, checked against dense float64 matrices from JAX's own autodiff.

One tiny network (3 → 4 tanh → 3, cross-entropy, 31 parameters) with the same
float64 weights in PyTorch, JAX and Keras.  The oracle is written by hand:
``jax.hessian`` of the loss over the flat parameters gives ``H``; ``jax.jacobian``
of the logits and the closed-form softmax Hessian ``diag(p) − ppᵀ`` give
``G = Σ Jᵀ H_z J``; ``jax.grad`` gives the gradient.  Every number of the report
is compared with what NumPy reads off these matrices.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)  # before any array exists: the oracle and the models are float64

import jax.numpy as jnp  # noqa: E402

import multihess as mh  # noqa: E402

N, D, HID, C = 8, 3, 4, 3
SHAPES = {"w1": (D, HID), "b1": (HID,), "w2": (HID, C), "b2": (C,)}  # flat order of the oracle
LAYER_ENTRIES = {"l1": slice(0, D * HID + HID), "l2": slice(D * HID + HID, D * HID + HID + HID * C + C)}
SETTINGS = dict(k=3, num_probes=64, density_probes=2, density_steps=31, seed=0, progress=False, verbose=False)


# ----------------------------------------------------------------------------- the problem and its oracle
def problem() -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    p = {name: rng.normal(0, 0.8, shape) for name, shape in SHAPES.items()}
    return p, rng.normal(size=(N, D)), rng.integers(0, C, N)


def unflatten(w: jnp.ndarray) -> dict[str, jnp.ndarray]:
    out, start = {}, 0
    for name, shape in SHAPES.items():
        size = int(np.prod(shape))
        out[name] = w[start : start + size].reshape(shape)
        start += size
    return out


def logits(w: jnp.ndarray, x: np.ndarray) -> jnp.ndarray:
    p = unflatten(w)
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def mean_cross_entropy(w: jnp.ndarray, x: np.ndarray, y: np.ndarray) -> jnp.ndarray:
    z = logits(w, x)
    return jnp.mean(jax.nn.logsumexp(z, axis=1) - z[jnp.arange(len(y)), y])


@pytest.fixture(scope="module")
def oracle() -> dict[str, np.ndarray]:
    """Dense H, G and the gradient in the oracle's flat order, float64."""
    p, x, y = problem()
    w = jnp.concatenate([jnp.asarray(p[n]).ravel() for n in SHAPES])
    H = np.asarray(jax.hessian(mean_cross_entropy)(w, x, y))
    J = np.asarray(jax.jacobian(logits)(w, x))  # (N, C, n)
    z = np.asarray(logits(w, x))
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    Hz = (np.einsum("ic,cd->icd", probs, np.eye(C)) - np.einsum("ic,id->icd", probs, probs)) / N
    G = np.einsum("icn,icd,idm->nm", J, Hz, J)
    g = np.asarray(jax.grad(mean_cross_entropy)(w, x, y))
    return {"H": H, "G": G, "g": g}


# ----------------------------------------------------------------------------- the same model in each framework
def torch_model():
    import torch

    p, x, y = problem()
    model = torch.nn.Sequential(torch.nn.Linear(D, HID), torch.nn.Tanh(), torch.nn.Linear(HID, C)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(p["w1"].T))
        model[0].bias.copy_(torch.tensor(p["b1"]))
        model[2].weight.copy_(torch.tensor(p["w2"].T))
        model[2].bias.copy_(torch.tensor(p["b2"]))
    return (model, None, (torch.tensor(x), torch.tensor(y))), {"l1": "0", "l2": "2"}


def jax_model():
    p, x, y = problem()

    def apply_fn(params, inputs):
        return jnp.tanh(inputs @ params["l1"]["w"] + params["l1"]["b"]) @ params["l2"]["w"] + params["l2"]["b"]

    params = {"l1": {"w": jnp.asarray(p["w1"]), "b": jnp.asarray(p["b1"])}}
    params["l2"] = {"w": jnp.asarray(p["w2"]), "b": jnp.asarray(p["b2"])}
    return (apply_fn, params, (jnp.asarray(x), jnp.asarray(y))), {"l1": "l1", "l2": "l2"}


def keras_model():
    import keras
    import tensorflow as tf

    p, x, y = problem()
    model = keras.Sequential(
        [
            keras.Input((D,), dtype="float64"),
            keras.layers.Dense(HID, activation="tanh", name="l1", dtype="float64"),
            keras.layers.Dense(C, name="l2", dtype="float64"),
        ]
    )
    model.get_layer("l1").set_weights([p["w1"], p["b1"]])
    model.get_layer("l2").set_weights([p["w2"], p["b2"]])
    return (model, None, (tf.constant(x), tf.constant(y))), None


BUILDERS = {"torch": torch_model, "jax": jax_model, "tensorflow": keras_model}


@pytest.fixture(scope="module", params=list(BUILDERS))
def reported(request, tmp_path_factory):
    """The tiny model's report in one framework, saved to a folder, and its layer key for each oracle layer."""
    (model, weights, data), layer_names = BUILDERS[request.param]()
    out = tmp_path_factory.mktemp(f"report_{request.param}")
    r = mh.report(model, weights, data=data, loss="cross_entropy", out=out, **SETTINGS)
    if layer_names is None:  # Keras prefixes the model's name: find the layer whose key ends in l1 / l2
        layer_names = {ours: next(k for k in r.layers if k.endswith(ours)) for ours in LAYER_ENTRIES}
    return r, layer_names, out


# ----------------------------------------------------------------------------- numbers against the oracle
def test_top_eigenvalues_match_dense(reported, oracle):
    r, _, _ = reported
    np.testing.assert_allclose(r.hessian_top, np.linalg.eigvalsh(oracle["H"])[::-1][:3], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(r.ggn_top, np.linalg.eigvalsh(oracle["G"])[::-1][:3], rtol=1e-6, atol=1e-9)


def test_traces_match_dense(reported, oracle):
    r, _, _ = reported
    assert r.num_parameters == oracle["H"].shape[0]
    # XTrace with 32 test vectors ≥ 31 parameters sketches the whole space: exact up to rounding.
    assert r.hessian_trace.value == pytest.approx(np.trace(oracle["H"]), rel=1e-8)
    assert r.ggn_trace.value == pytest.approx(np.trace(oracle["G"]), rel=1e-10)


def test_per_layer_blocks_match_dense(reported, oracle):
    r, names, _ = reported
    for ours, entries in LAYER_ENTRIES.items():
        layer = r.layers[names[ours]]
        H, G = oracle["H"][entries, entries], oracle["G"][entries, entries]
        assert layer.size == H.shape[0]
        assert layer.ggn_trace.value == pytest.approx(np.trace(G), rel=1e-10)
        assert layer.hessian_top == pytest.approx(np.linalg.eigvalsh(H)[-1], rel=1e-6)
        assert layer.ggn_top == pytest.approx(np.linalg.eigvalsh(G)[-1], rel=1e-6)
        # Hutchinson: within four standard errors (a fixed seed, so this is deterministic).
        err = layer.hessian_trace.std_error
        assert 0 < err < abs(np.trace(H))
        assert abs(layer.hessian_trace.value - np.trace(H)) <= 4 * err


def test_chain_rule_error_matches_dense(reported, oracle):
    r, names, _ = reported
    H, G, g = oracle["H"], oracle["G"], oracle["g"]
    assert r.chain_rule.vHv == pytest.approx(g @ H @ g, rel=1e-8)
    assert r.chain_rule.vGv == pytest.approx(g @ G @ g, rel=1e-8)
    for ours, entries in LAYER_ENTRIES.items():
        v = np.zeros_like(g)
        v[entries] = g[entries]
        expected = abs(v @ G @ v - v @ H @ v) / (v @ v)
        assert r.layers[names[ours]].chain_rule.relative_error == pytest.approx(expected, rel=1e-7, abs=1e-12)
    # The last layer enters the logits linearly: its block of G is its block of H.
    assert r.layers[names["l2"]].chain_rule.relative_error < 1e-12
    assert r.layers[names["l1"]].chain_rule.relative_error > 1e-4


def test_density_sits_on_the_eigenvalues(reported, oracle):
    r, _, _ = reported
    eigenvalues = np.linalg.eigvalsh(oracle["H"])
    # 31 Lanczos steps on 31 parameters: the quadrature nodes are eigenvalues of H.
    nodes = r.density.nodes[r.density.weights > 1e-8]
    distance = np.min(np.abs(nodes[:, None] - eigenvalues[None, :]), axis=1)
    assert np.max(distance) < 1e-6 * np.max(np.abs(eigenvalues))
    integral = np.sum(np.diff(r.density.grid) * (r.density.density[1:] + r.density.density[:-1]) / 2)
    assert integral == pytest.approx(1.0, rel=1e-6)


def test_files_hold_the_numbers(reported, oracle):
    r, names, out = reported
    saved = json.loads((out / "report.json").read_text())
    assert saved["ggn_trace"]["value"] == pytest.approx(np.trace(oracle["G"]), rel=1e-10)
    np.testing.assert_allclose(saved["hessian_top_eigenvalues"], np.linalg.eigvalsh(oracle["H"])[::-1][:3], rtol=1e-6)
    g1 = oracle["G"][LAYER_ENTRIES["l1"], LAYER_ENTRIES["l1"]]
    assert saved["layers"][names["l1"]]["ggn_trace"]["value"] == pytest.approx(np.trace(g1), rel=1e-10)
    import matplotlib.image

    for name in ("density.png", "layers.png"):
        path = out / name
        assert path in r.files
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(path).shape[0] > 100  # decodes to a real picture
    table = r.table()
    assert f"{r.ggn_trace.value:.6g}" in table and names["l1"] in table and str(out / "layers.png") in table


# ----------------------------------------------------------------------------- without the optional extras
def test_without_matplotlib_writes_json_and_says_how_to_plot(monkeypatch, tmp_path, oracle):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    (model, _, data), _ = torch_model()
    r = mh.report(model, data=data, loss="cross_entropy", out=tmp_path, **SETTINGS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    assert "multihess[plot]" in r.table()
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["ggn_trace"]["value"] == pytest.approx(np.trace(oracle["G"]), rel=1e-10)


def test_without_tqdm_progress_is_text(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    (model, _, data), _ = torch_model()
    settings = {**SETTINGS, "progress": True, "verbose": True}
    r = mh.report(model, data=data, loss="cross_entropy", **settings)
    captured = capsys.readouterr()
    assert "report [8/8] chain-rule error" in captured.err
    assert captured.out.strip() == r.table().strip()  # the table goes to stdout, progress to stderr


def test_import_loads_neither_matplotlib_nor_tqdm():
    code = "import sys, multihess; print(sorted(m for m in ('matplotlib', 'tqdm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"k": 0}, ValueError, "k must be at least 1"),
        ({"k": 2.5}, TypeError, "k must be an int"),
        ({"num_probes": True}, TypeError, "num_probes must be an int"),
        ({"density_steps": -1}, ValueError, "density_steps must be at least 1"),
        ({"trace_method": "exact"}, ValueError, "trace_method='exact'; choose one of"),
        ({"progress": "yes"}, TypeError, "progress must be True, False or None"),
        ({"out": 3}, TypeError, "out must be a folder path"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, words):
    (model, _, data), _ = torch_model()
    with pytest.raises(error, match=words.replace("(", r"\(").replace("[", r"\[")):
        mh.report(model, data=data, loss="cross_entropy", **kwargs)


def test_out_that_is_a_file_is_refused(tmp_path):
    (model, _, data), _ = torch_model()
    file = tmp_path / "taken"
    file.write_text("")
    with pytest.raises(ValueError, match="is a file; pass a folder"):
        mh.report(model, data=data, loss="cross_entropy", out=file)


def test_streamed_records_through_batch_fn_and_a_cached_generator(oracle):
    """Data as a one-shot generator of dict records: read once, and the numbers are the whole batch's."""
    (model, _, (x, y)), names = torch_model()
    records = ({"pixels": x[i : i + 3], "label": y[i : i + 3]} for i in range(0, N, 3))  # 3, 3, 2 samples
    as_pair = lambda r: (r["pixels"], r["label"])  # noqa: E731
    r = mh.report(model, data=records, loss="cross_entropy", batch_fn=as_pair, cache_data=True, **SETTINGS)
    H, G, g = oracle["H"], oracle["G"], oracle["g"]
    np.testing.assert_allclose(r.hessian_top, np.linalg.eigvalsh(H)[::-1][:3], rtol=1e-7)
    assert r.ggn_trace.value == pytest.approx(np.trace(G), rel=1e-10)
    assert r.chain_rule.vHv == pytest.approx(g @ H @ g, rel=1e-8)
    listed = [{"pixels": x[i : i + 3], "label": y[i : i + 3]} for i in range(0, N, 3)]
    errors = mh.chain_rule_error(model, data=listed, loss="cross_entropy", batch_fn=as_pair, progress=False)
    assert errors["all"].vGv == pytest.approx(g @ G @ g, rel=1e-8)
