"""Tests of models/segnn.py: the fast steerable layers against e3nn-jax, the whole network
against an e3nn-jax gather/scatter reference, E(3) and permutation equivariance of the
projection, symmetry breaking of the full model, and the projection never touching branches."""

import functools
import math

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from e3nn_jax.legacy import FunctionalFullyConnectedTensorProduct

from ace_jax import equivariance_error, named_leaves, projected_variables, random_orthogonal, random_rotation
from models import segnn
from models.segnn import SEGNN, PairSteerableLinear, SteerableLinear, parameter_count

SMALL = dict(hidden_irreps="8x0e+8x1o", num_layers=2)
ATTR_IRREPS = "1x0e+1x1o"


def nbody_graph(key, n=5):
    """One N-body-like graph: positions ~ N(0, 2²), velocities ~ N(0, 0.5²), charges ±1."""
    k1, k2, k3 = jax.random.split(key, 3)
    loc = 2.0 * jax.random.normal(k1, (n, 3))
    vel = 0.5 * jax.random.normal(k2, (n, 3))
    charges = jnp.where(jax.random.bernoulli(k3, 0.5, (n, 1)), 1.0, -1.0)
    return loc, vel, charges


def graph_batch(key, batch=4, n=5):
    return jax.vmap(lambda k: nbody_graph(k, n))(jax.random.split(key, batch))


