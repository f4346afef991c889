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

from ace_jax import named_leaves, projected_variables
from models import segnn
from models.segnn import SEGNN, PairSteerableLinear, SteerableLinear, parameter_count, steerable_tensor_product

SMALL = dict(hidden_irreps="4x0e+4x1o", num_layers=2)
ATTR_IRREPS = "1x0e+1x1o"


# Test data come from numpy: eager jax ops would each be compiled and dominate the test time.


def normal(seed, shape, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def nbody_graph(seed, n=5, batch=()):
    """N-body-like graph(s): positions ~ N(0, 2²), velocities ~ N(0, 0.5²), charges ±1."""
    rng = np.random.default_rng(seed)
    loc = (2.0 * rng.standard_normal(batch + (n, 3))).astype(np.float32)
    vel = (0.5 * rng.standard_normal(batch + (n, 3))).astype(np.float32)
    charges = rng.choice(np.array([-1.0, 1.0], np.float32), size=batch + (n, 1))
    return loc, vel, charges


def graph_batch(seed, batch=4, n=5):
    return nbody_graph(seed, n, (batch,))


def random_orthogonal_matrices(seed, count, proper=False):
    """Haar-random elements of O(3) (or SO(3) with ``proper``) from QR of Gaussian matrices."""
    out = []
    for a in np.random.default_rng(seed).standard_normal((count, 3, 3)):
        q, r = np.linalg.qr(a)
        q = q * np.sign(np.diag(r))
        if proper and np.linalg.det(q) < 0:
            q = -q
        out.append(q.astype(np.float32))
    return out


def max_equivariance_error(f, x, elements):
    """max over group elements (R, t) and nodes of ‖f(R x + t, R v, q) − (R f(x) + t)‖."""
    loc, vel, charges = x
    fx = np.asarray(f(x))
    worst = 0.0
    for rot, shift in elements:
        moved = np.asarray(f((loc @ rot.T + shift, vel @ rot.T, charges)))
        worst = max(worst, float(np.max(np.linalg.norm(moved - (fx @ rot.T + shift), axis=-1))))
    return worst


def _to_fan_in(params):
    """Rewrite "normal" SEGNN parameters as "fan_in" ones for the same function: every steerable
    weight W becomes W/√n (n = the module's input channels, rows of w_sv + rows of w_vv)."""
    def convert(tree):
        if not isinstance(tree, dict):
            return tree
        if "w_vv" in tree:
            scale = 1.0 / math.sqrt(tree["w_sv"].shape[0] + tree["w_vv"].shape[0])
            return {k: (v * scale if k.startswith("w_") else v) for k, v in tree.items()}
        return {k: convert(v) for k, v in tree.items()}

    return convert(params)


def random_variables(module, *inputs, seed=0, gamma=0.7, project=False):
    """Variables with the structure ``module.init`` would give, filled from numpy (no XLA
    compilation of the initialisers, which would dominate the test time): steerable weights
    ~ N(0, 1) (divided by √n for a "fan_in" module, the same function), biases ~ 0.1 N(0, 1),
    branch kernels ~ N(0, 1/fan_in), every γ = ``gamma``."""
    kwargs = {"project": project} if isinstance(module, SEGNN) else {}
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs, **kwargs))
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

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    if getattr(module, "parameterization", "normal") == "fan_in":
        variables = dict(variables, params=_to_fan_in(variables["params"]))
    return variables


# ------------------------------------------------------------------------------------------
# e3nn-jax reference (generic tensor products, gather / segment_sum)
# ------------------------------------------------------------------------------------------


