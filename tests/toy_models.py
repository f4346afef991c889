"""Tiny Flax models (and a task on one) shared by the engine tests (imported by name: tests/ is on sys.path under pytest)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import ace_jax as aj


class OddModel(nn.Module):
    """Equivariant part odd in x (sign-flip group); the branch may add a bias."""

    @nn.compact
    def __call__(self, x, project=False):
        y = nn.Dense(1, use_bias=False)(x)
        if not project:
            y = y + aj.SymmetryBreaking(aj.MLPBranch(1), name="breaking")(x)
        return y


def odd_task(nan_if_first_weight_positive: bool = False):
    """``(Task, OddModel())``: per-example MSE, and as ``transform`` a random sign flip of input
    and target drawn from the step's key. With ``nan_if_first_weight_positive`` the loss is NaN
    wherever the first weight is > 0: seeds that start there diverge at their first step, others
    may cross later, some never do (fixed by init and training)."""
    model = OddModel()
    x0 = np.zeros(2, np.float32)

    def loss(v, ex, rng, project):
        mse = jnp.mean((model.apply(v, ex["x"], project=project) - ex["y"]) ** 2)
        if nan_if_first_weight_positive:
            mse = mse + jnp.where(v["params"]["Dense_0"]["kernel"][0, 0] > 0, jnp.nan, 0.0)
        return mse

    def flip(rng, ex):
        sign = jnp.where(jax.random.bernoulli(rng), -1.0, 1.0)
        return {"x": sign * ex["x"], "y": sign * ex["y"]}

    return aj.Task(init=lambda k, has_branches: model.init(k, x0, project=not has_branches), loss=loss,
                   transform=flip), model
