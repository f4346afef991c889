"""The README's optax example runs as written and drives γ towards 0 on symmetric data."""

import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import ace_jax as aj


class MyHomotopicModel(nn.Module):
    @nn.compact
    def __call__(self, x, project=False):
        return aj.Homotopic(nn.Dense(1, use_bias=False), _Bias(), name="layer")(x, project=project)


class _Bias(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.ones(x.shape[:-1] + (1,), x.dtype)


def test_readme_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## The dual transform.*?```python\n(.*?)```", text, re.S).group(1)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 3)), jnp.float32)
    y = x @ jnp.array([[1.0], [0.5], [-1.0]])  # odd target: γ should go to 0
    scope = {"MyHomotopicModel": MyHomotopicModel, "key": jax.random.PRNGKey(0), "x0": x[:1], "x": x, "y": y}
    exec(compile(code, "README.md", "exec"), scope)
    step = scope["step"]
    state = [scope[k] for k in ("primal", "lam", "p_state", "d_state")]
    gamma0 = float(state[0]["gamma"]["layer"]["breaking"]["gamma"])
    for _ in range(5000):
        state = list(step(*state, x, y))
    gamma = float(state[0]["gamma"]["layer"]["breaking"]["gamma"])
    assert abs(gamma) < 0.05 * abs(gamma0)
    assert scope["deployed"].shape == (64, 1)
    # the deployed projection is the γ = 0 model: the equivariant (odd) part alone
    model, variables = scope["model"], scope["variables"]
    np.testing.assert_allclose(scope["deployed"], model.apply(aj.projected_variables(variables), x), atol=1e-6)
    np.testing.assert_allclose(model.apply(variables, -x, project=True), -scope["deployed"], atol=1e-6)


def test_readme_small_branch_snippet_gives_the_stated_variance():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"### Start the branches small.*?```python\n(.*?)```", text, re.S).group(1)
    scope = {"aj": aj}
    exec(compile(code, "README.md", "exec"), scope)
    fan_in = 256
    params = scope["branch"].init(jax.random.PRNGKey(0), jnp.ones((1, fan_in)))["params"]
    kernel = np.asarray(params["Dense_0"]["kernel"])
    assert kernel.shape == (fan_in, 64)
    assert abs(kernel.var() * fan_in / 0.01 - 1.0) < 0.05  # variance 0.01 / fan_in (16384 draws)
