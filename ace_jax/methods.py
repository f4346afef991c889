"""Training methods: ACE variants and the paper's baselines, as options of one engine.

========================  ==================================================================
name                      what is trained
========================  ==================================================================
``vanilla``               the equivariant model alone (branches never built, γ ≡ 0)
``ace``                   ACE, equality constraints γ_i = 0 (Alg. 1)
``ace-resilient``         ACE, resilient |γ_i| ≤ u_i, slack cost α/2‖u‖² (Alg. 2)
``ace-inequality``        ACE, |γ_i| ≤ ε
``unconstrained``         γ free, no constraint; random group augmentation of the data
``scheduled``             γ not learned, triangle schedule 0→1→0 + weight·regulariser
``penalty``               γ free, loss ℓ(x) + β ℓ(g·x) with g random (REMUL-style)
========================  ==================================================================
"""

from __future__ import annotations

import dataclasses
import math

from ace_jax.formulations import Equality, Formulation, Inequality, Resilient


@dataclasses.dataclass(frozen=True)
class Method:
    """How γ and the constraints are treated during training.

    Contradictory settings are refused: a constraint formulation needs γ learned, a
    ``gamma_schedule`` needs ``learn_gamma=False``, a model without branches has no γ to
    learn or constrain, and the weights must be finite and ≥ 0.

    Attributes:
      name: a label; the built-in methods (:func:`get_method`) use :data:`METHOD_NAMES`.
      formulation: constraint formulation, or None for unconstrained training.
      has_branches: False trains the projection only (branches never built).
      learn_gamma: whether γ is a primal variable (False: set by ``gamma_schedule``).
      gamma_schedule: ``"triangle"`` (0→1→0 over training) or None.
      augment: train on randomly transformed examples (task must give ``transform``).
      penalty_weight: β of the REMUL-style penalty ℓ(g·x, g·y) (task ``transform``).
      regularizer_weight: weight of the task's ``regularizer`` (scheduled relaxation).
    """

    name: str
    formulation: Formulation | None = None
    has_branches: bool = True
    learn_gamma: bool = True
    gamma_schedule: str | None = None
    augment: bool = False
    penalty_weight: float = 0.0
    regularizer_weight: float = 0.0

    def __post_init__(self):
        for field in ("penalty_weight", "regularizer_weight"):
            value = getattr(self, field)
            if not (math.isfinite(value) and value >= 0):  # NaN would read as "no penalty"
                raise ValueError(f"{self.name}: {field} must be finite and >= 0, got {value}")
        if self.gamma_schedule not in (None, "triangle"):
            raise ValueError(f"unknown gamma_schedule {self.gamma_schedule!r}; known: 'triangle'")
        if self.gamma_schedule is not None and self.learn_gamma:
            raise ValueError(f"{self.name}: a gamma_schedule sets γ, so it needs learn_gamma=False")
        if self.formulation is not None and not self.learn_gamma:
            raise ValueError(f"{self.name}: a constraint formulation needs γ learned (learn_gamma=True); "
                             "with γ fixed the multipliers would drift without acting on anything")
        if not self.has_branches and (self.learn_gamma or self.formulation is not None or self.gamma_schedule):
            raise ValueError(f"{self.name}: without branches (has_branches=False) there is no γ to learn, "
                             "constrain or schedule")

    @property
    def deployed(self) -> str:
        """The model a run of this method deploys, hence the one model selection should look
        at (METHOD.md §4): ``"projection"`` (γ = 0) when training drives γ to 0 — no branches,
        the equality constraint γ = 0, or a schedule ending at 0 — and ``"full"`` otherwise
        (resilient or inequality constraints, which keep partial equivariance, and γ left free)."""
        if not self.has_branches or isinstance(self.formulation, Equality) or self.gamma_schedule is not None:
            return "projection"
        return "full"


METHOD_NAMES = (
    "vanilla",
    "ace",
    "ace-resilient",
    "ace-inequality",
    "unconstrained",
    "scheduled",
    "penalty",
)


# The keyword options of get_method, the methods that read each, and their defaults.
_OPTIONS = {
    "alpha": (("ace-resilient",), 1.0),
    "epsilon": (("ace-inequality",), 0.0),
    "penalty_weight": (("penalty",), 1.0),
    "regularizer_weight": (("scheduled",), 0.01),
}


def get_method(name: str, **options: float) -> Method:
    """The :class:`Method` called ``name`` (see the module table); unknown names raise.

    Options: ``alpha`` (ace-resilient's slack cost, default 1.0), ``epsilon``
    (ace-inequality's bound, 0.0), ``penalty_weight`` (penalty's β, 1.0) and
    ``regularizer_weight`` (scheduled's weight, 0.01). An option the method does not read is
    an error, never silently ignored."""
    if name not in METHOD_NAMES:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHOD_NAMES)}")
    for option in options:
        if option not in _OPTIONS:
            raise ValueError(f"unknown get_method option {option!r}; known: {', '.join(_OPTIONS)}")
        if name not in _OPTIONS[option][0]:
            raise ValueError(f"method {name!r} does not use {option!r} (only {', '.join(_OPTIONS[option][0])})")
    value = {option: options.get(option, default) for option, (_, default) in _OPTIONS.items()}
    alpha, epsilon = value["alpha"], value["epsilon"]
    penalty_weight, regularizer_weight = value["penalty_weight"], value["regularizer_weight"]
    if name == "vanilla":
        return Method(name, has_branches=False, learn_gamma=False)
    if name == "ace":
        return Method(name, formulation=Equality())
    if name == "ace-resilient":
        return Method(name, formulation=Resilient(alpha=alpha))
    if name == "ace-inequality":
        return Method(name, formulation=Inequality(epsilon=epsilon))
    if name == "unconstrained":
        return Method(name, augment=True)
    if name == "scheduled":
        return Method(name, learn_gamma=False, gamma_schedule="triangle", regularizer_weight=regularizer_weight)
    if name == "penalty":
        return Method(name, penalty_weight=penalty_weight)
    raise AssertionError(name)  # every name of METHOD_NAMES is handled above


def triangle_schedule(epoch: int, total_epochs: int) -> float:
    """γ(e) = 2e/E for e ≤ E/2, else 1 − 2(e − E/2)/E (0 → 1 → 0 over E epochs)."""
    if total_epochs <= 0:
        raise ValueError("total_epochs must be > 0")
    if not 0 <= epoch < total_epochs:
        raise ValueError(f"epoch must be in [0, {total_epochs}), got {epoch}")
    e, big_e = float(epoch), float(total_epochs)
    return 2 * e / big_e if e <= big_e / 2 else max(0.0, 1 - 2 * (e - big_e / 2) / big_e)
