"""EGNN for the charged N-body task (Satorras et al. 2021, velocity variant), with ACE branches.

One graph of N particles (N = 5 in the data set), fully connected, laid out densely: every
pairwise quantity is an (N, N, ·) array and the diagonal i = j is masked out.

Inputs: positions x (N, 3), velocities v (N, 3), charges q (N, 1).
Node feature ‖v_i‖; edge features a_ij = [q_i q_j, ‖x_i − x_j‖²] (distance of the INPUT
positions, fixed over layers, as in the EGNN N-body code).

Layer l (h ∈ ℝ^{N×H}, x ∈ ℝ^{N×3}; C = 1/(N − 1); silu activations):

    m_ij     = φ_e(h_i, h_j, ‖x_i − x_j‖², a_ij)                       (N, N, H)
    x_i'     = x_i + C Σ_{j≠i} (x_i − x_j) φ_x(m_ij) + φ_v(h_i) v_i      (velocity-aware update)
    h_i'     = h_i + φ_h(h_i, Σ_{j≠i} m_ij)                              (residual feature update)

and the prediction is x after the last layer (positions 1000 integration steps later).
Every term above is E(3)-equivariant (x, v rotate and x translates; h, m are invariant) and
permutation-equivariant.

ACE (METHOD.md §1): each layer carries symmetry-breaking branches on both updates,

    x_i' += γ_x,l · g_x,l(z_i)        h_i' += γ_h,l · g_h,l([h_i, z_i])
    z_i   = [q_i, x_i − x̄, v_i]       (x̄ = centroid of the graph; the 3-vector components
                                       concatenated as plain numbers), (N, 7)

``g`` is an :class:`ace_jax.MLPBranch` (a Linear layer by default). Because it mixes raw
Cartesian components of x − x̄ and v, it can break rotations and reflections; the charge
lets it express charge-coupled directions (an external field adds q_i E ẑ). It sees
positions only relative to the centroid, so the full model stays translation-equivariant
(the N-body physics is translation-invariant, also with the external field). The branch is
shared over nodes, so permutation equivariance is kept. The coordinate branch sees z only,
not h: a Linear map of the 64 features would displace every particle by O(‖h‖) per layer
at initialisation and swamp the prediction; breaking that needs h reaches the coordinates
through the feature branch (non-invariant h enters φ_x and φ_v). The last layer's feature update is never used by
the output, so that layer has neither the update nor its branch: 2L − 1 branches (7 for
L = 4), each of which reaches the prediction. With ``project=True`` no branch is evaluated
(and initialising with ``project=True`` creates neither branch parameters nor γ).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from ace_jax import MLPBranch, SymmetryBreaking, branch_output_init

# The last layer of φ_x starts tiny (Xavier-uniform with gain 0.001, as in the EGNN code), so
# the initial coordinate updates are dominated by x + φ_v(h) v and training is stable.
_small_init = nn.initializers.variance_scaling(1e-6, "fan_avg", "uniform")
# Other kernels start as PyTorch's nn.Linear does (uniform ±1/sqrt(fan_in), variance 1/(3 fan_in)),
# as in the reference EGNN. Flax's default (LeCun normal, 3x the variance) compounds over the
# message/feature/velocity MLPs of 4 layers: the untrained model then explodes on far-apart
# particles (initial MSE up to ~1e4 on some draws vs ~0.2–0.5 with this init).
_dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _check_inputs(loc, vel, charges) -> int:
    loc, vel, charges = jnp.asarray(loc), jnp.asarray(vel), jnp.asarray(charges)
    if loc.ndim != 2 or loc.shape[-1] != 3:
        raise ValueError(f"EGNN expects loc of shape (N, 3) for one graph, got {loc.shape}")
    num_nodes = loc.shape[0]
    if num_nodes < 2:
        raise ValueError(f"EGNN needs at least 2 particles, got {num_nodes}")
    if vel.shape != (num_nodes, 3):
        raise ValueError(f"EGNN expects vel of shape ({num_nodes}, 3), got {vel.shape}")
    if charges.shape != (num_nodes, 1):
        raise ValueError(f"EGNN expects charges of shape ({num_nodes}, 1), got {charges.shape}")
    return num_nodes


class EGNNLayer(nn.Module):
    """One equivariant graph convolution with the velocity-aware coordinate update.

    Attributes:
      hidden: width H of h and of the messages.
      spectral_branch: spectrally normalise the breaking branches (resilient ACE).
      branch_hidden: hidden widths of the breaking branches (() = one Linear layer).
      gamma_init: initial γ of both branches.
      branch_init_scale: variance of the branches' last kernel relative to LeCun normal
        (default 0.01; 1.0 = LeCun; see :class:`EGNN`).
      update_features: compute h' (False in the last layer, whose h' would never be used:
        then neither the feature update nor its branch exists and h' is None).

    Call: ``(h (N, H), x (N, 3), v (N, 3), q (N, 1), edge_attr (N, N, 2), project) -> (h', x')``.
    """

    hidden: int
    spectral_branch: bool = False
    branch_hidden: Sequence[int] = ()
    gamma_init: float = 1.0
    branch_init_scale: float = 0.01
    update_features: bool = True

    @nn.compact
    def __call__(self, h, x, v, q, edge_attr, project: bool = False):
        n = x.shape[0]
        off_diagonal = (1.0 - jnp.eye(n, dtype=x.dtype))[:, :, None]  # (N, N, 1)

        diff = x[:, None, :] - x[None, :, :]  # (N, N, 3): x_i − x_j
        radial = jnp.sum(diff**2, axis=-1, keepdims=True)  # (N, N, 1)
        pair = jnp.concatenate(
            [jnp.broadcast_to(h[:, None, :], (n, n, h.shape[-1])),
             jnp.broadcast_to(h[None, :, :], (n, n, h.shape[-1])), radial, edge_attr],
            axis=-1,
        )
        m = nn.silu(nn.Dense(self.hidden, kernel_init=_dense_init, name="edge_mlp_0")(pair))
        m = nn.silu(nn.Dense(self.hidden, kernel_init=_dense_init, name="edge_mlp_1")(m))  # (N, N, H)
        m = m * off_diagonal

        # Coordinates: mean over the N − 1 neighbours of (x_i − x_j) φ_x(m_ij), plus φ_v(h_i) v_i.
        w = nn.silu(nn.Dense(self.hidden, kernel_init=_dense_init, name="coord_mlp_0")(m))
        w = nn.Dense(1, use_bias=False, kernel_init=_small_init, name="coord_mlp_1")(w)  # (N, N, 1)
        coord_update = jnp.sum(diff * w * off_diagonal, axis=1) / (n - 1)
        vel_scale = nn.silu(nn.Dense(self.hidden, kernel_init=_dense_init, name="vel_mlp_0")(h))
        vel_scale = nn.Dense(1, kernel_init=_dense_init, name="vel_mlp_1")(vel_scale)  # (N, 1)
        x_new = x + coord_update + vel_scale * v

        # Branch inputs: raw Cartesian components (not invariants), the charge, and for the
        # feature branch also the invariant features.
        geometric = jnp.concatenate([q, x - jnp.mean(x, axis=0, keepdims=True), v], axis=-1)  # (N, 7)
        if not project:
            x_new = x_new + SymmetryBreaking(
                MLPBranch(3, tuple(self.branch_hidden), self.spectral_branch, name="coord_branch",
                          output_kernel_init=branch_output_init(self.branch_init_scale)),
                self.gamma_init, name="coord_breaking",
            )(geometric)
        if not self.update_features:
            return None, x_new

        # Features: residual update from the summed messages.
        agg = jnp.sum(m, axis=1)  # (N, H)
        dh = jnp.concatenate([h, agg], axis=-1)
        dh = nn.silu(nn.Dense(self.hidden, kernel_init=_dense_init, name="node_mlp_0")(dh))
        dh = nn.Dense(self.hidden, kernel_init=_dense_init, name="node_mlp_1")(dh)
        h_new = h + dh
        if not project:
            h_new = h_new + SymmetryBreaking(
                MLPBranch(self.hidden, tuple(self.branch_hidden), self.spectral_branch, name="feature_branch",
                          output_kernel_init=branch_output_init(self.branch_init_scale)),
                self.gamma_init, name="feature_breaking",
            )(jnp.concatenate([h, geometric], axis=-1))
        return h_new, x_new


class EGNN(nn.Module):
    """EGNN for one N-body graph: ``(loc (N,3), vel (N,3), charges (N,1)) -> positions (N,3)``.

    Attributes:
      hidden: width of node features and messages (64 in the paper).
      num_layers: number of :class:`EGNNLayer` (4 in the paper).
      spectral_branch: spectrally normalised breaking branches (for resilient ACE).
      gamma_init: initial γ of every branch (1.0 paper default).
      branch_hidden: hidden widths of each branch MLP (() = a single Linear layer).
      branch_init_scale: variance of each branch's last kernel relative to LeCun normal
        (default 0.01, i.e. a tenth of LeCun's standard deviation). The branches map raw
        coordinates (|x| up to ~10) into x and h, so at γ = 1 with LeCun weights (scale 1)
        they displace each particle by O(|x|) per layer: on the N-body training set the
        untrained full model's MSE is then 3–16 against 0.2–0.6 for its projection (init seeds
        0–9; 0.2–0.6 also with 0.01), and one paper run in three diverged. With 0.01 all three
        trained and beat vanilla (experiments/nbody.py). The branch still trains from a small
        start: ∂L/∂W = γ·∂L/∂g·z. With ``spectral_branch`` the small start is kept too: the
        last branch layer is then W / max(1, σ_max) (:class:`ace_jax.MLPBranch`), not W / σ_max.

    With ``project=True`` the equivariant projection is computed (branches not evaluated).
    """

    hidden: int = 64
    num_layers: int = 4
    spectral_branch: bool = False
    gamma_init: float = 1.0
    branch_hidden: Sequence[int] = ()
    branch_init_scale: float = 0.01

    @nn.compact
    def __call__(self, loc, vel, charges, project: bool = False):
        _check_inputs(loc, vel, charges)
        if self.hidden < 1 or self.num_layers < 1:
            raise ValueError(f"EGNN needs hidden >= 1 and num_layers >= 1, got {self.hidden}, {self.num_layers}")
        x, v, q = jnp.asarray(loc), jnp.asarray(vel), jnp.asarray(charges)
        speed = jnp.linalg.norm(v, axis=-1, keepdims=True)  # (N, 1)
        h = nn.Dense(self.hidden, kernel_init=_dense_init, name="embedding")(speed)
        edge_attr = jnp.concatenate(
            [q[:, None, :] * q[None, :, :],  # q_i q_j
             jnp.sum((x[:, None, :] - x[None, :, :]) ** 2, axis=-1, keepdims=True)],  # ‖x_i − x_j‖²
            axis=-1,
        )  # (N, N, 2)
        for layer in range(self.num_layers):
            h, x = EGNNLayer(
                self.hidden, self.spectral_branch, tuple(self.branch_hidden), self.gamma_init,
                self.branch_init_scale, update_features=layer + 1 < self.num_layers, name=f"layer_{layer}",
            )(h, x, v, q, edge_attr, project)
        return x