def random_variables(module, *inputs, seed=0, gamma=0.7, project=False):
    """Variables with the structure ``module.init`` would give, filled from numpy (no XLA
    compilation of the initialisers, which would dominate the test time): steerable weights
    ~ N(0, 1), biases ~ 0.1 N(0, 1), branch kernels ~ N(0, 1/fan_in), every γ = ``gamma``."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs, project=project)
                            if isinstance(module, SEGNN) else module.init(jax.random.PRNGKey(0), *inputs))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(path[-1].key)
        if name == "gamma":
            return jnp.full(leaf.shape, gamma, leaf.dtype)
        values = rng.standard_normal(leaf.shape).astype(np.float32)
        if name == "kernel":
            values /= np.sqrt(leaf.shape[0])
        elif name == "bias":
            values *= 0.1
        return jnp.asarray(values)

    return jax.tree_util.tree_map_with_path(fill, shapes)


# ------------------------------------------------------------------------------------------
# e3nn-jax reference (generic tensor products, gather / segment_sum)
# ------------------------------------------------------------------------------------------


def e3nn_layer(params, x: e3nn.IrrepsArray, attr: e3nn.IrrepsArray, irreps_out: str, gated: bool):
    """FullyConnectedTensorProduct(x ⊗ attr -> irreps_out) with our weights, + bias, + e3nn gate.

    ``x`` and ``attr`` carry one leading batch axis; ``x`` must be ``a x 0e + b x 1o`` (regrouped); weight of path (in, attr, out):
    0e⊗0e→0e: w_ss, 1o⊗1o→0e: w_vs, 0e⊗1o→1o: w_sv, 1o⊗0e→1o: w_vv.
    """
    irreps_out = e3nn.Irreps(irreps_out)
    tp = FunctionalFullyConnectedTensorProduct(x.irreps, ATTR_IRREPS, irreps_out)
    names = {("0e", "0e", "0e"): "w_ss", ("1o", "1o", "0e"): "w_vs", ("0e", "1o", "1o"): "w_sv", ("1o", "0e", "1o"): "w_vv"}
    weights = []
    for ins in tp.instructions:
        key = (str(x.irreps[ins.i_in1].ir), str(e3nn.Irreps(ATTR_IRREPS)[ins.i_in2].ir), str(irreps_out[ins.i_out].ir))
        weights.append(params[names[key]][:, None, :])
    out = jax.vmap(lambda xi, ai: tp.left_right(weights, xi, ai))(x, attr)
    if "bias" in params:
        n_scalars = params["bias"].shape[0]
        out = e3nn.IrrepsArray(out.irreps, out.array.at[..., :n_scalars].add(params["bias"]))
    if gated:
        out = e3nn.gate(out, even_act=jax.nn.silu, even_gate_act=jax.nn.sigmoid)
    return out


def our_flat(x: e3nn.IrrepsArray) -> jax.Array:
    """Flatten in the model's branch layout: scalars, then vectors as (xyz, channel)."""
    s = x.filter(keep="0e").array
    v = x.filter(keep="1o").array
    v = v.reshape(v.shape[:-1] + (v.shape[-1] // 3, 3))
    return jnp.concatenate([s, jnp.swapaxes(v, -1, -2).reshape(v.shape[:-2] + (-1,))], axis=-1)


def from_our_flat(flat: jax.Array, n_s: int, n_v: int) -> e3nn.IrrepsArray:
    v = flat[..., n_s:].reshape(flat.shape[:-1] + (3, n_v))
    v = jnp.swapaxes(v, -1, -2).reshape(flat.shape[:-1] + (3 * n_v,))
    return e3nn.IrrepsArray(f"{n_s}x0e+{n_v}x1o", jnp.concatenate([flat[..., :n_s], v], axis=-1))


def reference_branch(variables, layer, name, flat):
    """γ · MLPBranch(flat) written out by hand (Dense layers with silu in between)."""
    dense = variables["params"][layer][f"{name}_branch"]
    layers = sorted(dense, key=lambda k: int(k.split("_")[1]))
    for i, key in enumerate(layers):
        flat = flat @ dense[key]["kernel"] + dense[key]["bias"]
        if i < len(layers) - 1:
            flat = jax.nn.silu(flat)
    return variables["gamma"][layer][name]["gamma"] * flat


def reference_segnn(variables, loc, vel, charges, *, n_s, n_v, num_layers, project):
    """SEGNN written with e3nn-jax IrrepsArrays over an explicit list of the N(N−1) edges."""
    params = variables["params"]
    n = loc.shape[0]
    receivers = np.array([i for i in range(n) for j in range(n) if i != j])
    senders = np.array([j for i in range(n) for j in range(n) if i != j])
    rel = loc[receivers] - loc[senders]
    edge_attr = e3nn.spherical_harmonics(ATTR_IRREPS, rel, normalize=True, normalization="integral")
    vel_attr = e3nn.spherical_harmonics(ATTR_IRREPS, vel, normalize=True, normalization="integral")
    node_attr = e3nn.IrrepsArray(
        ATTR_IRREPS, jax.ops.segment_sum(edge_attr.array, receivers, n) / (n - 1) + vel_attr.array
    )
    edge_scalars = e3nn.IrrepsArray(
        "2x0e", jnp.stack([jnp.linalg.norm(rel, axis=-1), charges[receivers, 0] * charges[senders, 0]], axis=-1)
    )
    centred = loc - loc.mean(axis=0)
    x = e3nn.concatenate(
        [
            e3nn.IrrepsArray("0e", jnp.linalg.norm(vel, axis=-1, keepdims=True)),
            e3nn.IrrepsArray("1o", centred),
            e3nn.IrrepsArray("1o", vel),
        ],
        axis=-1,
    ).regroup()
    hidden = f"{n_s}x0e+{n_v}x1o"
    gated_hidden = f"{n_s + n_v}x0e+{n_v}x1o"
    h = e3nn_layer(params["embedding"], x, node_attr, hidden, gated=False)
    for layer in range(num_layers):
        p = params[f"layer_{layer}"]
        name = f"layer_{layer}"
        m = e3nn.concatenate([h[receivers], h[senders], edge_scalars], axis=-1).regroup()
        m = e3nn_layer(p["message_1"], m, edge_attr, gated_hidden, gated=True)
        m = e3nn_layer(p["message_2"], m, edge_attr, gated_hidden, gated=True)
        if not project:  # per-edge branch, exactly as specified (no aggregation identity)
            flat = our_flat(m)
            m = from_our_flat(flat + reference_branch(variables, name, "message_breaking", flat), n_s, n_v)
        agg = e3nn.IrrepsArray(m.irreps, jax.ops.segment_sum(m.array, receivers, n))
        u = e3nn.concatenate([h, agg], axis=-1).regroup()
        u = e3nn_layer(p["update_1"], u, node_attr, gated_hidden, gated=True)
        u = e3nn_layer(p["update_2"], u, node_attr, hidden, gated=False)
        if not project:
            flat = our_flat(u)
            u = from_our_flat(flat + reference_branch(variables, name, "update_breaking", flat), n_s, n_v)
        h = h + u
    h = e3nn_layer(params["head_1"], h, node_attr, gated_hidden, gated=True)
    out = e3nn_layer(params["head_2"], h, node_attr, "1x1o", gated=False)
    return loc + out.array


# ------------------------------------------------------------------------------------------
# Layer-level checks
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gated", [False, True])
def test_steerable_linear_matches_e3nn_tensor_product(gated):
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    n_s, n_v, rows = 5, 4, 7
    s = jax.random.normal(k[0], (rows, n_s))
    v = jax.random.normal(k[1], (rows, 3, n_v))
    a0, a1 = segnn.spherical_harmonics(jax.random.normal(k[2], (rows, 3)))
    layer = SteerableLinear(6, 3, gated=gated)
    params = random_variables(layer, s, v, a0, a1, seed=int(gated))["params"]
    ours_s, ours_v = layer.apply({"params": params}, s, v, a0, a1)

    attr = e3nn.IrrepsArray(ATTR_IRREPS, jnp.concatenate([jnp.full((rows, 1), a0), a1], axis=-1))
    x = e3nn.concatenate([e3nn.IrrepsArray(f"{n_s}x0e", s), e3nn.IrrepsArray(f"{n_v}x1o", jnp.swapaxes(v, 1, 2).reshape(rows, -1))])
    out_irreps = "9x0e+3x1o" if gated else "6x0e+3x1o"
    ref = e3nn_layer(params, x, attr, out_irreps, gated)
    ref_s = ref.filter(keep="0e").array
    ref_v = jnp.swapaxes(ref.filter(keep="1o").array.reshape(rows, 3, 3), 1, 2)
    np.testing.assert_allclose(ours_s, ref_s, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ours_v, ref_v, atol=1e-5, rtol=1e-5)


def test_irreps_array_conversion_round_trip():
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    s, v = jax.random.normal(k1, (4, 3)), jax.random.normal(k2, (4, 3, 2))
    x = segnn.to_irreps_array(s, v)
    assert x.irreps == e3nn.Irreps("3x0e+2x1o")
    np.testing.assert_array_equal(x.filter(keep="1o").array.reshape(4, 2, 3)[:, 1], v[:, :, 1])
    back_s, back_v = segnn.from_irreps_array(x)
    np.testing.assert_array_equal(back_s, s)
    np.testing.assert_array_equal(back_v, v)
    flat = segnn.flatten_steerable(s, v)
    assert flat.shape == (4, 3 + 6)
    for a, b in zip(segnn.unflatten_steerable(flat, 3, 2), (s, v)):
        np.testing.assert_array_equal(a, b)


def test_pair_layer_equals_steerable_linear_on_concatenated_edges():
    n, n_s, n_v = 5, 4, 3
    k = jax.random.split(jax.random.PRNGKey(2), 5)
    s, v = jax.random.normal(k[0], (n, n_s)), jax.random.normal(k[1], (n, 3, n_v))
    send = segnn.sender_index(n)
    assert sorted(send[2].tolist()) == [0, 1, 3, 4]
    edge_scalars = jax.random.normal(k[2], (n, n - 1, 2))
    a0, a1 = segnn.spherical_harmonics(jax.random.normal(k[3], (n, n - 1, 3)))
    pair = PairSteerableLinear(6, 5)
    params = random_variables(pair, s, v, edge_scalars, a0, a1, seed=2)["params"]
    ours = pair.apply({"params": params}, s, v, edge_scalars, a0, a1)
    edge_s = jnp.concatenate([jnp.broadcast_to(s[:, None], (n, n - 1, n_s)), s[send], edge_scalars], axis=-1)
    edge_v = jnp.concatenate([jnp.broadcast_to(v[:, None], (n, n - 1, 3, n_v)), v[send]], axis=-1)
    ref = SteerableLinear(6, 5, gated=True).apply({"params": params}, edge_s, edge_v, a0, a1)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# Whole network
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("project,branch_hidden", [(True, ()), (False, ()), (False, (6,))])
def test_model_matches_e3nn_gather_scatter_reference(project, branch_hidden):
    loc, vel, charges = nbody_graph(jax.random.PRNGKey(3))
    model = SEGNN(**SMALL, branch_hidden=branch_hidden)
    variables = random_variables(model, loc, vel, charges, seed=4)
    ours = model.apply(variables, loc, vel, charges, project=project)
    ref = reference_segnn(variables, loc, vel, charges, n_s=8, n_v=8, num_layers=2, project=project)
    assert float(jnp.max(jnp.abs(ref - loc))) > 1e-3  # the network does something
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-5)


SMALL_MODEL = SEGNN(**SMALL)


@functools.lru_cache(maxsize=None)
def batched_apply(project: bool):
    """jit(vmap(SMALL_MODEL.apply)) over a batch of graphs; variables are an argument, so one
    compilation serves every set of variables of the same structure."""
    return jax.jit(jax.vmap(lambda v, l, ve, c: SMALL_MODEL.apply(v, l, ve, c, project=project), (None, 0, 0, 0)))


def act_in(g, x):
    rot, shift = g
    loc, vel, charges = x
    return loc @ rot.T + shift, vel @ rot.T, charges


def act_out(g, y):
    rot, shift = g
    return y @ rot.T + shift


def small_variables(seed=5, gamma=1.0):
    return random_variables(SMALL_MODEL, *nbody_graph(jax.random.PRNGKey(seed)), seed=seed, gamma=gamma)


def test_projection_is_exactly_e3_equivariant():
    variables = small_variables()
    x = graph_batch(jax.random.PRNGKey(6))

    def f(inputs):
        return batched_apply(True)(variables, *inputs)

    k_rot, k_shift = jax.random.split(jax.random.PRNGKey(7))
    rotations = random_orthogonal(k_rot, (4,))
    rotations = rotations.at[0].set(-jnp.eye(3))  # parity
    rotations = rotations.at[1].set(jnp.diag(jnp.array([1.0, 1.0, -1.0])))  # a mirror
    shifts = 3.0 * jax.random.normal(k_shift, (4, 3))
    assert float(jnp.max(jnp.abs(f(x) - x[0]))) > 1e-3  # not the identity map
    assert float(equivariance_error(f, x, list(zip(rotations, shifts)), act_in, act_out)) <= 1e-5
    assert float(equivariance_error(f, x, [(jnp.eye(3), s) for s in shifts], act_in, act_out)) <= 1e-5
    rots = random_rotation(jax.random.PRNGKey(8), (3,))
    assert float(equivariance_error(f, x, [(r, jnp.zeros(3)) for r in rots], act_in, act_out)) <= 1e-5


def test_full_model_breaks_rotation_equivariance_and_gamma_zero_restores_it():
    variables = small_variables()
    x = graph_batch(jax.random.PRNGKey(11))
    elements = [(r, jnp.zeros(3)) for r in random_rotation(jax.random.PRNGKey(10), (3,))]

    def full(v):
        return lambda inputs: batched_apply(False)(v, *inputs)

    assert float(equivariance_error(full(variables), x, elements, act_in, act_out)) > 1e-3
    zeroed = projected_variables(variables)  # γ = 0, branches still evaluated
    assert float(equivariance_error(full(zeroed), x, elements, act_in, act_out)) <= 1e-5
    np.testing.assert_allclose(full(zeroed)(x), batched_apply(True)(variables, *x), atol=1e-6)


def test_permutation_equivariance():
    variables = small_variables(seed=12)
    loc, vel, charges = nbody_graph(jax.random.PRNGKey(13))
    perm = np.array([3, 0, 4, 1, 2])
    inputs = tuple(jnp.stack([a, a[perm]]) for a in (loc, vel, charges))
    for project in (True, False):
        out = batched_apply(project)(variables, *inputs)
        np.testing.assert_allclose(out[1], out[0][perm], atol=1e-5)


def test_projection_does_not_evaluate_branches():
    loc, vel, charges = nbody_graph(jax.random.PRNGKey(14))
    vanilla = jax.eval_shape(lambda: SMALL_MODEL.init(jax.random.PRNGKey(0), loc, vel, charges, project=True))
    assert "gamma" not in vanilla
    assert not any("branch" in name for name in named_leaves(vanilla))
    full = small_variables(seed=15)
    assert len(jax.tree.leaves(full["gamma"])) == 2 * SMALL["num_layers"]
    trimmed = {k: {n: p for n, p in layer.items() if "branch" not in n} if k.startswith("layer_") else layer
               for k, layer in full["params"].items()}
    assert jax.tree.structure(trimmed) == jax.tree.structure(vanilla["params"])
    # NaN in every branch parameter and every γ: the projection is unaffected
    poisoned = {
        "params": {k: {n: (jax.tree.map(lambda w: jnp.full_like(w, jnp.nan), p) if "branch" in n else p)
                       for n, p in layer.items()} if k.startswith("layer_") else layer
                   for k, layer in full["params"].items()},
        "gamma": jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), full["gamma"]),
    }
    inputs = (loc[None], vel[None], charges[None])
    clean = batched_apply(True)(full, *inputs)
    dirty = batched_apply(True)(poisoned, *inputs)
    assert bool(jnp.all(jnp.isfinite(dirty)))
    np.testing.assert_array_equal(clean, dirty)
    np.testing.assert_array_equal(clean, batched_apply(True)({"params": trimmed}, *inputs))
    assert not bool(jnp.all(jnp.isfinite(batched_apply(False)(poisoned, *inputs))))


