"""Tests of models/egno.py: symmetry of the projection, symmetry breaking of the branches,
the temporal Fourier convolution (against a numpy reference) and shapes."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ace_jax
from data.mocap import mocap_node_features, random_vertical_rotation, skeleton_graph
from models.egno import EGNO, TemporalFourierConv, sinusoidal_time_embedding

NUM_JOINTS = 31
HEIGHT_MEAN, HEIGHT_STD = 1.0, 2.0


def skeleton_sample(seed: int = 0):
    """A random 31-joint tree skeleton (1-hop + 2-hop graph) and one MoCap-like state."""
    rng = np.random.default_rng(seed)
    parents = [int(rng.integers(0, i)) for i in range(1, NUM_JOINTS)]
    bones = np.array([[i + 1, p] for i, p in enumerate(parents)], np.int32)
    edges, edge_attr = skeleton_graph(bones, NUM_JOINTS)
    loc = (rng.standard_normal((NUM_JOINTS, 3)) * np.array([1.0, 3.0, 1.0]) + np.array([2.0, 1.0, -4.0]))
    vel = 0.3 * rng.standard_normal((NUM_JOINTS, 3))
    return loc.astype(np.float32), vel.astype(np.float32), jnp.asarray(edges), jnp.asarray(edge_attr)


def features(loc, vel):
    """The MoCap node features [‖v‖, normalised height], recomputed from the state (jnp)."""
    return jnp.stack([jnp.linalg.norm(vel, axis=-1), (loc[:, 1] - HEIGHT_MEAN) / HEIGHT_STD], axis=-1)


def test_features_match_the_loader():
    loc, vel, _, _ = skeleton_sample()
    np.testing.assert_allclose(
        features(loc, vel), mocap_node_features(loc, vel, HEIGHT_MEAN, HEIGHT_STD), rtol=1e-6, atol=1e-6
    )


@partial(jax.jit, static_argnames=("model", "project"))
def apply_model(model, variables, loc, vel, node_features, edges, edge_attr, project):
    return model.apply(variables, loc, vel, node_features, edges, edge_attr, project=project)


@partial(jax.jit, static_argnames=("model", "project"))
def init_model(model, key, loc, vel, node_features, edges, edge_attr, project=False):
    return model.init(key, loc, vel, node_features, edges, edge_attr, project=project)


def make_predict(model, variables, edges, edge_attr, project, recompute_features=True, fixed_features=None):
    """state (loc, vel) -> (T, J, 3); node features recomputed from the state or held fixed."""

    def predict(state):
        loc, vel = jnp.asarray(state[0]), jnp.asarray(state[1])
        nf = features(loc, vel) if recompute_features else fixed_features
        return apply_model(model, variables, loc, vel, nf, edges, edge_attr, project)

    return predict


def act_in(g, state):
    R, t = g
    loc, vel = state
    return loc @ R.T + t, vel @ R.T


def act_out(g, y):
    R, t = g
    return y @ R.T + t


def vertical_group_elements(seed: int = 0):
    """Rotations about y, reflections through planes containing y, horizontal translations."""
    rng = np.random.default_rng(seed)
    rotations = random_vertical_rotation(seed, 3)
    reflection_zy = np.diag([-1.0, 1.0, 1.0]).astype(np.float32)  # x -> -x
    reflection_oblique = (random_vertical_rotation(seed + 1, 1)[0] @ reflection_zy).astype(np.float32)
    mats = list(rotations) + [reflection_zy, reflection_oblique]
    assert sorted(np.sign(np.linalg.det(mats)).tolist()) == [-1, -1, 1, 1, 1]
    shifts = [np.array([a, 0.0, b], np.float32) for a, b in 5.0 * rng.standard_normal((len(mats), 2))]
    return [(jnp.asarray(R), jnp.asarray(t)) for R, t in zip(mats, shifts)]


@pytest.fixture(scope="module")
def setup():
    loc, vel, edges, edge_attr = skeleton_sample()
    model = EGNO(hidden=8, num_layers=2, modes=2, time_embed=8, num_timesteps=5)
    # an "rbg" key: the same numbers every run, and much faster to compile than threefry
    variables = init_model(model, jax.random.key(0, impl="rbg"), loc, vel, features(loc, vel), edges, edge_attr)
    return model, variables, (loc, vel), edges, edge_attr


def test_projection_is_equivariant_to_the_vertical_group(setup):
    model, variables, state, edges, edge_attr = setup
    predict = make_predict(model, variables, edges, edge_attr, project=True)
    err = ace_jax.relative_equivariance_error(predict, state, vertical_group_elements(), act_in, act_out)
    assert float(err) <= 1e-5
    # the output really moves with the input: a wrong action (no rotation) is far off
    wrong = ace_jax.relative_equivariance_error(
        predict, state, vertical_group_elements(), act_in, lambda g, y: y + g[1]
    )
    assert float(wrong) > 1e-2


def test_projection_is_not_equivariant_to_rotations_about_x_because_of_the_height_feature(setup):
    model, variables, state, edges, edge_attr = setup
    rot_x = [(ace_jax.rotation_about_axis(jnp.asarray(a), 0), jnp.zeros(3)) for a in (0.7, 2.0)]
    # With the height feature recomputed from the rotated state (as the data would give it),
    # rotations about x are not a symmetry of the inputs, so the output is not equivariant.
    predict = make_predict(model, variables, edges, edge_attr, project=True)
    assert float(ace_jax.relative_equivariance_error(predict, state, rot_x, act_in, act_out)) > 1e-3
    # Positions enter only through differences / the centroid: with the node features held
    # fixed as invariants, the projection is equivariant to every rotation.
    frozen = make_predict(model, variables, edges, edge_attr, True, False, features(*state))
    assert float(ace_jax.relative_equivariance_error(frozen, state, rot_x, act_in, act_out)) <= 1e-5


def _with_gammas(variables, value_by_kind):
    gammas = jax.tree_util.tree_map_with_path(
        lambda path, g: jnp.asarray(value_by_kind[str(path[-2].key)], g.dtype), variables["gamma"]
    )
    return {**variables, "gamma": gammas}


def test_full_model_and_each_branch_break_the_vertical_rotation_symmetry(setup):
    model, variables, state, edges, edge_attr = setup
    elements = vertical_group_elements(3)
    names = set(ace_jax.named_leaves(variables["gamma"]))
    # the last layer's h is never read, so it has no feature branch (its γ could not act)
    assert names == {"layer_0/coordinate_breaking/gamma", "layer_0/feature_breaking/gamma",
                     "layer_1/coordinate_breaking/gamma"}
    v = _with_gammas(variables, {"coordinate_breaking": 1.0, "feature_breaking": 1.0})
    predict = make_predict(model, v, edges, edge_attr, project=False)
    assert float(ace_jax.relative_equivariance_error(predict, state, elements, act_in, act_out)) > 1e-4
    for name in names:  # each γ alone breaks the symmetry: no branch is wired to nothing
        gamma = jax.tree.map(jnp.zeros_like, variables["gamma"])
        layer, kind, _ = name.split("/")
        gamma[layer][kind]["gamma"] = jnp.asarray(0.5)
        predict = make_predict(model, {**variables, "gamma": gamma}, edges, edge_attr, project=False)
        err = float(ace_jax.relative_equivariance_error(predict, state, elements, act_in, act_out))
        # far above the round-off level (≤ 1e-6 here) of an equivariant model
        assert err > 1e-4, (name, err)
    # γ = 0 is the projection: same outputs as project=True, hence equivariant again.
    zero = ace_jax.projected_variables(variables)
    full_at_zero = make_predict(model, zero, edges, edge_attr, project=False)
    projection = make_predict(model, variables, edges, edge_attr, project=True)
    np.testing.assert_allclose(full_at_zero(state), projection(state), atol=1e-5)
    # translations are kept exactly by the full model (branches see only x − centroid)
    shifts = [(jnp.eye(3), jnp.array([3.0, -2.0, 1.0]))]
    full = make_predict(model, variables, edges, edge_attr, False, False, features(*state))
    assert float(ace_jax.relative_equivariance_error(full, state, shifts, act_in, act_out)) <= 1e-5


def reference_fourier_conv(signal, w_real, w_imag, modes):
    """numpy: keep the lowest modes of the rfft along axis 0, mix the channel axis, irfft."""
    T = signal.shape[0]
    spectrum = np.fft.rfft(np.asarray(signal, np.float64), axis=0)
    out = np.zeros(spectrum.shape[:-1] + (w_real.shape[-1],), complex)
    for k in range(min(modes, T // 2 + 1)):
        weights = np.asarray(w_real[k], np.float64) + 1j * np.asarray(w_imag[k], np.float64)
        out[k] = spectrum[k] @ weights
    return np.fft.irfft(out, n=T, axis=0)


@pytest.mark.parametrize("num_frames", [1, 3, 5, 8])
def test_temporal_conv_matches_reference_and_commutes_with_rotations(num_frames):
    rng = np.random.default_rng(num_frames)
    conv = TemporalFourierConv(features=2, modes=2)
    vectors = jnp.asarray(rng.standard_normal((num_frames, 7, 3, 2)), jnp.float32)
    params = conv.init(jax.random.key(1, impl="rbg"), vectors)
    out = conv.apply(params, vectors)
    assert out.shape == (num_frames, 7, 3, 2)
    p = params["params"]
    np.testing.assert_allclose(out, reference_fourier_conv(vectors, p["weight_real"], p["weight_imag"], 2), atol=1e-5)
    for R in (ace_jax.random_orthogonal(jax.random.PRNGKey(2)), jnp.asarray(random_vertical_rotation(0, 1)[0])):
        rotate = lambda x: jnp.einsum("ij,tnjc->tnic", R, x)  # noqa: E731
        np.testing.assert_allclose(conv.apply(params, rotate(vectors)), rotate(out), atol=1e-5)
    scalars = jnp.asarray(rng.standard_normal((num_frames, 7, 4)), jnp.float32)
    scalar_conv = TemporalFourierConv(features=6, modes=2)
    scalar_params = scalar_conv.init(jax.random.key(0, impl="rbg"), scalars)
    assert scalar_conv.apply(scalar_params, scalars).shape == (num_frames, 7, 6)


def test_temporal_conv_removes_frequencies_above_the_kept_modes():
    T = 8
    t = np.arange(T)
    high = np.cos(2 * np.pi * 3 * t / T)[:, None, None] * np.ones((T, 2, 3))  # frequency 3 > modes
    low = np.ones((T, 2, 3))  # frequency 0
    conv = TemporalFourierConv(features=3, modes=2)
    params = conv.init(jax.random.key(0, impl="rbg"), jnp.asarray(high, jnp.float32))
    assert float(jnp.abs(conv.apply(params, jnp.asarray(high, jnp.float32))).max()) < 1e-5
    constant = conv.apply(params, jnp.asarray(low, jnp.float32))
    expected = np.ones(3) @ np.asarray(params["params"]["weight_real"][0])  # DC: real part of W_0
    np.testing.assert_allclose(constant, np.broadcast_to(expected, constant.shape), atol=1e-5)


def test_model_output_shape_for_several_horizons(setup):
    # The parameters do not depend on T (fixed time embedding, per-mode Fourier weights),
    # so the same variables serve every horizon.
    model, variables, (loc, vel), edges, edge_attr = setup
    # (The branches act per frame and node, so one full-model horizon suffices.)
    for num_frames, project in ((1, True), (3, True), (5, True), (5, False), (8, True)):
        horizon_model = model.clone(num_timesteps=num_frames)
        out = apply_model(horizon_model, variables, loc, vel, features(loc, vel), edges, edge_attr, project)
        assert out.shape == (num_frames, NUM_JOINTS, 3)
        assert bool(jnp.all(jnp.isfinite(out)))


def test_projection_init_builds_no_branches_and_no_gamma(setup):
    model, full, (loc, vel), edges, edge_attr = setup
    nf = features(loc, vel)
    vanilla = jax.eval_shape(
        lambda k: model.init(k, loc, vel, nf, edges, edge_attr, project=True), jax.random.PRNGKey(0)
    )
    assert set(vanilla) == {"params"}
    vanilla_names = set(ace_jax.named_leaves(vanilla["params"]))
    assert not [name for name in vanilla_names if "breaking" in name]
    assert len(ace_jax.named_leaves(full["gamma"])) == 2 * model.num_layers - 1  # no feature branch in the last layer
    assert all(float(g) == 1.0 for g in ace_jax.named_leaves(full["gamma"]).values())
    # The full model's params restricted to the vanilla structure run the projection:
    # with project=True the branches (absent here) are never evaluated.
    full_params = ace_jax.named_leaves(full["params"])
    assert vanilla_names < set(full_params)
    restricted = {"params": jax.tree_util.tree_map_with_path(
        lambda path, _: full_params["/".join(str(key.key) for key in path)], vanilla["params"]
    )}
    out = apply_model(model, restricted, loc, vel, nf, edges, edge_attr, True)
    np.testing.assert_allclose(out, apply_model(model, full, loc, vel, nf, edges, edge_attr, True), atol=1e-6)


def test_sinusoidal_time_embedding_values():
    emb = np.asarray(sinusoidal_time_embedding(3, 4))
    # half = 2, frequencies 10000^(-k/1) = [1, 1e-4]
    expected = np.array([[np.sin(t), np.sin(t * 1e-4), np.cos(t), np.cos(t * 1e-4)] for t in range(3)])
    np.testing.assert_allclose(emb, expected, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    loc, vel, edges, edge_attr = skeleton_sample(3)
    model = EGNO(hidden=8, num_layers=1, time_embed=4)
    with pytest.raises(ValueError, match="loc must have shape"):
        model.init(jax.random.PRNGKey(0), loc[None], vel[None], features(loc, vel), edges, edge_attr)
    with pytest.raises(ValueError, match="edges must have shape"):
        model.init(jax.random.PRNGKey(0), loc, vel, features(loc, vel), edges.T, edge_attr)
    with pytest.raises(ValueError, match="node_features"):
        model.init(jax.random.PRNGKey(0), loc, vel, features(loc, vel)[:5], edges, edge_attr)


@pytest.mark.parametrize("project", [True, False])
def test_relabelling_the_joints_permutes_the_prediction(setup, project):
    # Joint j of the relabelled skeleton is joint perm[j] of the original; the edge list is
    # renumbered and shuffled. The branches act per joint, so the full model is permutation
    # equivariant too.
    model, variables, (loc, vel), edges, edge_attr = setup
    rng = np.random.default_rng(4)
    perm = rng.permutation(NUM_JOINTS)
    new_index = np.argsort(perm)  # old joint -> its new label
    order = rng.permutation(len(edges))
    edges_p = jnp.asarray(new_index[np.asarray(edges)][order])
    attr_p = jnp.asarray(np.asarray(edge_attr)[order])
    out = apply_model(model, variables, loc, vel, features(loc, vel), edges, edge_attr, project)
    loc_p, vel_p = loc[perm], vel[perm]
    out_p = apply_model(model, variables, loc_p, vel_p, features(loc_p, vel_p), edges_p, attr_p, project)
    np.testing.assert_allclose(np.asarray(out_p), np.asarray(out)[:, perm], rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(out - out[:, perm]))) > 1e-3  # the joints' predictions do differ
