"""SEGNN (Brandstetter et al., 2022) for the charged N-body task, with ACE branches.

Feature layout. A steerable feature of type ``n_s x 0e + n_v x 1o`` is a pair of arrays

    scalars (..., n_s)        vectors (..., 3, n_v)        (xyz axis before the channel axis)

and an attribute of type ``1x0e + 1x1o`` (spherical harmonics l ≤ 1) is ``(a0, a1)`` with a0 a
python float (with normalised harmonics Y0 is a constant) and a1 (..., 3).
:func:`to_irreps_array` / :func:`from_irreps_array` convert to and from e3nn-jax.

Steerable linear layer: the O(3) fully connected tensor product of a feature with an
attribute (e3nn's "uvw" paths, "element" path normalisation, weights ~ N(0, 1)). With l ≤ 1
the only paths into ``0e + 1o`` are 0e⊗0e→0e, 1o⊗1o→0e, 0e⊗1o→1o and 1o⊗0e→1o, so with
n = n_s + n_v input channels

    out_s = (a0 · s W_ss + (Σ_k v_k a1_k) W_vs / √3) / √n + b        (..., S)
    out_v_k = (a1_k · s W_sv + a0 · v_k W_vv) / √n                    (..., 3, V)

which equals ``e3nn_jax.legacy.FunctionalFullyConnectedTensorProduct`` with the same weights
(tests/test_segnn.py checks it). A gated layer produces S = n_s + n_v scalars and applies
e3nn's gate: silu on the first n_s, sigmoid of the last n_v multiplies the vectors (both
divided by their second moment under N(0, 1), as ``e3nn_jax.gate`` does).

Network for one graph of N nodes, fully connected (messages j → i for all j ≠ i):

    x̄_i = x_i − mean_k x_k                                   (centred: E(3)-equivariant input)
    a_ij = Y(x_i − x_j),   a_i = (1, mean_{j≠i} Y1(x_i − x_j) + Y1(v_i))   (Y: "integral" harmonics)
    h_i ← L_emb([‖v_i‖ ; x̄_i, v_i] ; a_i)
    per layer:  m_ij = G_m2(G_m1([h_i, h_j, ‖x_i − x_j‖, q_i q_j] ; a_ij) ; a_ij)
                m_i  = Σ_{j≠i} m_ij
                h_i ← h_i + L_u2(G_u1([h_i, m_i] ; a_i) ; a_i)
    prediction_i = x_i + L_out(G_out(h_i ; a_i) ; a_i)       (one 1o vector per node)

G = gated steerable layer, L = steerable layer without gate.

ACE (METHOD.md §1). Each message-passing layer has two symmetry-breaking branches, one after
each tensor-product block. With y the block output flattened to plain numbers (n_s + 3 n_v
per edge or node, :func:`flatten_steerable`), the block becomes y + γ·g(y), g an
:class:`ace_jax.MLPBranch` of the same width, so the layer is f_eq + γ·(g∘f_eq) and γ = 0 is
exactly SEGNN. The message block's corrected messages are summed, Σ_j (m_ij + γ g(m_ij)).
For an affine g (``branch_hidden=()``, the default) that equals
m_i + γ (N−1) g(m_i / (N−1)), which is how it is computed (one node-level Dense instead of
an edge-level one; same numbers). With hidden layers g runs on every edge.
``branch_kind="axis"`` swaps g for :class:`ace_jax.AxisMixBranch` on the vector channels
(v_c ↦ v_c + γ v_c A_c, a learned 3×3 per channel; scalars pass unchanged): linear, so also
summed at node level, and about 1/50 of the dense branch's work. Measured (batch 100, 2-core
CPU, interleaved, p25): vanilla 29.6 ms, ACE dense 37.8 ms (1.28×), ACE axis 34.8 ms (1.18×) —
the axis branch is bound by memory passes and the reduction for ∂L/∂A_c, not by FLOPs.
``branch_kind="in_kernel"`` folds the branch into the block's last product instead
(:class:`ace_jax.WeightBranch`): the vector→vector weight of message_2 / update_2 becomes one
matrix per xyz component, out_v[k] = v[k] (W_vv + γ δ_k) (+ the attribute paths), i.e. the
branch g(x)_k = x_k δ_k reads the block's input (METHOD.md §1's f_eq(x) + γ g(x)) and costs
no extra pass: measured 1.00× the vanilla step in session 3 (vanilla 33.0 ms, ACE 32.9 ms,
resilient 34.4 ms) and 1.08× in session 4 (37.0 vs 39.9 ms; dense 1.22×), ``python -m
experiments.benchmark --models segnn,segnn_in_kernel --steps 100``, quiet 2-core CPU. It does
not carry ACE's gain, though: at the paper's N-body settings (fan_in weights, node Y0 = the sum
below, Adam dual, one seed each) ACE trained to test MSE 0.0045 with in-kernel branches, at
vanilla level (0.0047 / 0.0044, two seeds), while with dense ones its validation MSE stayed
below vanilla's throughout (0.00429 vs 0.00500 best) and test reached 0.00442; with node
Y0 = 1 (the current model) dense ACE reaches 0.00394 / 0.00403 / 0.00391 (seeds 0 / 1 / 2) against vanilla's
0.00435 / 0.00455 / 0.00447, and in-kernel ACE 0.00470 (seed 0), worse than vanilla (``experiments.nbody``, whose default is
therefore the dense branch, like this class's).
``branch_rank=r`` factors the dense branch through rank r (:class:`ace_jax.LowRankBranch`).
Quiet 2-core CPU, interleaved (``experiments.benchmark --models segnn,segnn_rank16 --methods
vanilla,ace --steps 200`` and an A/B script): rank-16 ACE 1.19–1.20× the vanilla step, dense ACE 1.22–1.29× (a later run: rank 16 1.16×).
The same benchmark pinned to one core (``taskset -c 0``) gives 1.09× (rank 16) and 1.12× (dense):
vanilla 53.9 / 52.4 ms, ACE 58.7 / 58.8 ms. With both cores vanilla drops to 34.7–35.1 ms (1.5×
faster) but ACE only to 41.8 / 42.8 ms: the work ACE adds does not share in the second core's
speed-up. The reason is the size of the branches' products: a 500 × 128 × 128 product with its
two backward products takes 0.36 ms on one core and 0.42–0.47 ms on two (XLA does not split
it; products of 2000 rows, the per-edge size, do speed up 1.2–1.3×), so the eight dense
branches are 2.9–3.8 ms of serial work, 12–16 % of the two-core vanilla step before any other
cost (``python -m experiments.benchmark_products --out DIR``; its docstring has the table).
Where the branch sits is not the reason: a prototype whose branches read the layer's input
(so XLA could run them beside the block's products) measured 1.21× against 1.23×.
Nor is it the rest of the Lagrangian step: timed interleaved on 2 cores (vanilla 24.4 ms), ACE
took 30.5 ms; ACE without the dual update (γ still learned) 30.5 ms; with γ fixed, no dual,
branches still evaluated and trained, 30.1 ms; ACE without the step's NaN guard 31.6 ms (vanilla
without it 24.1 ms). Moving the optimizer updates into a ``lax.cond`` on the finiteness flag
instead of selecting every leaf made ACE slower (1.33× against 1.26× in one run). So the
overhead is the branches' own products (forward and both backward products), not the dual,
the γ gradients or the guard. XLA CPU flags do not change that. Without YNNPACK fusions
(``--xla_cpu_experimental_ynn_fusion_type=``) ACE ran at 1.21×; without both XNNPACK and
YNNPACK fusions at 1.19×, and with the concurrency-optimised scheduler at 1.20×. The last two
slow vanilla from 24 to 45 ms. ``--xla_cpu_use_xnnpack=false`` gave 1.22×, against 1.23× with
the defaults. Nor is it the number of XLA ops: the compiled ACE step has 1321 top-level ops
against vanilla's 1054 (1.25×; 532 of ACE's are per-leaf fusions rooted at the NaN guard's
selects, which carry the optimizer updates, and its finiteness checks), but checking finiteness
in one reduction over the concatenated gradients and flattening Adam's state (``optax.flatten``)
cut them to 885 and 707 and left the ratio at 1.28× (1.27× before; interleaved, both cores:
vanilla 25.1 → 23.9 ms, ACE 31.9 → 30.7 ms).
An earlier 1.50× for rank 16 was the allocator, not the branch: that step's scratch memory
(32.9 MiB) crossed glibc's 32 MiB mmap threshold, so every step faulted in 33 MiB of fresh
pages (5418 faults per step; experiments/benchmark.py). With γ folded into the branch weights
the scratch is 31.2 MiB (dense: 30.2 MiB, vanilla: 29.4 MiB) and the faults are gone. What
remains is the branch work itself: single-core profile of the dense ACE step, its three
500×128×128 products per branch take about 0.75 ms, 6 ms for the eight branches, about 12 %
of the vanilla step. Quality at the paper's settings (Adam dual, seed 0): rank-16 ACE test MSE
0.00415 (full model 0.00414, 4324 s on one core), between dense ACE (0.00394) and vanilla
(0.00435) of the same seed. The QM9 SEGNN, with 324-wide features, gains more from low rank
(models/segnn_qm9.py).

Speed (CPU, XLA): the graph is handled densely as an (N, N−1) grid of edges; sender values
come from a static index table (measured about 2× faster per training step than a full N × N
grid with a masked diagonal, and than slicing the diagonal out of it). The first message
layer is linear in [h_i, h_j, edge scalars], so its weight products run once per node and
only the attribute products run per edge. Each layer does one matmul for the scalar-input
paths and one for the vector-input path, with the constant Y0 and the normalisation folded
into the weights.

Parameterisation (``parameterization``, default ``"fan_in"``). The steerable weights are stored
as in the reference SEGNN, which initialises its e3nn-torch products like ``torch.nn.Linear``:
W ~ U(−1/√n, 1/√n) used as is, biases drawn the same way. e3nn-jax's own convention
(``"normal"``: W ~ N(0, 1) used as W/√n, zero biases) spans the same functions with outputs of
the same order at init, but Adam moves every stored weight by about the learning rate per
step, so at the paper's learning rate its layers learn √n (≈ 8–11) times more slowly. At the
paper's N-body settings (Adam 9e-4, 3000 trajectories) that made vanilla SEGNN train ten
times slower (validation MSE 0.0100 after 200 epochs, best 0.0065 at epoch ~800, test
0.00609) than the reference-style weights (0.0055 after 200 epochs, best 0.0052 at epoch 159).

Harmonics use e3nn's "integral" normalisation, as the SEGNN paper does; with "component"
normalisation (‖Y‖ ≈ 2) the residual stream of this network grows ~10⁴-fold at init.

Node attribute. The l = 1 part of a_i is mean_j Y1(x_i − x_j) + Y1(v_i); its l = 0 part is 1,
as the reference SEGNN sets it for every node before the first layer (our QM9 SEGNN does the
same). The literal sum mean_j Y0 + Y0(v_i) = 2/√(4π) ≈ 0.56 would shrink every node-level
path that reads Y0 (the 0e⊗0e and 1o⊗0e paths of the embedding, update and head layers) by
that factor, which with the fan_in weights also slows their learning under Adam. Measured
(vanilla, ``--preset paper --epochs 200``, one core each): best validation MSE 0.00502 / 0.00523
(seeds 0 / 1; test 0.00468 / 0.00497) with Y0 = 1 against 0.00523 / 0.00552 (test 0.00508 /
0.00526) with the sum.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ace_jax import AxisMixBranch, LowRankBranch, MLPBranch, SymmetryBreaking, summed_affine_branch, weight_breaking

BRANCH_KINDS = ("dense", "axis", "in_kernel")

SQRT3 = math.sqrt(3.0)
SH_NORMALIZATIONS = ("integral", "component")

Steerable = tuple  # (scalars (..., n_s), vectors (..., 3, n_v))


# ------------------------------------------------------------------------------------------
# Representation helpers
# ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def gate_activations():
    """(silu, sigmoid), each divided by its second moment under N(0, 1), as in e3nn_jax.gate."""
    return e3nn.normalize_function(jax.nn.silu), e3nn.normalize_function(jax.nn.sigmoid)


def parse_hidden_irreps(hidden_irreps: str) -> tuple[int, int]:
    """``"32x0e+32x1o"`` -> (32, 32). Only 0e and 1o irreps are supported (l ≤ 1 under O(3))."""
    try:
        irreps = e3nn.Irreps(hidden_irreps)
    except Exception as err:  # e3nn raises several error types for malformed strings
        raise ValueError(f"hidden_irreps {hidden_irreps!r} is not a valid irreps string: {err}") from None
    n_s = n_v = 0
    for mul, ir in irreps:
        if ir == e3nn.Irrep("0e"):
            n_s += mul
        elif ir == e3nn.Irrep("1o"):
            n_v += mul
        else:
            raise ValueError(f"hidden_irreps {hidden_irreps!r}: only 0e and 1o irreps are supported, got {ir}")
    if n_s == 0 or n_v == 0:
        raise ValueError(f"hidden_irreps {hidden_irreps!r} needs both 0e and 1o channels")
    return n_s, n_v


def spherical_harmonics(vectors: jax.Array, normalization: str = "integral", eps: float = 1e-12):
    """Real spherical harmonics l ≤ 1 of the direction of ``vectors (..., 3)``: (Y0, Y1).

    Y0 is a python float and Y1 (..., 3) = c1 · r / ‖r‖ with
    "integral": Y0 = 1/√(4π), c1 = √(3/(4π)) (e3nn "integral", as in the SEGNN paper);
    "component": Y0 = 1, c1 = √3. ‖r‖ is sqrt(‖r‖² + eps): still a function of the norm
    alone (so exactly equivariant), finite at r = 0.
    """
    if normalization == "integral":
        c0, c1 = 1.0 / math.sqrt(4.0 * math.pi), math.sqrt(3.0 / (4.0 * math.pi))
    elif normalization == "component":
        c0, c1 = 1.0, SQRT3
    else:
        raise ValueError(f"normalization must be one of {SH_NORMALIZATIONS}, got {normalization!r}")
    inv_norm = jax.lax.rsqrt(jnp.sum(vectors**2, axis=-1, keepdims=True) + eps)
    return c0, c1 * vectors * inv_norm


def flatten_steerable(s: jax.Array, v: jax.Array) -> jax.Array:
    """(s (..., n_s), v (..., 3, n_v)) -> (..., n_s + 3 n_v): every component as a plain number."""
    return jnp.concatenate([s, v.reshape(v.shape[:-2] + (3 * v.shape[-1],))], axis=-1)


def unflatten_steerable(flat: jax.Array, n_s: int, n_v: int) -> Steerable:
    """Inverse of :func:`flatten_steerable`."""
    return flat[..., :n_s], flat[..., n_s:].reshape(flat.shape[:-1] + (3, n_v))


def to_irreps_array(s: jax.Array, v: jax.Array) -> e3nn.IrrepsArray:
    """(s, v) -> e3nn IrrepsArray ``n_s x 0e + n_v x 1o`` (e3nn layout: channel-major, xyz inner)."""
    n_s, n_v = s.shape[-1], v.shape[-1]
    vec = jnp.swapaxes(v, -1, -2).reshape(v.shape[:-2] + (3 * n_v,))
    return e3nn.IrrepsArray(f"{n_s}x0e+{n_v}x1o", jnp.concatenate([s, vec], axis=-1))


def from_irreps_array(x: e3nn.IrrepsArray) -> Steerable:
    """IrrepsArray made of 0e and 1o irreps -> (s (..., n_s), v (..., 3, n_v))."""
    s = x.filter(keep="0e").array
    v = x.filter(keep="1o").array
    return s, jnp.swapaxes(v.reshape(v.shape[:-1] + (v.shape[-1] // 3, 3)), -1, -2)


def sender_index(n: int) -> np.ndarray:
    """Static (n, n−1) table: row i lists the senders j ≠ i in increasing order."""
    return np.array([[j for j in range(n) if j != i] for i in range(n)], dtype=np.int32)


# ------------------------------------------------------------------------------------------
# Steerable layers
# ------------------------------------------------------------------------------------------


def gate(out_s: jax.Array, out_v: jax.Array) -> Steerable:
    """e3nn gate on (S scalars, V vectors): silu(first S − V), sigmoid(last V) · vectors."""
    silu, sigmoid = gate_activations()
    n_s = out_s.shape[-1] - out_v.shape[-1]
    return silu(out_s[..., :n_s]), sigmoid(out_s[..., n_s:])[..., None, :] * out_v


def _check_a0(a0) -> float:
    if not isinstance(a0, (int, float)):
        raise ValueError(f"a0 (the l = 0 attribute) must be a python float constant, got {type(a0).__name__}")
    return float(a0)


def steerable_tensor_product(
    s, v, a0: float, a1, w_ss, w_vs, w_sv, w_vv, bias=None, vv_perturbation=None, scale: float | None = None
) -> Steerable:
    """The steerable linear map of the module docstring.

    Args:
      s (..., n_s), v (..., 3, n_v): input feature; a0 float, a1 (..., 3): attribute.
      w_ss (n_s, S), w_vs (n_v, S), w_sv (n_s, V), w_vv (n_v, V); bias (S,) or None.
      vv_perturbation: None or δ (3, n_v, V): adds Σ_c v_{k c} δ_{k c d} to out_v[..., k, d], a
        component-dependent (rotation-breaking) map folded into the vector→vector product.
      scale: the factor multiplying every weight; None = 1/√n (n = n_s + n_v, the "normal"
        parameterisation), 1.0 for the "fan_in" one (see :func:`weight_scale`).
    Returns: (out_s (..., S), out_v (..., 3, V)).

    The scalar-input paths are one matmul: [s, v·a1] @ [[a0 W_ss, W_sv], [W_vs/√3, 0]] · scale.
    """
    a0 = _check_a0(a0)
    n_s_out, n_v_out = w_ss.shape[-1], w_sv.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(s.shape[-1] + v.shape[-1])
    v_dot_a = jnp.sum(v * a1[..., :, None], axis=-2)  # (..., n_v)
    weight = jnp.concatenate(
        [
            jnp.concatenate([w_ss * (a0 * scale), w_sv * scale], axis=-1),
            jnp.concatenate([w_vs * (scale / SQRT3), jnp.zeros((w_vs.shape[0], n_v_out), w_vs.dtype)], axis=-1),
        ],
        axis=0,
    )
    y = jnp.concatenate([s, v_dot_a], axis=-1) @ weight  # (..., S + V)
    out_s = y[..., :n_s_out]
    if bias is not None:
        out_s = out_s + bias
    w_vv = w_vv * (a0 * scale)
    if vv_perturbation is None:
        vv = v @ w_vv
    else:
        if vv_perturbation.shape != (3,) + w_vv.shape:
            raise ValueError(f"vv_perturbation must have shape {(3,) + w_vv.shape}, got {vv_perturbation.shape}")
        vv = jnp.einsum("...kc,kcd->...kd", v, w_vv + vv_perturbation)
    out_v = a1[..., :, None] * y[..., None, n_s_out:] + vv
    return out_s, out_v


PARAMETERIZATIONS = ("normal", "fan_in")


def check_parameterization(parameterization: str) -> None:
    """Raise ValueError unless ``parameterization`` is one of :data:`PARAMETERIZATIONS`."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")