def e3nn_layer(params, x: e3nn.IrrepsArray, attr: e3nn.IrrepsArray, irreps_out: str, gated: bool):
    """FullyConnectedTensorProduct(x ⊗ attr -> irreps_out) with our weights, + bias, + e3nn gate.

    ``x`` and ``attr`` carry one leading batch axis; ``x`` is ``a x 0e + b x 1o``. Weight of
    path (input, attribute, output): 0e⊗0e→0e w_ss, 1o⊗1o→0e w_vs, 0e⊗1o→1o w_sv, 1o⊗0e→1o w_vv.
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
        silu, sigmoid = normalized_activations()
        out = e3nn.gate(out, even_act=silu, even_gate_act=sigmoid, normalize_act=False)
    return out


@functools.lru_cache(maxsize=None)
def normalized_activations():
    """e3nn's second-moment normalisation of silu and sigmoid, computed once (e3nn.gate with
    normalize_act=True would recompute it, on 10⁶ points, at every call)."""
    return e3nn.normalize_function(jax.nn.silu), e3nn.normalize_function(jax.nn.sigmoid)


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
    node_attr = jax.ops.segment_sum(edge_attr.array, receivers, n) / (n - 1) + vel_attr.array
    node_attr = e3nn.IrrepsArray(ATTR_IRREPS, node_attr.at[:, 0].set(1.0))  # l = 0 part is 1, as in SEGNN
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
    n_s, n_v, rows = 5, 4, 7
    s, v = jnp.asarray(normal(0, (rows, n_s))), jnp.asarray(normal(1, (rows, 3, n_v)))
    a0, a1 = segnn.spherical_harmonics(normal(2, (rows, 3)))
    layer = SteerableLinear(6, 3, gated=gated, parameterization="normal")  # e3nn's element normalisation
    params = random_variables(layer, s, v, a0, a1, seed=int(gated))["params"]
    ours_s, ours_v = jax.jit(lambda p: layer.apply({"params": p}, s, v, a0, a1))(params)

    attr = e3nn.IrrepsArray(ATTR_IRREPS, jnp.concatenate([jnp.full((rows, 1), a0), a1], axis=-1))
    x = e3nn.concatenate([e3nn.IrrepsArray(f"{n_s}x0e", s), e3nn.IrrepsArray(f"{n_v}x1o", jnp.swapaxes(v, 1, 2).reshape(rows, -1))])
    out_irreps = "9x0e+3x1o" if gated else "6x0e+3x1o"
    ref = jax.jit(lambda p: e3nn_layer(p, x, attr, out_irreps, gated))(params)
    ref_s = ref.filter(keep="0e").array
    ref_v = jnp.swapaxes(ref.filter(keep="1o").array.reshape(rows, 3, 3), 1, 2)
    np.testing.assert_allclose(ours_s, ref_s, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ours_v, ref_v, atol=1e-5, rtol=1e-5)


def test_irreps_array_conversion_round_trip():
    s, v = normal(3, (4, 3)), normal(4, (4, 3, 2))
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
    s, v = normal(5, (n, n_s)), normal(6, (n, 3, n_v))
    send = segnn.sender_index(n)
    assert sorted(send[2].tolist()) == [0, 1, 3, 4]
    edge_scalars = normal(7, (n, n - 1, 2))
    a0, a1 = segnn.spherical_harmonics(normal(8, (n, n - 1, 3)))
    pair = PairSteerableLinear(6, 5)
    params = random_variables(pair, s, v, edge_scalars, a0, a1, seed=2)["params"]

    @jax.jit
    def both(params):
        ours = pair.apply({"params": params}, s, v, edge_scalars, a0, a1)
        edge_s = jnp.concatenate([jnp.broadcast_to(s[:, None], (n, n - 1, n_s)), s[send], edge_scalars], axis=-1)
        edge_v = jnp.concatenate([jnp.broadcast_to(v[:, None], (n, n - 1, 3, n_v)), v[send]], axis=-1)
        return ours, SteerableLinear(6, 5, gated=True).apply({"params": params}, edge_s, edge_v, a0, a1)

    ours, ref = both(params)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# Whole network
# ------------------------------------------------------------------------------------------


def test_model_matches_e3nn_gather_scatter_reference():
    """Projection, full model with the default affine branch (computed through the
    aggregation identity) and with an MLP branch (per edge), against the e3nn-jax reference
    that applies every branch per edge and aggregates with segment_sum."""
    config = dict(hidden_irreps="4x0e+4x1o", num_layers=1, parameterization="normal")  # e3nn's normalisation
    loc, vel, charges = map(jnp.asarray, nbody_graph(3))
    affine, mlp = SEGNN(**config), SEGNN(**config, branch_hidden=(6,))
    v_affine = random_variables(affine, loc, vel, charges, seed=4)
    v_mlp = random_variables(mlp, loc, vel, charges, seed=5)

    @jax.jit
    def both(v_affine, v_mlp):
        ours = (affine.apply(v_affine, loc, vel, charges, project=True),
                affine.apply(v_affine, loc, vel, charges, project=False),
                mlp.apply(v_mlp, loc, vel, charges, project=False))
        kw = dict(n_s=4, n_v=4, num_layers=1)
        ref = (reference_segnn(v_affine, loc, vel, charges, project=True, **kw),
               reference_segnn(v_affine, loc, vel, charges, project=False, **kw),
               reference_segnn(v_mlp, loc, vel, charges, project=False, **kw))
        return ours, ref

    ours, ref = both(v_affine, v_mlp)
    assert float(jnp.max(jnp.abs(ref[0] - loc))) > 1e-3  # the network does something
    assert float(jnp.max(jnp.abs(ref[1] - ref[0]))) > 1e-3  # and the branches too
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


SMALL_MODEL = SEGNN(**SMALL)


@functools.lru_cache(maxsize=None)
def batched_apply(project: bool):
    """jit(vmap(SMALL_MODEL.apply)) over a batch of graphs; variables are an argument, so one
    compilation serves every set of variables of the same structure."""
    return jax.jit(jax.vmap(lambda v, l, ve, c: SMALL_MODEL.apply(v, l, ve, c, project=project), (None, 0, 0, 0)))


def small_variables(seed=5, gamma=1.0):
    return random_variables(SMALL_MODEL, *nbody_graph(seed), seed=seed, gamma=gamma)


def test_projection_is_exactly_e3_equivariant():
    variables = small_variables()
    x = graph_batch(6)

    def f(inputs):
        return batched_apply(True)(variables, *inputs)

    improper = [-np.eye(3, dtype=np.float32), np.diag(np.array([1.0, 1.0, -1.0], np.float32))]  # parity, mirror
    rotations = improper + random_orthogonal_matrices(7, 3) + random_orthogonal_matrices(8, 2, proper=True)
    shifts = normal(9, (len(rotations), 3), scale=3.0)
    assert float(np.max(np.abs(np.asarray(f(x)) - x[0]))) > 1e-3  # not the identity map
    assert max_equivariance_error(f, x, list(zip(rotations, shifts))) <= 1e-5
    assert max_equivariance_error(f, x, [(np.eye(3, dtype=np.float32), t) for t in shifts]) <= 1e-5
    assert max_equivariance_error(f, x, [(r, np.zeros(3, np.float32)) for r in rotations]) <= 1e-5


def test_full_model_breaks_rotation_equivariance_and_gamma_zero_restores_it():
    variables = small_variables()
    x = graph_batch(11)
    elements = [(r, np.zeros(3, np.float32)) for r in random_orthogonal_matrices(10, 3, proper=True)]

    def full(v):
        return lambda inputs: batched_apply(False)(v, *inputs)

    assert max_equivariance_error(full(variables), x, elements) > 1e-3
    zeroed = projected_variables(variables)  # γ = 0, branches still evaluated
    assert max_equivariance_error(full(zeroed), x, elements) <= 1e-5
    np.testing.assert_allclose(full(zeroed)(x), batched_apply(True)(variables, *x), atol=1e-6)


def test_vv_perturbation_adds_a_per_component_vector_map():
    """steerable_tensor_product(..., vv_perturbation=δ) = the plain product + Σ_c v_kc δ_kcd."""
    rng = np.random.default_rng(21)
    s, v, a1 = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in [(6, 3), (6, 3, 2), (6, 3)])
    weights = [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in [(3, 4), (2, 4), (3, 5), (2, 5)]]
    delta = jnp.asarray(rng.normal(size=(3, 2, 5)), jnp.float32)
    plain_s, plain_v = steerable_tensor_product(s, v, 0.3, a1, *weights)
    out_s, out_v = steerable_tensor_product(s, v, 0.3, a1, *weights, vv_perturbation=delta)
    np.testing.assert_allclose(out_s, plain_s, atol=1e-6)
    expected = plain_v + np.stack([np.asarray(v)[:, k] @ np.asarray(delta)[k] for k in range(3)], axis=1)
    np.testing.assert_allclose(out_v, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="vv_perturbation"):
        steerable_tensor_product(s, v, 0.3, a1, *weights, vv_perturbation=delta[0])


def branch_model(**branch):
    """SEGNN(**SMALL, **branch) and jit(vmap(apply)) over a batch of graphs (full model), one
    compilation per branch setting shared by the tests."""
    return _branch_model(tuple(sorted(branch.items())))


@functools.lru_cache(maxsize=None)
def _branch_model(branch):
    if not branch:
        return SMALL_MODEL, batched_apply(False)
    model = SEGNN(**SMALL, **dict(branch))
    return model, jax.jit(jax.vmap(lambda v, l, ve, c: model.apply(v, l, ve, c), (None, 0, 0, 0)))


@pytest.mark.parametrize("branch", [{"branch_kind": "axis"}, {"branch_kind": "in_kernel"}, {"branch_rank": 3}])
def test_cheap_branches_break_rotations_and_project_to_the_same_segnn(branch):
    """branch_kind "axis" / "in_kernel" and rank-3 dense branches: γ ≠ 0 breaks rotation
    equivariance; γ = 0 is the same SEGNN as the dense-branch model with the same equivariant
    weights (the branch only changes g)."""
    axis_model, apply = branch_model(**branch)
    graph = nbody_graph(5)
    variables = random_variables(axis_model, *graph, seed=5, gamma=1.0)
    x = graph_batch(11)
    elements = [(r, np.zeros(3, np.float32)) for r in random_orthogonal_matrices(10, 3, proper=True)]
    assert max_equivariance_error(lambda inputs: apply(variables, *inputs), x, elements) > 1e-3
    shared = {"params": {k: v for k, v in variables["params"].items()}}
    for layer, tree in shared["params"].items():
        if layer.startswith("layer_"):
            shared["params"][layer] = {k: v for k, v in tree.items() if "breaking" not in k}
    np.testing.assert_allclose(
        apply(projected_variables(variables), *x), batched_apply(True)(shared, *x), atol=1e-5, rtol=1e-5
    )
    with pytest.raises(ValueError, match="branch_kind"):
        SEGNN(**SMALL, branch_kind="conv").init(jax.random.PRNGKey(0), *graph)
    with pytest.raises(ValueError, match="branch_rank"):
        SEGNN(**SMALL, branch_kind="axis", branch_rank=3).init(jax.random.PRNGKey(0), *graph)


@pytest.mark.parametrize(
    "branch", [{}, {"branch_kind": "axis"}, {"branch_kind": "in_kernel"}, {"branch_rank": 3}],
    ids=["dense", "axis", "in_kernel", "rank3"],
)
def test_each_branch_alone_breaks_rotation_equivariance(branch):
    """One γ at a time (γ = 1, the others 0; branch kernels at their LeCun init scale): each of
    the 2 x num_layers branches, of every kind, is wired to the output and breaks rotation
    equivariance by itself; all γ = 0 restores it."""
    model, apply = branch_model(**branch)
    variables = random_variables(model, *nbody_graph(5), seed=5, gamma=1.0)
    x = graph_batch(11)
    elements = [(r, np.zeros(3, np.float32)) for r in random_orthogonal_matrices(10, 3, proper=True)]
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(variables["gamma"])[0]]
    assert len(paths) == 2 * SMALL["num_layers"]

    def error(on):  # γ = 1 at the leaf ``on``, 0 elsewhere
        gamma = jax.tree_util.tree_map_with_path(lambda path, g: g if path == on else jnp.zeros_like(g),
                                                 variables["gamma"])
        single = {**variables, "gamma": gamma}
        return max_equivariance_error(lambda inputs: apply(single, *inputs), x, elements)

    for path in paths:
        assert error(path) > 1e-3, jax.tree_util.keystr(path)
    assert error(None) <= 1e-5


def test_permutation_equivariance():
    variables = small_variables(seed=12)
    loc, vel, charges = nbody_graph(13)
    perm = np.array([3, 0, 4, 1, 2])
    inputs = tuple(np.stack([a, a[perm], a, a]) for a in (loc, vel, charges))  # batch of 4: shared compilation
    for project in (True, False):
        out = batched_apply(project)(variables, *inputs)
        np.testing.assert_allclose(out[1], out[0][perm], atol=1e-5)


def test_projection_does_not_evaluate_branches():
    loc, vel, charges = nbody_graph(14)
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
    inputs = tuple(np.stack([a] * 4) for a in (loc, vel, charges))  # batch of 4: shared compilation
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


@pytest.mark.parametrize("branch_kind", ["dense", "in_kernel"])
def test_fan_in_parameterization_is_the_same_function_class(branch_kind):
    """A "fan_in" SEGNN with weights W/√n computes exactly what the "normal" one with W does
    (projection and full model), so the option changes only the training dynamics; its
    initial weights lie in ±1/√n and its biases are drawn too."""
    loc, vel, charges = map(jnp.asarray, nbody_graph(21))
    normal_model = SEGNN(**SMALL, branch_kind=branch_kind, parameterization="normal")
    fan_in_model = SEGNN(**SMALL, branch_kind=branch_kind)  # the default
    variables = random_variables(normal_model, loc, vel, charges, seed=22)
    converted = dict(variables, params=_to_fan_in(variables["params"]))

    @jax.jit
    def outputs(v_normal, v_fan_in):
        return [(normal_model.apply(v_normal, loc, vel, charges, project=p),
                 fan_in_model.apply(v_fan_in, loc, vel, charges, project=p)) for p in (True, False)]

    for ours, theirs in outputs(variables, converted):
        assert float(jnp.max(jnp.abs(ours - loc))) > 1e-3
        np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=1e-5)

    init = fan_in_model.init(jax.random.PRNGKey(1), loc, vel, charges, project=True)["params"]
    layer = init["layer_0"]["update_1"]
    bound = 1.0 / math.sqrt(layer["w_sv"].shape[0] + layer["w_vv"].shape[0])
    assert float(jnp.max(jnp.abs(layer["w_ss"]))) <= bound
    assert float(jnp.max(jnp.abs(layer["w_ss"]))) > 0.8 * bound  # uniform over the whole interval
    assert float(jnp.max(jnp.abs(layer["bias"]))) > 0.0
    with pytest.raises(ValueError, match="parameterization"):
        SEGNN(**SMALL, parameterization="xavier").init(jax.random.PRNGKey(0), loc, vel, charges)


def test_parameter_count_default_model():
    loc, vel, charges = nbody_graph(16)
    model = SEGNN()  # 32x0e+32x1o, 4 layers

    def count(project):
        shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), loc, vel, charges, project=project))
        return parameter_count(shapes["params"])

    vanilla, full = count(True), count(False)
    assert vanilla == expected_parameter_count(32, 32, 4, False) == 147_424
    assert full == expected_parameter_count(32, 32, 4, True) == 279_520
    print(f"\nSEGNN(32x0e+32x1o, 4 layers) parameters: vanilla {vanilla:,}, with ACE branches {full:,} (+8 γ)")


def test_invalid_settings_and_shapes_raise():
    loc, vel, charges = nbody_graph(19)
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
    r = normal(20, (6, 3))
    for norm in ("integral", "component"):
        a0, a1 = segnn.spherical_harmonics(r, norm)
        ref = e3nn.spherical_harmonics(ATTR_IRREPS, r, normalize=True, normalization=norm).array
        np.testing.assert_allclose(ref[:, 0], a0, rtol=1e-6)
        np.testing.assert_allclose(ref[:, 1:], a1, rtol=1e-5, atol=1e-6)
    assert math.isclose(segnn.spherical_harmonics(r)[0], 1 / math.sqrt(4 * math.pi))
