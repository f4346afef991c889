"""N-body SEGNN: the projection is E(3)-equivariant, γ ≠ 0 breaks it, no branch when projecting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ace_jax import GAMMA, named_leaves, random_orthogonal
from models.segnn import SEGNN


@pytest.fixture(scope="module")
def setup():
    model = SEGNN(hidden_irreps="8x0e+8x1o", num_layers=2)
    rng = np.random.default_rng(0)
    loc = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    vel = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    charges = jnp.asarray(rng.choice([-1.0, 1.0], size=(5, 1)), jnp.float32)
    variables = model.init(jax.random.PRNGKey(0), loc, vel, charges)
    return model, variables, (loc, vel, charges)


def _errors(model, variables, inputs, project):
    loc, vel, charges = inputs
    out = model.apply(variables, loc, vel, charges, project=project)
    errs = []
    for k in range(3):
        q = random_orthogonal(jax.random.PRNGKey(10 + k))
        t = jax.random.normal(jax.random.PRNGKey(20 + k), (3,))
        moved = model.apply(variables, loc @ q.T + t, vel @ q.T, charges, project=project)
        errs.append(float(jnp.max(jnp.abs(moved - (out @ q.T + t)))))
    return max(errs), float(jnp.max(jnp.abs(out)))


def test_projection_is_e3_equivariant(setup):
    model, variables, inputs = setup
    err, scale = _errors(model, variables, inputs, project=True)
    assert err <= 1e-5 * max(scale, 1.0)


def test_gamma_breaks_equivariance(setup):
    model, variables, inputs = setup
    assert GAMMA in variables
    err, _ = _errors(model, variables, inputs, project=False)
    assert err > 1e-3


def _without_branches(tree):
    """``tree`` without its ACE sub-trees (``*_breaking`` / ``*_branch`` keys at any depth)."""
    if not isinstance(tree, dict):
        return tree
    return {k: _without_branches(v) for k, v in tree.items() if "breaking" not in k and "branch" not in k}


@pytest.mark.parametrize(
    "branch", [{}, {"branch_kind": "axis"}, {"branch_kind": "in_kernel"}, {"branch_rank": 3}],
    ids=["dense", "axis", "in_kernel", "rank3"],
)
def test_projection_builds_no_branches(setup, branch):
    """For every branch kind, ``init(project=True)`` has no γ collection and no branch
    parameter; its tree is exactly the ACE model's with the branches removed, and every
    message-passing layer of the ACE model has one γ per block (message, update)."""
    _, _, (loc, vel, charges) = setup
    model = SEGNN(hidden_irreps="8x0e+8x1o", num_layers=2, **branch)
    shapes = {p: jax.eval_shape(lambda p=p: model.init(jax.random.PRNGKey(0), loc, vel, charges, project=p))
              for p in (True, False)}
    vanilla, full = shapes[True], shapes[False]
    assert set(vanilla) == {"params"}
    vanilla_names = set(named_leaves(vanilla["params"]))
    assert not any("breaking" in name or "branch" in name for name in vanilla_names)
    assert sorted(named_leaves(full[GAMMA])) == sorted(
        f"layer_{i}/{b}_breaking/gamma" for i in range(2) for b in ("message", "update"))
    branch_names = set(named_leaves(full["params"])) - vanilla_names
    assert branch_names and all("breaking" in name or "branch" in name for name in branch_names)
    stripped = _without_branches(full["params"])
    assert jax.tree.structure(stripped) == jax.tree.structure(vanilla["params"])
    assert jax.tree.map(np.shape, stripped) == jax.tree.map(np.shape, vanilla["params"])


def test_node_permutation_equivariance(setup):
    model, variables, (loc, vel, charges) = setup
    perm = np.array([3, 0, 4, 1, 2])
    out = model.apply(variables, loc, vel, charges, project=True)
    out_p = model.apply(variables, loc[perm], vel[perm], charges[perm], project=True)
    np.testing.assert_allclose(out_p, out[perm], atol=1e-5)