def expected_parameter_count(n_s, n_v, num_layers, with_branches):
    """Hand count: a steerable layer (a scalars, b vectors in -> S, V out) has (a + b)(S + V) + S."""

    def layer(a, b, s_out, v_out):
        return (a + b) * (s_out + v_out) + s_out

    gated = (n_s + n_v, n_v)
    per_layer = (
        layer(2 * n_s + 2, 2 * n_v, *gated)  # message_1
        + layer(n_s, n_v, *gated)  # message_2
        + layer(2 * n_s, 2 * n_v, *gated)  # update_1
        + layer(n_s, n_v, n_s, n_v)  # update_2
    )
    width = n_s + 3 * n_v
    branches = 2 * (width * width + width) if with_branches else 0
    return layer(1, 2, n_s, n_v) + num_layers * (per_layer + branches) + layer(n_s, n_v, *gated) + layer(n_s, n_v, 0, 1)


def test_parameter_count_default_model():
    loc, vel, charges = nbody_graph(jax.random.PRNGKey(16))
    model = SEGNN()  # 32x0e+32x1o, 4 layers

    def count(project):
        shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), loc, vel, charges, project=project))
        return parameter_count(shapes["params"])

    vanilla, full = count(True), count(False)
    assert vanilla == expected_parameter_count(32, 32, 4, False) == 147_424
    assert full == expected_parameter_count(32, 32, 4, True) == 279_520
    print(f"\nSEGNN(32x0e+32x1o, 4 layers) parameters: vanilla {vanilla:,}, with ACE branches {full:,} (+8 γ)")