def weight_scale(parameterization: str, fan_in: int) -> float:
    """The factor a layer multiplies its stored weights by (n = fan_in input channels).

    "normal" (e3nn-jax): stored W ~ N(0, 1), used as W/√n. "fan_in" (torch.nn.Linear style, as
    the reference SEGNN initialises its e3nn-torch products): stored W ~ U(−1/√n, 1/√n), used
    as is. The two give outputs of the same order at init, but Adam moves every stored weight
    by about the learning rate per step, so at equal learning rate the "fan_in" layers change
    √n times faster relative to their size (√130 ≈ 11 for the message layer).
    """
    check_parameterization(parameterization)
    return 1.0 / math.sqrt(fan_in) if parameterization == "normal" else 1.0


def _weights(module: nn.Module, n_s_in: int, n_v_in: int, n_s_out: int, n_v_out: int, parameterization: str):
    """W_ss, W_vs, W_sv, W_vv, the scalar bias (None without scalar outputs) and the factor the
    layer multiplies the weights by (:func:`weight_scale` of n = n_s_in + n_v_in).

    "normal": weights ~ N(0, 1), bias zeros; "fan_in": weights and bias ~ U(−k, k) with
    k = 1/√n.
    """
    fan_in = n_s_in + n_v_in
    scale = weight_scale(parameterization, fan_in)
    if parameterization == "normal":
        init, bias_init = nn.initializers.normal(1.0), nn.initializers.zeros
    else:
        k = 1.0 / math.sqrt(fan_in)

        def init(key, shape, dtype=jnp.float32):
            return jax.random.uniform(key, shape, dtype, -k, k)

        bias_init = init
    if n_s_out > 0:
        w_ss = module.param("w_ss", init, (n_s_in, n_s_out))
        w_vs = module.param("w_vs", init, (n_v_in, n_s_out))
    else:  # no scalar outputs (the output head): no zero-size parameters
        w_ss, w_vs = jnp.zeros((n_s_in, 0)), jnp.zeros((n_v_in, 0))
    w_sv = module.param("w_sv", init, (n_s_in, n_v_out))
    w_vv = module.param("w_vv", init, (n_v_in, n_v_out))
    bias = module.param("bias", bias_init, (n_s_out,)) if n_s_out > 0 else None
    return w_ss, w_vs, w_sv, w_vv, bias, scale


