"""ace-jax: Adaptive Constrained Equivariance in JAX/Flax.

Homotopic layers ``f = f_eq + γ·g`` (γ in the ``"gamma"`` collection), the ACE Lagrangian,
optax-style dual ascent, equivariance metrics and group samplers, and the training engine.
"""

from ace_jax.dual import ascent, dual_ascent, project_nonnegative, proportional_term, slack_descent
from ace_jax.engine import FitResult, NonFiniteError, Task, TrainConfig, build_step, fit, make_evaluator, make_trainer
from ace_jax.formulations import Equality, Inequality, Resilient
from ace_jax.groups import (
    C4_ELEMENTS,
    D4_ELEMENTS,
    c4_act,
    c4_regular_act,
    d4_act,
    random_orthogonal,
    random_rotation,
    random_translation,
    rotate_points,
    rotation_about_axis,
)
from ace_jax.homotopic import (
    GAMMA,
    AxisMixBranch,
    Homotopic,
    LowRankBranch,
    MLPBranch,
    ScaledDense,
    SpectralDense,
    SymmetryBreaking,
    WeightBranch,
    branch_output_init,
    gammas,
    named_leaves,
    projected_variables,
    spectral_norm,
    spectral_normalize,
    summed_affine_branch,
    weight_breaking,
)
from ace_jax.lagrangian import LagrangianAux, make_lagrangian
from ace_jax.methods import METHOD_NAMES, Method, get_method, triangle_schedule
from ace_jax.metrics import equivariance_bound, equivariance_error, relative_equivariance_error
from ace_jax.train_step import TrainState, init_train_state, make_train_step

__version__ = "0.1.0"
