"""Tiny Flax models shared by the engine tests (imported by name: tests/ is on sys.path under pytest)."""

import flax.linen as nn

import ace_jax as aj


class OddModel(nn.Module):
    """Equivariant part odd in x (sign-flip group); the branch may add a bias."""

    @nn.compact
    def __call__(self, x, project=False):
        y = nn.Dense(1, use_bias=False)(x)
        if not project:
            y = y + aj.SymmetryBreaking(aj.MLPBranch(1), name="breaking")(x)
        return y