class SteerableLinear(nn.Module):
    """Steerable layer ``(n_s x 0e + n_v x 1o) ⊗ (1x0e + 1x1o) -> scalars x 0e + vectors x 1o``.

    ``gated=True`` computes ``scalars + vectors`` scalars and applies :func:`gate`.
    ``parameterization``: "normal" or "fan_in" (:func:`weight_scale`).
    Call: ``(s (..., n_s), v (..., 3, n_v), a0 float, a1 (..., 3), vv_perturbation=None) -> (s', v')``
    (``vv_perturbation``: see :func:`steerable_tensor_product`).
    """

    scalars: int
    vectors: int
    gated: bool = False
    parameterization: str = "fan_in"

    @nn.compact
    def __call__(self, s: jax.Array, v: jax.Array, a0: float, a1: jax.Array, vv_perturbation=None) -> Steerable:
        n_s_out = self.scalars + (self.vectors if self.gated else 0)
        *weights, scale = _weights(self, s.shape[-1], v.shape[-1], n_s_out, self.vectors, self.parameterization)
        out_s, out_v = steerable_tensor_product(s, v, a0, a1, *weights, vv_perturbation=vv_perturbation, scale=scale)
        return gate(out_s, out_v) if self.gated else (out_s, out_v)


class PairSteerableLinear(nn.Module):
    """Gated steerable layer on every edge (i, j ≠ i) of ``[h_i, h_j, e_ij] ⊗ a_ij``.

    Equals :class:`SteerableLinear` (gated) on the concatenated edge input with scalars
    ``[s_i, s_j, e_ij]`` and vectors ``[v_i, v_j]`` (weight rows in that order), but the
    weight products run on the N nodes and only the attribute products on the edges:

        out_s_ij = A_i + B_j + e_ij W_e + Σ_k a1_ijk (P_ik + Q_jk) + b
        out_v_ijk = a1_ijk (C_i + D_j + e_ij U_e) + T_ik + U_jk

    Call: ``(s (N, n_s), v (N, 3, n_v), edge_scalars (N, N−1, n_e), a0 float,
    a1 (N, N−1, 3))`` with edge (i, k) from sender ``sender_index(N)[i, k]``;
    returns gated ((N, N−1, scalars), (N, N−1, 3, vectors)).
    """

    scalars: int
    vectors: int
    parameterization: str = "fan_in"

    @nn.compact
    def __call__(self, s, v, edge_scalars, a0: float, a1) -> Steerable:
        a0 = _check_a0(a0)
        n, n_s, n_v = s.shape[0], s.shape[-1], v.shape[-1]
        n_e = edge_scalars.shape[-1]
        n_s_out, n_v_out = self.scalars + self.vectors, self.vectors
        width = n_s_out + n_v_out
        w_ss, w_vs, w_sv, w_vv, bias, scale = _weights(
            self, 2 * n_s + n_e, 2 * n_v, n_s_out, n_v_out, self.parameterization
        )
        recv, send = slice(0, n_s), slice(n_s, 2 * n_s)
        node_s = s @ (
            jnp.concatenate([w_ss[recv] * a0, w_sv[recv], w_ss[send] * a0, w_sv[send]], axis=-1) * scale
        )  # (N, 2·width): receiver [A | C], sender [B | D]
        recv, send = slice(0, n_v), slice(n_v, 2 * n_v)
        node_v = v @ (
            jnp.concatenate([w_vs[recv] / SQRT3, w_vv[recv] * a0, w_vs[send] / SQRT3, w_vv[send] * a0], axis=-1)
            * scale
        )  # (N, 3, 2·width): receiver [P | T], sender [Q | U]
        w_edge = jnp.concatenate([w_ss[2 * n_s :] * a0, w_sv[2 * n_s :]], axis=-1) * scale
        senders = sender_index(n)
        lin = node_s[:, None, :width] + node_s[senders, width:] + edge_scalars @ w_edge  # (N, N−1, width)
        vec = node_v[:, None, :, :width] + node_v[senders, :, width:]  # (N, N−1, 3, width)
        out_s = lin[..., :n_s_out] + jnp.sum(a1[..., None] * vec[..., :n_s_out], axis=2) + bias
        out_v = a1[..., None] * lin[..., None, n_s_out:] + vec[..., n_s_out:]
        return gate(out_s, out_v)


