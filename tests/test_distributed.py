"""Several processes and devices: torch.distributed on gloo, and JAX batches sharded over devices.

Each check runs in subprocesses (bounded in time, on 127.0.0.1 only) and is
compared with one process over the whole data, whose own oracle is the
dense Hessian of the framework's autodiff in float64.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import multihess as mh

TIMEOUT = 180
SHARDS = ((0, 14), (14, 24))  # unequal shards: global sample weights matter

TORCH_RANK = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch, torch.distributed as dist
    import multihess as mh

    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (24,), generator=g)
    start, stop = json.loads(sys.argv[5])[rank]
    shard = [(x[i : min(i + 4, stop)], y[i : min(i + 4, stop)]) for i in range(start, stop, 4)]
    H = mh.hessian(model, data=shard, loss="cross_entropy", distributed=True)
    G = mh.ggn(model, data=shard, loss="cross_entropy", distributed=True)
    result = {
        "H": H.dense().tolist(),
        "trace": float(mh.trace(H, num_probes=10, seed=3).value),
        "top": mh.eigvalsh(H, k=2).tolist(),
        "ggn_diag": mh.diagonal(G, method="exact").value.tolist(),
        "ggn_trace": float(mh.trace(G, method="exact").value),
    }
    with open(out, "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run_all(commands: list[list[str]], env: dict[str, str]) -> None:
    procs = [
        subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in commands
    ]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT)
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]


def test_torch_two_gloo_ranks_equal_one_process_over_all_data(tmp_path: Path) -> None:
    script = tmp_path / "rank.py"
    script.write_text(TORCH_RANK)
    port = str(_free_port())
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    shards = json.dumps(SHARDS)
    _run_all([[sys.executable, str(script), str(r), "2", port, str(outs[r]), shards] for r in range(2)], _env())
    ranks = [json.loads(o.read_text()) for o in outs]

    # One process over the whole data, checked against torch's own dense Hessian.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (24,), generator=g)
    H = mh.hessian(model, data=(x, y), loss="cross_entropy")
    G = mh.ggn(model, data=(x, y), loss="cross_entropy")
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def loss(*flat):
        out = torch.func.functional_call(model, dict(zip(names, flat)), (x,))
        return torch.nn.functional.cross_entropy(out, y)

    blocks = torch.autograd.functional.hessian(loss, params)
    sizes = [p.numel() for p in params]
    oracle = np.block([[blocks[i][j].reshape(sizes[i], sizes[j]).numpy() for j in range(4)] for i in range(4)])
    single = H.dense().numpy()
    np.testing.assert_allclose(single, oracle, rtol=1e-10, atol=1e-13)

    expected = {
        "H": single,
        "trace": float(mh.trace(H, num_probes=10, seed=3).value),
        "top": mh.eigvalsh(H, k=2),
        "ggn_diag": mh.diagonal(G, method="exact").value.numpy(),
        "ggn_trace": float(mh.trace(G, method="exact").value),
    }
    for rank in ranks:
        for key, value in expected.items():
            np.testing.assert_allclose(np.asarray(rank[key]), value, rtol=1e-10, atol=1e-12, err_msg=key)


JAX_SHARDED = textwrap.dedent(
    """
    import json, sys
    import jax, jax.flatten_util, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import multihess as mh

    jax.config.update("jax_enable_x64", True)
    assert len(jax.devices()) == 2, jax.devices()
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.normal(size=(3, 5))), "w2": jnp.asarray(rng.normal(size=(5, 4)))}
    x, y = rng.normal(size=(24, 3)), rng.integers(0, 4, size=24)

    def apply(p, inputs):
        return jnp.tanh(inputs @ p["w1"]) @ p["w2"]

    mesh = Mesh(np.array(jax.devices()), ("batch",))
    sharded = (jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("batch"))),
               jax.device_put(jnp.asarray(y), NamedSharding(mesh, P("batch"))))
    assert len(sharded[0].devices()) == 2
    plain = (jax.device_put(jnp.asarray(x), jax.devices()[0]), jax.device_put(jnp.asarray(y), jax.devices()[0]))

    def whole(p):
        z = apply(p, jnp.asarray(x))
        return -jnp.mean(jax.nn.log_softmax(z)[jnp.arange(24), jnp.asarray(y)])

    flat, unravel = jax.flatten_util.ravel_pytree(params)
    oracle = jax.hessian(lambda f: whole(unravel(f)))(flat)
    out = {}
    for label, data in (("sharded", sharded), ("plain", plain)):
        H = mh.hessian(apply, params, data=data, loss="cross_entropy")
        G = mh.ggn(apply, params, data=data, loss="cross_entropy")
        out[label] = {"H": np.asarray(H.dense()).tolist(), "G_trace": float(mh.trace(G, method="exact").value)}
    out["oracle"] = np.asarray(oracle).tolist()
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
    """
)


def test_jax_batches_sharded_over_two_devices_equal_the_unsharded_result(tmp_path: Path) -> None:
    script, out = tmp_path / "sharded.py", tmp_path / "sharded.json"
    script.write_text(JAX_SHARDED)
    env = _env()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    _run_all([[sys.executable, str(script), str(out)]], env)
    result = json.loads(out.read_text())
    oracle = np.asarray(result["oracle"])
    # ravel_pytree and multihess both order dict keys sorted: w1 then w2, row-major.
    np.testing.assert_allclose(np.asarray(result["plain"]["H"]), oracle, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(np.asarray(result["sharded"]["H"]), oracle, rtol=1e-10, atol=1e-13)
    assert result["sharded"]["G_trace"] == pytest.approx(result["plain"]["G_trace"], rel=1e-10)


def test_distributed_errors_are_clear() -> None:
    model = torch.nn.Linear(3, 2).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    H = mh.hessian(model, data=(x, y), loss="cross_entropy", distributed=True)
    with pytest.raises(RuntimeError, match="init_process_group"):
        H @ torch.ones(H.shape[1], dtype=torch.float64)
    with pytest.raises(ValueError, match="needs data="):
        mh.hessian(lambda w: (w**2).sum(), torch.ones(2), distributed=True)


TF_MIRRORED = textwrap.dedent(
    """
    import json, sys
    import numpy as np, tensorflow as tf
    import multihess as mh

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    rng = np.random.default_rng(0)
    W = tf.constant(rng.normal(size=(3, 4)))
    x, y = rng.normal(size=(24, 3)), rng.integers(0, 4, size=24)

    def apply(w, inputs):
        return tf.tanh(tf.linalg.matmul(inputs, w))

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    distributed = strategy.experimental_distribute_dataset(dataset)
    out = {}
    for label, data in (("mirrored", distributed), ("single", dataset)):
        H = mh.hessian(apply, W, data=data, loss="cross_entropy")
        out[label] = H.dense().numpy().tolist()
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
    """
)


def test_tf_mirrored_strategy_dataset_equals_the_single_device_result(tmp_path: Path) -> None:
    script, out = tmp_path / "mirrored.py", tmp_path / "mirrored.json"
    script.write_text(TF_MIRRORED)
    _run_all([[sys.executable, str(script), str(out)]], _env())
    result = json.loads(out.read_text())
    single = np.asarray(result["single"])
    assert np.max(np.abs(single)) > 1e-3  # a Hessian worth comparing
    np.testing.assert_allclose(np.asarray(result["mirrored"]), single, rtol=1e-10, atol=1e-13)