def test_training_step_is_finite_and_reduces_loss():
    loc, vel, charges = graph_batch(jax.random.PRNGKey(17), batch=8)
    target = loc + vel
    variables = small_variables(seed=18, gamma=0.5)

    def loss(v):
        pred = jax.vmap(lambda l, ve, c: SMALL_MODEL.apply(v, l, ve, c))(loc, vel, charges)
        return jnp.mean((pred - target) ** 2)

    step = jax.jit(jax.value_and_grad(loss))
    first, grads = step(variables)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["gamma"]["layer_0"]["update_breaking"]["gamma"])) > 0
    for _ in range(5):
        value, grads = step(variables)
        variables = jax.tree.map(lambda p, g: p - 0.01 * g, variables, grads)
    assert float(loss(variables)) < float(first)


def test_invalid_settings_and_shapes_raise():
    loc, vel, charges = nbody_graph(jax.random.PRNGKey(19))
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="only 0e and 1o"):
        SEGNN(hidden_irreps="8x0e+8x2e").init(key, loc, vel, charges)
    with pytest.raises(ValueError, match="not a valid irreps"):
        SEGNN(hidden_irreps="eight scalars").init(key, loc, vel, charges)
    with pytest.raises(ValueError, match="num_layers"):
        SEGNN(num_layers=0).init(key, loc, vel, charges)
    with pytest.raises(ValueError, match="loc"):
        SEGNN(**SMALL).init(key, loc[None], vel, charges)
    with pytest.raises(ValueError, match="vel"):
        SEGNN(**SMALL).init(key, loc, vel[:4], charges)
    with pytest.raises(ValueError, match="charges"):
        SEGNN(**SMALL).init(key, loc, vel, charges[:, 0])
    with pytest.raises(ValueError, match="normalization"):
        segnn.spherical_harmonics(loc, "norm")


def test_spherical_harmonics_match_e3nn():
    r = jax.random.normal(jax.random.PRNGKey(20), (6, 3))
    for norm in ("integral", "component"):
        a0, a1 = segnn.spherical_harmonics(r, norm)
        ref = e3nn.spherical_harmonics(ATTR_IRREPS, r, normalize=True, normalization=norm).array
        np.testing.assert_allclose(ref[:, 0], a0, rtol=1e-6)
        np.testing.assert_allclose(ref[:, 1:], a1, rtol=1e-5, atol=1e-6)
    assert math.isclose(segnn.spherical_harmonics(r)[0], 1 / math.sqrt(4 * math.pi))