# ------------------------------------------------------------------------------------------
# Message passing
# ------------------------------------------------------------------------------------------


class SEGNNLayer(nn.Module):
    """One message-passing layer with residual update and (unless ``project``) two ACE branches.

    Call: ``(h = (s (N, n_s), v (N, 3, n_v)), edge_scalars (N, N−1, 2), edge_a0, edge_a1
    (N, N−1, 3), node_a0, node_a1 (N, 3), project) -> h'``.
    """

    n_s: int
    n_v: int
    spectral_branch: bool = False
    branch_hidden: Sequence[int] = ()
    gamma_init: float = 1.0
    branch_kind: str = "dense"
    parameterization: str = "fan_in"
    branch_rank: int | None = None

    def _breaking(self, name: str) -> SymmetryBreaking:
        if self.branch_kind == "axis":
            branch = AxisMixBranch(component_axis=-2, normalize=self.spectral_branch, name=f"{name}_branch")
        elif self.branch_rank is not None:
            branch = LowRankBranch(self.n_s + 3 * self.n_v, self.branch_rank, self.spectral_branch, name=f"{name}_branch")
        else:
            branch = MLPBranch(
                self.n_s + 3 * self.n_v, hidden=tuple(self.branch_hidden), spectral=self.spectral_branch,
                name=f"{name}_branch",
            )
        return SymmetryBreaking(branch, self.gamma_init, name=name)

    @nn.compact
    def __call__(self, h: Steerable, edge_scalars, edge_a0, edge_a1, node_a0, node_a1, project: bool) -> Steerable:
        if self.branch_kind not in BRANCH_KINDS:
            raise ValueError(f"branch_kind must be one of {BRANCH_KINDS}, got {self.branch_kind!r}")
        if self.branch_kind != "dense" and tuple(self.branch_hidden):
            raise ValueError("branch_hidden applies to dense branches only (branch_kind='dense')")
        if self.branch_rank is not None and (self.branch_kind != "dense" or tuple(self.branch_hidden)):
            raise ValueError("branch_rank applies to affine dense branches only (branch_kind='dense', no branch_hidden)")
        s, v = h
        n = s.shape[0]
        axis = self.branch_kind == "axis"
        folded = self.branch_kind == "in_kernel" and not project
        separate = not project and not folded  # a branch applied to the block output
        per_edge_branch = len(tuple(self.branch_hidden)) > 0

        def folded_breaking(name):  # γ·δ (3, n_v, n_v), folded into the block's last product
            return weight_breaking(name, (3, self.n_v, self.n_v), spectral=self.spectral_branch, gamma_init=self.gamma_init)

        def linear(name, gated):
            return SteerableLinear(self.n_s, self.n_v, gated=gated, parameterization=self.parameterization, name=name)

        pair = PairSteerableLinear(self.n_s, self.n_v, self.parameterization, name="message_1")
        m_s, m_v = pair(s, v, edge_scalars, edge_a0, edge_a1)
        m_s, m_v = linear("message_2", gated=True)(
            m_s, m_v, edge_a0, edge_a1, folded_breaking("message_breaking") if folded else None
        )
        if separate and per_edge_branch:
            flat = flatten_steerable(m_s, m_v)
            m_s, m_v = unflatten_steerable(flat + self._breaking("message_breaking")(flat), self.n_s, self.n_v)
        agg_s, agg_v = m_s.sum(axis=1), m_v.sum(axis=1)
        if separate and axis:  # linear g: Σ_j (m_ij + γ g(m_ij)) = m_i + γ g(m_i)
            agg_v = agg_v + self._breaking("message_breaking")(agg_v)
        elif separate and not per_edge_branch:
            # affine g: Σ_j (m_ij + γ g(m_ij)) = m_i + γ (N−1) g(m_i / (N−1))
            flat = flatten_steerable(agg_s, agg_v)
            flat = flat + summed_affine_branch(self._breaking("message_breaking"), flat, n - 1)
            agg_s, agg_v = unflatten_steerable(flat, self.n_s, self.n_v)

        u_s, u_v = jnp.concatenate([s, agg_s], axis=-1), jnp.concatenate([v, agg_v], axis=-1)
        u_s, u_v = linear("update_1", gated=True)(u_s, u_v, node_a0, node_a1)
        u_s, u_v = linear("update_2", gated=False)(
            u_s, u_v, node_a0, node_a1, folded_breaking("update_breaking") if folded else None
        )
        if separate and axis:
            u_v = u_v + self._breaking("update_breaking")(u_v)
        elif separate:
            flat = flatten_steerable(u_s, u_v)
            u_s, u_v = unflatten_steerable(flat + self._breaking("update_breaking")(flat), self.n_s, self.n_v)
        return s + u_s, v + u_v


class SEGNN(nn.Module):
    """Steerable E(3)-equivariant GNN for ONE N-body graph, with ACE branches.

    Attributes:
      hidden_irreps: hidden feature type, 0e and 1o irreps only (default "32x0e+32x1o").
      num_layers: message-passing layers (2 ACE branches each).
      spectral_branch: spectrally normalised branches (:class:`ace_jax.SpectralDense`).
      gamma_init: initial γ of every branch.
      branch_hidden: hidden widths of each branch MLP (() = one affine layer, the default).
      branch_kind: ``"dense"`` (default: the paper's Linear/MLP on the flattened block output),
        ``"axis"`` (:class:`ace_jax.AxisMixBranch` on the block's vector channels only: a
        learned 3×3 per channel, 9 multiply-adds per channel instead of a 128×128 Dense) or
        ``"in_kernel"`` (per-component vector weights folded into the block's last product).
      branch_rank: with the dense kind, factor each affine branch through rank r
        (:class:`ace_jax.LowRankBranch`, 2·128·r multiply-adds per row instead of 128²);
        None (default) = the full Linear branch.
      parameterization: ``"normal"`` (e3nn-jax: W ~ N(0, 1) used as W/√n) or ``"fan_in"``
        (the reference SEGNN's torch.nn.Linear-style W ~ U(±1/√n) used as is); same function
        class, different Adam dynamics (:func:`weight_scale`).

    Call: ``model.apply(variables, loc (N, 3), vel (N, 3), charges (N, 1), project=False)``
    -> predicted positions (N, 3) = loc + predicted displacement. ``project=True`` is the
    equivariant SEGNN (branches not evaluated; init with it to get the vanilla model).
    """

    hidden_irreps: str = "32x0e+32x1o"
    num_layers: int = 4
    spectral_branch: bool = False
    gamma_init: float = 1.0
    branch_hidden: Sequence[int] = ()
    branch_kind: str = "dense"
    parameterization: str = "fan_in"
    branch_rank: int | None = None

    @nn.compact
    def __call__(self, loc: jax.Array, vel: jax.Array, charges: jax.Array, project: bool = False) -> jax.Array:
        n_s, n_v = parse_hidden_irreps(self.hidden_irreps)
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {self.num_layers}")
        loc, vel, charges = jnp.asarray(loc), jnp.asarray(vel), jnp.asarray(charges)
        if loc.ndim != 2 or loc.shape[-1] != 3 or loc.shape[0] < 2:
            raise ValueError(f"SEGNN expects loc of shape (N, 3) with N ≥ 2 (one graph), got {loc.shape}")
        n = loc.shape[0]
        if vel.shape != (n, 3):
            raise ValueError(f"SEGNN expects vel of shape {(n, 3)}, got {vel.shape}")
        if charges.shape != (n, 1):
            raise ValueError(f"SEGNN expects charges of shape {(n, 1)}, got {charges.shape}")
        dtype = jnp.result_type(loc.dtype, jnp.float32)
        loc, vel, charges = loc.astype(dtype), vel.astype(dtype), charges.astype(dtype)

        # geometry on the (N, N−1) edge grid: edge (i, k) has sender senders[i, k]
        senders = sender_index(n)
        rel = loc[:, None, :] - loc[senders]  # x_i − x_j
        dist = jnp.sqrt(jnp.sum(rel**2, axis=-1))
        edge_a0, edge_a1 = spherical_harmonics(rel)
        _, vel_a1 = spherical_harmonics(vel)
        node_a0 = 1.0  # the l = 0 node attribute is 1, as the reference SEGNN sets it (see module docstring)
        node_a1 = edge_a1.mean(axis=1) + vel_a1
        edge_scalars = jnp.stack([dist, charges * charges[senders, 0]], axis=-1)  # (N, N−1, 2)

        centred = loc - loc.mean(axis=0, keepdims=True)
        speed = jnp.sqrt(jnp.sum(vel**2, axis=-1, keepdims=True))  # (N, 1)
        p = self.parameterization
        h = SteerableLinear(n_s, n_v, parameterization=p, name="embedding")(
            speed, jnp.stack([centred, vel], axis=-1), node_a0, node_a1
        )

        for layer in range(self.num_layers):
            h = SEGNNLayer(
                n_s, n_v, self.spectral_branch, tuple(self.branch_hidden), self.gamma_init, self.branch_kind,
                p, self.branch_rank, name=f"layer_{layer}",
            )(h, edge_scalars, edge_a0, edge_a1, node_a0, node_a1, project)

        s, v = SteerableLinear(n_s, n_v, gated=True, parameterization=p, name="head_1")(*h, node_a0, node_a1)
        _, displacement = SteerableLinear(0, 1, gated=False, parameterization=p, name="head_2")(s, v, node_a0, node_a1)
        return loc + displacement[..., 0]


def parameter_count(params) -> int:
    """Number of scalars in a parameter tree (pass ``variables["params"]``)."""
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))
