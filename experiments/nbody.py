"""The charged N-body study (ACE paper, Table 2 left): SEGNN / EGNN trained with each method.

Task: positions x and velocities v of 5 charged particles at frame 30 → positions at frame 40
(``data.nbody.load_task``). Loss and metric: MSE over particles and coordinates,
``mean_{i,d} (f(x, v, q)_{id} − y_{id})²``. Every run is evaluated as the projection (γ = 0)
and as the full model; test numbers are those of the epoch selected on validation.

Methods (``ace_jax.get_method``) and how the task supports them:

- ``vanilla``, ``ace``, ``ace-resilient``: as in the engine. Model selection on the
  projection, except ``ace-resilient`` (its deployed model is the partially equivariant
  full model; the paper reports both).
- ``unconstrained``: γ free, random O(3) augmentation (``Task.transform``: one Haar-random
  orthogonal Q per example acting on loc, vel and target, ``x ↦ x Qᵀ``; rotation about the
  origin is a symmetry of the E = 0 physics, translations need no augmentation because both
  models are translation-equivariant). With ``--field E`` ≠ 0 the augmentation is O(2) about
  z (:func:`rotate_example_about_z`), the symmetry the field leaves. Selected on the full model.
- ``penalty`` (REMUL-style): ℓ(x) + ℓ(Q·x, Q·y) with the same transform. Selected on full.
- ``scheduled`` (Pertigkiozoglou et al. 2024): γ follows the triangle schedule and
  ``Task.regularizer`` adds, with the method's weight (0.01),

      R = sqrt(mean_n ‖L_A f(x_n)‖²) + sqrt(mean_n ‖f(x_n; γ) − f(x_n; 0)‖²)

  where f(x_n; γ) − f(x_n; 0) is the total contribution of the branches to the output and
  L_A f(x) = d/dt R_t⁻¹ f(R_t x)|_{t=0} = J_f(x)[x Aᵀ, v Aᵀ] + f(x) A is the Lie derivative
  along A = [a]_× (a a random unit axis per example; R_t = exp(tA)), computed exactly with
  one ``jax.jvp``. Since the projection is equivariant, L_A f(·; γ) = L_A (f(·; γ) − f(·; 0)):
  it is the Lie derivative of the branch contribution. Both terms are network-level (they
  need no knowledge of the branches' internal representations, so the same code serves
  SEGNN and EGNN); means over the batch keep them independent of the batch size, and a
  1e-12 inside each square root keeps the gradient finite where the branches vanish
  (γ = 0 at the start and end of the schedule).

CLI::

    python -m experiments.nbody --preset quick|paper --out DIR [--model segnn|egnn]
        [--methods a,b] [--seeds N] [--epochs N] [--train-size N] [--field E]
        [--dual-optimizer ascent|adam] [--dual-proportional K] [--vmap-seeds] [--spectral-branch auto|on|off]
        [--branch-kind dense|axis|in_kernel] [--branch-rank R] [--parameterization fan_in|normal]
        [--branch-init-scale S] [--cache-dir DIR] [--seed S] [--no-progress]

Writes DIR/results.json (schema in :func:`method_summary`, plus per method
``"equivariance_full"``: the full model's relative equivariance error on the test split under
all rotations and under rotations about z, :func:`equivariance_report`), DIR/table.md, DIR/val_curves.png,
DIR/trajectories_<method>.png (γ/λ/u of the first seed) and per run DIR/<method>/seed<k>/
(engine log.jsonl + checkpoint; rerunning the same command into the same DIR resumes finished epochs;
other settings are refused with an error). With
``--vmap-seeds`` (experiments/vmapped_seeds.py) all seeds of a method train in one compiled
program (the seed axis split over the local devices), with the same per-seed log and checkpoint
(a folder trained one way resumes the other way too).

Measured at ``--preset paper`` (SEGNN, fan_in weights, one seed each unless noted, one core of a
2-core CPU). Current model (node attribute Y0 = 1, as the reference SEGNN; models/segnn.py):

| branches | dual update | projection test MSE | full | best epoch | wall |
|---|---|---|---|---|---|
| – | vanilla | 0.00435 | – | 1419 | 57 min |
| – | vanilla, ``--seed 1`` | 0.00455 | – | 1984 | 65 min |
| dense (default) | Adam (``--dual-optimizer adam``, as the public code) | **0.00394** | 0.00419 | 1869 | 76 min |
| dense (default) | Adam, ``--seed 1`` | **0.00403** | 0.00431 | 1924 | 70 min |
| dense (default) | Adam, ``--seed 2`` | **0.00391** | 0.00420 | 1974 | 71 min |
| dense (default) | plain ascent (the preset's dual update) | **0.00395** | 0.00400 | 1739 | 71 min¹ |
| dense (default) | plain ascent, ``--seed 1`` | **0.00391** | 0.00410 | 1764 | 66 min¹ |
| dense (default) | plain ascent, ``--seed 2`` | **0.00384** | 0.00406 | 1824 | 53 min |
| in_kernel | Adam | 0.00470 | 0.00469 | 1994 | 63 min |
| dense | plain ascent + PI (``--dual-proportional 10000``) | 0.00438 | 0.00438 | 1939 | 70 min |

¹ Both plain-ascent runs were paused (SIGSTOP) for about 13 min (seed 0: 17 min) while
benchmarks ran; the wall times include the pauses.

With plain ascent (``--dual-optimizer ascent``, the preset's default; run for seeds 0 and 1
after the Adam runs and for seed 2 later, settings fixed beforehand) the projection reaches
0.00395 / 0.00391 / 0.00384, mean 0.00390 ± 0.00006 (−9 %, −14 %, −14 % against vanilla's
0.00435 / 0.00455 / 0.00447 for the same seeds), level with the Adam dual's 0.00396 ± 0.00006:
neither dual update reaches the paper's 3.8e-3 here (the best single seed, 0.00384, is 1 %
above it). γ does not settle under plain ascent either: it oscillates about zero from
the first epochs on, with a period that shortens from ~120 to ~62 epochs (layer 0's message γ
changes sign at epochs 25, 84, 139, … and every 30–31 epochs after epoch 1500; seed 2 at 25,
83, 138, …, the same clock), |γ| reaches 0.38 over epochs 1500–2000 and ends at −0.25 … −0.37
in every layer; the selected epochs (1739, 1764, 1824) are not at a zero crossing (seed 2:
γ = −0.17 … −0.32 there; full model's SO(3) equivariance error 0.023 at the end).

The other methods at ``--preset paper`` (``--methods M --seed S --seeds 1``, dense branches, plain
ascent where a dual is used, one core each; paper: resilient 3.8e-3, non-equivariant +
augmentation 5.7e-3, scheduled relaxation 4.9e-3):

| method | seed | projection test MSE | full | selected on / best epoch | wall |
|---|---|---|---|---|---|
| ace-resilient (α = 1, spectral branches) | 0 | 0.00445 | **0.00445** | full / 94 | 3270 s |
| ace-resilient | 1 | 0.00434 | **0.00434** | full / 1809 | 3042 s |
| ace-resilient | 2 | 0.00453 | **0.00453** | full / 1769 | 3246 s |
| unconstrained (γ free, O(3) augmentation) | 0 | 0.0319 | **0.00411** | full / 1984 | 3687 s |
| unconstrained | 1 | 0.0147 | **0.00459** | full / 1864 | 3234 s |
| unconstrained | 2 | 0.0262 | **0.00420** | full / 1924 | 3360 s |
| penalty (REMUL, β = 1, O(3) transform) | 0 | 0.0395 | **0.00418** | full / 1999 | 6857 s² |
| scheduled (triangle γ, Lie-derivative penalty 0.01) | 0 | **0.00401** | 0.00399 | projection / 1819 | 16408 s³ |
| scheduled | 1 | **0.00411** | 0.00407 | projection / 1659 | 18539 s³ |

- Resilient ACE ends at vanilla level: 0.00445 / 0.00434 / 0.00453 against vanilla's 0.00435 /
  0.00455 / 0.00447 for the same seeds (+2 %, −5 %, +1 %; mean 0.00444 ± 0.00009 against
  0.00446 ± 0.00010). Seed 2 (run later, settings as seeds 0 and 1) ends with |γ| ≤ 5e-4, λ
  2e-4 … 1.6e-3, u 1.5e-4 … 8e-4 and a full-model SO(3) error of 5e-5. On seed 0, with α = 1,
  the slacks stay small: λ peaks at 0.29 (epoch 23) and u at 0.17 (epoch 58), and |γ| falls
  from 1 to below 2e-4 by epoch 45; from then on |γ| ≤ 0.023, and at the end γ ≈ −4e-5 … −4e-4
  with α u ≈ λ ≈ 1.2e-4 … 1.7e-4 in every branch (the constraint active, the full model equal
  to the projection to 4 digits). Its validation MSE was lowest at epoch 94 (0.00485) and
  ranged 0.0049–0.0067 after epoch 150. Seed 1 goes the same way (|γ| 4e-4 at epoch 40, at
  most 0.018 after epoch 60, final |γ| ≤ 6.3e-4) but was selected at epoch 1809.
- The non-equivariant SEGNN trained with augmentation is not worse than vanilla here (in the
  paper it is: 5.7e-3 against 5.6e-3) but level with it or a little better: 0.00411 / 0.00459 /
  0.00420 (mean 0.00430 ± 0.00025) against vanilla's 0.00435 / 0.00455 / 0.00447 for the same
  seeds (−5 %, +1 %, −6 %). ACE's projection is below it on every seed: plain ascent −4 %, −15 %,
  −9 %; Adam dual −4 %, −12 %, −7 %. Seed 0, run first, had suggested that most of ACE's gain
  was also reached this way; seeds 1 and 2 (run later, settings fixed beforehand) do not bear
  that out. γ is free: at the end the message branches keep the largest γ (layer 0: 0.53–0.78,
  layer 3: 0.14–0.65, layer 1: 0.00–0.40), every other |γ| < 0.07, and the full model's SO(3)
  equivariance error is 2.3–3.0e-3 (seeds 1, 2): augmentation alone keeps it nearly
  equivariant. Its projection (0.015–0.032) is not a model anyone would deploy.
- The REMUL-style penalty (``--methods penalty --seed 0 --seeds 1``, one seed, settings fixed
  before it ran; 3.0–4.6 s per epoch on one core with the other core busy²) ends level with the
  other non-equivariant baseline: full model 0.00418 against vanilla's 0.00435 on seed 0 (−4 %),
  unconstrained + augmentation 0.00411, ACE's projection 0.00395 (plain ascent) / 0.00394 (Adam).
  It was still improving (selected at the last evaluation, epoch 1999). Its γ stay large in the
  first and last message branches (0.81 and 0.71 at the end, layer 0's update 0.31, every other
  |γ| ≤ 0.06) and the full model's relative SO(3) equivariance error is 3.3e-3 (2.7e-3 about z):
  as with augmentation, the invariance term keeps it nearly, not exactly, equivariant.
- ``scheduled`` takes 5.7 s per epoch on one core (ACE 1.4 s; one step 216 ms against ACE's
  47 ms and penalty's 96 ms at batch 100): its penalty differentiates a Jacobian-vector product
  of the whole network and runs the projection once more, and the loss's own forward pass is not
  shared with the one inside the JVP (XLA does not merge them: loss + regulariser cost the sum
  of their separate times). The engine checkpoints every epoch and resumes to the numbers of an
  uninterrupted run, so the paper-preset runs were done in parts (sessions 24–26), repeating the
  same command into the same ``--out``; their settings were fixed before they started.
- ``scheduled``, seeds 0 and 1: projection 0.00401 / 0.00411 (mean 0.00406 ± 0.00007), full
  model 0.00399 / 0.00407; 8 % / 10 % below vanilla's 0.00435 / 0.00455 on the same seeds, and
  2 % / 5 % above ACE's projection with plain ascent (0.00395 / 0.00391; Adam dual 0.00394 /
  0.00403, so +2 % / +2 %), where the paper has scheduled relaxation well behind ACE (4.9e-3
  against 3.8e-3). Seed 0 was selected at epoch 1819, where the triangle gives γ = 0.181 in
  every branch (validation 0.00441 projection / 0.00440 full), seed 1 at epoch 1659 (γ = 0.341;
  validation 0.00438 / 0.00436); the relative SO(3) equivariance error of these selected full
  models is 1.2e-3 / 2.2e-3 (8.4e-4 / 1.7e-3 about z), and both runs end at γ = 0.001. Above
  ACE on both seeds, by about the spread of one method's seeds: two seeds do not settle the order.

² The EGNN penalty run and this project's tests shared the machine for most of the run.
³ Sum of the per-epoch training seconds in the run's log.jsonl (6–10 s per epoch with the other
core busy, 5.7 s alone); the runs' results.json ``wall_s`` (8388 s / 6204 s) counts only the
last part, and each part first spent about 7 minutes compiling. results.json now also records
this sum (``train_s``, :func:`method_summary`; these two runs were made before it existed).

On one NVIDIA H200 (JAX 0.11.2) the same ACE run (seed 0, ``--epochs 10`` as a probe) took
0.30–0.37 s per epoch after 23 s (train step) and 22 s (evaluation) of compilation: about
12 min for 2000 epochs, against 55–62 min on one CPU core.

Earlier model (node Y0 = mean_j Y0 + Y0(v) ≈ 0.56, otherwise the same):

| weights (``--parameterization``) | branches | dual update | projection test MSE | full | best epoch | wall |
|---|---|---|---|---|---|---|
| fan_in | – | vanilla | 0.00470 | – | 1789 | 66 min |
| fan_in | – | vanilla, ``--seed 1`` | 0.00441 | – | 1959 | 64 min |
| fan_in | in_kernel | Adam | 0.0045 | 0.0045 | 1644 | 69 min |
| fan_in | dense | Adam | 0.00442 | 0.00452 | 1954 | 77 min |
| normal | – | vanilla | 0.00609 | – | 824 | 85 min |
| normal | dense | Adam | 0.00500 | 0.00628 | 1859 | ~1.9 h |
| normal | dense | plain ascent + PI (``--dual-proportional 300``) | 0.00632 | 0.00654 | 989 | 113 min |

With the Adam dual γ oscillates (amplitude ~0.3–0.45, period ~80 epochs) to the end and the
epoch chosen on the projection need not be a zero crossing: the current dense run was selected
at epoch 1869 with every γ ≈ +0.2…+0.3, where the projection (validation 0.00416) was better
than the full model (0.00445) — the branches act as a regulariser of the equivariant part
rather than as capacity it keeps. With the strong PI term γ falls from 1 to 0 within ~60
epochs (Adam moves it ~lr per step) and stays at |γ| < 0.07: the run is then a vanilla run, and
it ends at vanilla level (final |γ| < 2e-3). With plain ascent alone (normal weights) γ also
oscillates, amplitude 0.3–0.5; PI with κ = 300 damped it to 0 by epoch ~250. The paper's
3.8e-3 is approached but not reached: over seeds 0, 1 and 2, dense ACE with the Adam dual gives
0.00396 ± 0.00006 against vanilla's 0.00446 ± 0.00010 (0.00435 / 0.00455 / 0.00447; 11 % lower).
Rank-16 branches (``--branch-rank 16``, seed 0) give 0.00415, between the two.
In-kernel branches (``--branch-kind in_kernel``, the cheap folded kind) give no gain with the
current model: validation stayed above the dense run's at every point (best 0.00464 against
0.00416), and test ended above vanilla.

EGNN at ``--preset paper`` (``--model egnn --dual-optimizer adam``, one core per run; about
0.7–0.8 s per epoch for either method):

| method | projection test MSE, seeds 0 / 1 / 2 | mean ± sample std | full model | best epochs | wall |
|---|---|---|---|---|---|
| vanilla | 0.00697 / 0.00733 / 0.00707 | 0.00712 ± 0.00019 | – | 219, 1914, 1834 | 4424 s (3 seeds) |
| ACE, Adam dual (branch init scale 0.01, the default) | 0.00692 / 0.00693 / 0.00679 | **0.00688 ± 0.00008** | 0.00692 / 0.00697 / 0.00685 | 1969, 1999, 209 | 3312 s (seeds 0, 1) + 1703 s (seed 2) |
| ACE, plain ascent (the preset's dual; scale 0.01) | 0.00662 / 0.00727 / 0.00673 | **0.00688 ± 0.00035** | 0.00660 / 0.00729 / 0.00673 | 1984, 1884, 1974 | 1592–1643 s per seed |
| unconstrained (γ free, O(3) augmentation; selected on the full model), seeds 0 / 1 / 2 | 0.00753 / 0.00853 / 0.0336 | – | **0.00696 / 0.00726 / 0.00684** (0.00702 ± 0.00022) | 1899, 1929, 154 | 1609 / 1610 / 1938 s |
| ACE, Adam dual, ``--branch-init-scale 1`` (LeCun, the earlier default) | 0.00766 / 0.00638 / 0.0903 | 0.0348 ± 0.048 | 0.00753 / 0.00635 / 0.0532 | 1809, 1974, 474 | 5011 s (3 seeds) |
| penalty (REMUL, β = 1, O(3) transform; selected on the full model), seed 0 only | 0.00861 | – | 0.00714 | 1964 | 4643 s³ |

³ One core, with the other core running the SEGNN penalty run and this project's tests for part
of the time (1.7–2.7 s per epoch, 2.3 s on average).

The penalty run (``--model egnn --methods penalty --seed 0 --seeds 1``, settings fixed before it
ran) ends at vanilla level: full model 0.00714 against vanilla's 0.00697 on seed 0 (+2.4 %;
unconstrained with augmentation 0.00696, ACE 0.00692 Adam / 0.00662 ascent). Its γ stay away
from zero (final |γ| up to 0.40, layer 3's coordinate branch) and the full model's relative
SO(3) equivariance error is 2.5e-3 (1.8e-3 about z): the invariance penalty alone keeps it
nearly equivariant, as augmentation does.

Vanilla matches the paper's EGNN (7.1e-3); the paper reports no EGNN + ACE number. The
non-equivariant EGNN trained with augmentation (seeds 0 and 1, and seed 2 in a later session,
settings fixed before the runs) ends at vanilla level (−0.1 %, −1.0 % and −3.3 % against vanilla's
seeds 0, 1 and 2), as the SEGNN above does over three seeds (−5 %, +1 %, −6 %); seed 2 was
selected at epoch 154 (full-model SO(3) error 0.017, final |γ| ≤ 0.49). With the
default branch init ACE is below vanilla on every seed with either dual update: Adam −0.8 %,
−5.4 %, −3.9 % (mean −3.4 %, final |γ| ≤ 0.23); plain ascent −5.0 %, −0.8 %, −4.8 % (mean −3.5 %,
final |γ| ≤ 0.36). The branch init decides whether ACE trains at all. With LeCun
weights in the branches' last layer (scale 1) the branches, which see raw coordinates, start as
large as the equivariant path: the untrained full model's training MSE is 3–16 against 0.2–0.6
for its projection (init seeds 0–9). Seed 2's first epoch then averaged 474, after which γ and λ
swung with growing amplitude (layer 1's coordinate γ ended at −3.2) and the projection never
recovered (best validation 0.089). Plain ascent (``--dual-optimizer ascent``) swung the same way
on that seed and blew up by epoch ~650 (training loss ~1e29; a non-finite gradient stopped it at
epoch 1882 with the engine's error, last good checkpoint kept), and the PI-damped ascent
(``--dual-proportional 1000``) blew up on seeds 0 and 2. With scale 0.01 (a tenth of LeCun's
standard deviation) the untrained full model starts within 0.0–0.2 of its projection's MSE, the
first epoch averages 0.12–0.17, and all three seeds train. The scale was chosen once before the
runs (not tuned over values).

Broken symmetry (``--field 0.3``: a uniform field along z, F_i += q_i E ẑ, so the physics keeps
only the rotations about z; data.nbody). Settings fixed before the runs: ``--preset paper
--epochs 300 --methods vanilla,ace,ace-resilient --field F --seed S --seeds 1`` for F = 0 and
0.3, seeds 0, 1, 2 (SEGNN, dense branches, plain ascent, spectral branches for the resilient
method only; 400–520 s per run on one core). E = 0.3 was chosen from the physics alone: the
field moves a particle by q E t²/2 = 0.15 along z between frames 30 and 40, about twice
vanilla's RMS error per coordinate. 300 epochs is a seventh of the paper's budget; ACE's
equality γ are still at 0.2–0.35 when it ends, so its projection is not converged. Test MSE
(mean ± sample std over the 3 seeds; per seed in brackets) and the full model's relative
equivariance error (``results.json`` ``"equivariance_full"``, :func:`equivariance_report`; 500
test graphs, 8 rotations) under all rotations and under rotations about z:

| E | method | projection | full model | equivariance error, SO(3) | about z |
|---|---|---|---|---|---|
| 0 | vanilla | 0.00483 ± 0.00030 [0.00464 / 0.00517 / 0.00467] | = projection | 2.6–2.8e-7 | 2.0–2.1e-7 |
| 0 | ace | 0.00496 ± 0.00010 | 0.00542 ± 0.00030 | 1.6–4.5e-2 | 1.6–3.7e-2 |
| 0 | ace-resilient | 0.00477 ± 0.00029 | **0.00477 ± 0.00029** [0.00445 / 0.00502 / 0.00485] | 4e-6–3.5e-4 | 4e-6–2.9e-4 |
| 0.3 | vanilla | 0.00731 ± 0.00032 [0.00700 / 0.00764 / 0.00730] | = projection | 2.2–2.5e-7 | 1.7–1.9e-7 |
| 0.3 | ace | 0.00752 ± 0.00038 | 0.00652 ± 0.00026 | 6.1–9.1e-2 | 1.0–2.2e-2 |
| 0.3 | ace-resilient | 0.00771 ± 0.00016 | **0.00618 ± 0.00011** [0.00607 / 0.00630 / 0.00618] | 9.2–9.8e-2 | 6.3–9.0e-3 |

- Without a field the resilient model ends equivariant (error ≤ 3.5e-4; |γ| ≤ 0.002 at the
  selected epochs 94–144) and at vanilla's level (−1.2 %).
- With the field its full model is 15 % better than vanilla on every seed (−13 %, −18 %,
  −15 %). It breaks the symmetries the data break and keeps the one the data keep: its error
  under rotations about z is 10–15 times smaller than under general rotations. Its γ are
  small: at the selected epochs (144–169) the largest |γ| is 0.026–0.044, about its slack u
  (the constraint |γ| ≤ u active), and at the end |γ| ≤ 0.008. Yet its projection is worse
  than vanilla (0.00771), so the branches carry the field. (Its validation MSE rises after
  the selected epoch, as vanilla's does after its best epoch, 109–179 over both E.)
- Equality ACE's full model also prefers the z axis (4–6× less error about z), but its
  deployed projection does not gain (0.00752 against 0.00731): the constraint removes exactly
  what the field needs.

Two more field strengths for SEGNN (``--methods vanilla,ace-resilient --field F``, F = 0.1 and
1.0, seeds 0–2, otherwise the command above; fixed before the runs; 924–1010 s per run on one
core). With E = 0 and 0.3 from the table, resilient ACE's full model against vanilla:

| E | vanilla | ace-resilient, full model | per seed | projection | SO(3) / about-z error ratio |
|---|---|---|---|---|---|
| 0 | 0.00483 ± 0.00030 | 0.00477 ± 0.00029 | −4 %, −3 %, +4 % | 0.00477 | ≈ 1 (equivariant) |
| 0.1 | 0.00624 ± 0.00003 | 0.00599 ± 0.00005 [0.00596 / 0.00596 / 0.00604] | −5 %, −5 %, −3 % | 0.00600 ± 0.00004 | 1.4–3.6 |
| 0.3 | 0.00731 ± 0.00032 | 0.00618 ± 0.00011 | −13 %, −18 %, −15 % | 0.00771 | 10–15 |
| 1.0 | 0.00390 ± 0.00002 | 0.00276 ± 0.00015 [0.00261 / 0.00289 / 0.00279] | −33 %, −26 %, −28 % | 0.01097 ± 0.00106 | 51–68 |

The gain grows with the field: −1 %, −4 %, −15 %, −29 % (9 of 9 runs better with a field). At
E = 0.1 the model stays nearly equivariant (max |γ| 0.000–0.009 at the selected epochs, SO(3)
error 1.1e-4–5.3e-3) and its projection gains as much as its full model; at E = 1.0 it breaks
SO(3) (error 7.7–9.9e-2) while its error about z stays at 1.3–1.5e-3, and its projection alone
is far worse than vanilla (0.01097), so the branches carry the field. EGNN (below) gains at
every strength too, but not monotonically (−7 %, −13 %, −10 %).

The same study with EGNN (``--model egnn``, otherwise the same command; settings fixed
before its runs; 233–290 s per run on one core):

| E | method | projection | full model | equivariance error, SO(3) | about z |
|---|---|---|---|---|---|
| 0 | vanilla | 0.00738 ± 0.00036 [0.00697 / 0.00755 / 0.00763] | = projection | 3.9–4.0e-7 | 3.2e-7 |
| 0 | ace | 0.00755 ± 0.00035 | 0.00733 ± 0.00038 | 1.1e-2 (seeds 0, 1) | 0.7–0.9e-2 |
| 0 | ace-resilient | [0.00580 / 0.00743 / diverged] | [0.00581 / 0.00744 / diverged] | 1.1–1.5e-3 | 0.9–1.2e-3 |
| 0.3 | vanilla | 0.00935 ± 0.00035 [0.00945 / 0.00896 / 0.00964] | = projection | 3.2–3.4e-7 | 2.5–2.6e-7 |
| 0.3 | ace | 0.01006 ± 0.00061 | 0.00984 ± 0.00028 | 3.1–4.8e-2 | 0.6–0.8e-2 |
| 0.3 | ace-resilient | 0.01139 ± 0.00083 | **0.00708 ± 0.00031** [0.00673 / 0.00718 / 0.00733] | 1.1–1.6e-1 | 0.7–1.4e-2 |

(Seed 2 at E = 0 is read from the run's log, three digits.) These resilient runs are from
before the spectral-start fix below; with the field they were 24 % better than vanilla (−29 %,
−20 %, −24 % per seed), with 9–23× less error about z than under all rotations. At E = 0 seed 2
diverged: training loss 16 in the first epoch (0.5–1.7 on the other five), γ still 0.98 at
epoch 50 (0.000 on the others), and at epoch 298 the loss jumped to 2e6; the engine stopped at
the non-finite gradient of epoch 299 and kept the epoch-298 checkpoint. The cause of the bad
start was a defect: spectrally normalised branches divided every kernel by σ_max, so EGNN's
small branch init (``branch_init_scale`` 0.01) had no effect on the resilient method (the
untrained full model's MSE on 200 training graphs, init key 2, was 5.17 at init scale 0.01 and
1.0 alike; projection 0.53).

Fixed (``ace_jax.MLPBranch``: a spectral branch given an output init uses W / max(1, σ_max) in
its last layer, still 1-Lipschitz): the same measurement now gives 0.43 at scale 0.01 against
5.17 at 1.0. Every resilient EGNN field run was repeated with the fix (``--methods ace-resilient``,
otherwise the command above, same seeds; 277–297 s per run on one core), and the field was run
at two more strengths, E = 0.1 and 1.0 (``--methods vanilla,ace-resilient``); all settings were
fixed before the runs. Full model of resilient ACE against vanilla (MSE is not comparable
across E: each E is its own data set):

| E | vanilla | ace-resilient, full model | per seed | equivariance error (full), SO(3) | about z |
|---|---|---|---|---|---|
| 0 | 0.00738 ± 0.00036 | 0.00734 ± 0.00032 [0.00772 / 0.00714 / 0.00717] | +11 %, −5 %, −6 % | 1.7e-4–9.8e-4 | 1.7e-4–8.2e-4 |
| 0.1 | 0.00869 ± 0.00012 | 0.00810 ± 0.00039 [0.00816 / 0.00846 / 0.00769] | −6 %, −1 %, −13 % | 3.2–4.4e-2 | 3.1–4.3e-3 |
| 0.3 | 0.00935 ± 0.00035 | 0.00816 ± 0.00021 [0.00799 / 0.00839 / 0.00808] | −15 %, −6 %, −16 % | 4.8–7.6e-2 | 3.6–4.5e-3 |
| 1.0 | 0.00482 ± 0.00008 | 0.00432 ± 0.00002 [0.00433 / 0.00433 / 0.00430] | −10 %, −11 %, −9 % | 2.5–3.4e-2 | 0.9–1.0e-3 |

- All six E ∈ {0, 0.3} runs now train: first-epoch loss 0.11–0.22 (before: 16 on the seed
  that diverged, 0.5–1.7 on the others). In every run max |γ| ≤ 3e-4 at epoch 50; with a field
  it grows back (0.01–0.07 at epoch 300), without one it stays ≤ 0.003: resilient ACE ends
  equivariant there and at vanilla's level (−0.6 %).
- With a field it beats vanilla on 9 of 9 runs, and the error about z is 8–35× smaller than
  under all rotations; that ratio grows with E (7.6–11×, 13–17×, 27–35×). The relative SO(3)
  error does not grow with E beyond 0.3: it is relative to the displacement, which the field
  enlarges.
- At E = 0.3 the gain is smaller than before the fix (−13 % against −24 %). The larger start
  is not a reliable way back: the fixed code with ``--branch-init-scale 1.0`` (LeCun last
  layer, so σ_max > 1 and the branch starts at the old size) gave 0.00726 / 0.00557 / 0.00763
  at E = 0 and 0.00816 / 0.00816 / **0.474** at E = 0.3, where seed 2 started at loss 302, its
  slack grew to meet γ ≈ 1 (u ≈ 1 from epoch 150 on) and the model never became near-equivariant.
  So 0.01 stays the default; this is 3 seeds at 300 epochs (a seventh of the paper's budget).

Quick preset (``--preset quick``, plain ascent, smoke size; 88 s on both cores, of which about
12 s are the equivariance reports): vanilla 0.00682, ACE projection 0.00836 (full 0.0104) with
the current model and default dense branches (an older record of this preset, from an earlier
state of the code, read 0.00798 vs 0.00933; the earlier model gave 0.00858 vs 0.0113
(in-kernel) / 0.0124 (dense)).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ace_jax
from ace_jax import Task, TrainConfig, random_orthogonal, random_rotation, relative_equivariance_error, rotate_points
from ace_jax import rotation_about_axis
from experiments.common import SEGNN_PARAMETERIZATIONS, add_study_args, fmt, markdown_table, parse_list
from experiments.common import Diverged, diverged_list, fit_seed, report_diverged, summarize, write_json
from experiments.plotting import plot_curves, plot_trajectories
from experiments.vmapped_seeds import fit_seeds_vmapped

METHODS = ("vanilla", "ace", "ace-resilient", "unconstrained", "scheduled", "penalty")
MODELS = ("segnn", "egnn")
# SEGNN's ACE branches unless --branch-kind says otherwise: the paper's Dense branch on each
# block's flattened output. At paper settings it is the branch with which ACE beats vanilla
# (module docstring); the in-kernel branch is cheaper (1.08x the vanilla step against
# 1.22-1.29x, quiet 2-core CPU) but gave no gain over vanilla.
DEFAULT_SEGNN_BRANCH = "dense"
METRIC = "mse"
# Which model each method deploys (selection and the table's headline column): Method.deployed.
SELECT_ON = {name: ace_jax.get_method(name).deployed for name in METHODS}
METHOD_LABELS = {
    "vanilla": "{model}",
    "ace": "{model} + ACE",
    "ace-resilient": "{model} + ACE (resilient)",
    "unconstrained": "{model} non-equivariant + augmentation",
    "scheduled": "{model} + scheduled relaxation",
    "penalty": "{model} + penalty (REMUL)",
}

PRESETS = {
    # Smoke size: a few minutes on a laptop CPU for vanilla + ace (800 steps each).
    # ACE needs on the order of 1/learning_rate steps to bring γ from 1 to 0 (Adam moves γ
    # by ~lr per step), hence the larger rates and smaller batches than the paper's.
    "quick": dict(
        train_size=500, val_size=200, test_size=200, epochs=80, batch_size=50,
        learning_rate=3e-3, dual_learning_rate=3e-3, eval_every=2, seeds=1, methods=("vanilla", "ace"),
    ),
    # The paper's protocol (SEGNN N-body): 3000 / 2000 / 2000, batch 100, Adam 9e-4, dual 8e-4.
    "paper": dict(
        train_size=3000, val_size=2000, test_size=2000, epochs=2000, batch_size=100,
        learning_rate=9e-4, dual_learning_rate=8e-4, eval_every=5, seeds=3, methods=METHODS,
    ),
}


# --------------------------------------------------------------------------- model and task


def resolve_branch_kind(model_name: str, branch_kind: str | None) -> str:
    """The branch kind ``make_model`` builds: SEGNN's ``branch_kind`` (None = the default);
    EGNN has dense Linear branches only, so anything else there is an error."""
    if model_name == "egnn":
        if branch_kind not in (None, "dense"):
            raise ValueError("--branch-kind applies to SEGNN; EGNN's branches are small Linear layers already")
        return "dense"
    return DEFAULT_SEGNN_BRANCH if branch_kind is None else branch_kind


def make_model(
    model_name: str, spectral_branch: bool = False, gamma_init: float = 1.0, branch_kind: str | None = None,
    parameterization: str = "fan_in", branch_rank: int | None = None, branch_init_scale: float | None = None,
):
    """The paper's N-body model: ``"segnn"`` (models/segnn.py) or ``"egnn"`` (models/egnn.py).

    ``branch_kind`` (SEGNN only): ``"dense"`` Linear branches on the flattened features (the
    paper's), ``"axis"`` per-channel 3×3 mixing of the vector features (much cheaper) or
    ``"in_kernel"`` (a per-axis vector→vector weight folded into each block's last product;
    None = :data:`DEFAULT_SEGNN_BRANCH`; see :func:`resolve_branch_kind`). ``branch_rank`` (SEGNN,
    dense kind): factor each Linear branch through rank r (:class:`ace_jax.LowRankBranch`).
    ``parameterization`` (SEGNN only): ``"normal"`` or ``"fan_in"`` (models.segnn.weight_scale).
    ``branch_init_scale`` (EGNN only): variance of the branches' last kernel relative to LeCun
    normal (None = the model's default; models.egnn.EGNN).
    """
    branch_kind = resolve_branch_kind(model_name, branch_kind)
    if branch_rank is not None and (model_name != "segnn" or branch_kind != "dense" or branch_rank < 1):
        raise ValueError(f"--branch-rank must be >= 1 and applies to SEGNN's dense branches only, got {branch_rank} "
                         f"with model {model_name!r} and branch kind {branch_kind!r}")
    if branch_init_scale is not None and model_name != "egnn":
        raise ValueError("--branch-init-scale applies to EGNN only")
    if model_name == "egnn" and parameterization != "fan_in":
        raise ValueError("--parameterization normal applies to SEGNN only (EGNN's layers use the fan-in init)")
    if model_name == "egnn":
        from models.egnn import EGNN

        return EGNN(hidden=64, num_layers=4, spectral_branch=spectral_branch, gamma_init=gamma_init,
                    branch_init_scale=egnn_branch_init_scale(model_name, branch_init_scale))
    if model_name == "segnn":
        try:
            from models.segnn import SEGNN
        except ImportError as err:
            raise ValueError(f"model 'segnn' is not available ({err}); use --model egnn") from err
        return SEGNN(num_layers=4, spectral_branch=spectral_branch, gamma_init=gamma_init, branch_kind=branch_kind,
                     parameterization=parameterization, branch_rank=branch_rank)
    raise ValueError(f"unknown model {model_name!r}; choose from {', '.join(MODELS)}")


def egnn_branch_init_scale(model_name: str, branch_init_scale: float | None) -> float | None:
    """The branch init scale a run of ``model_name`` uses (EGNN's default for None; None for SEGNN)."""
    if model_name != "egnn":
        return None
    from models.egnn import EGNN

    return EGNN.branch_init_scale if branch_init_scale is None else branch_init_scale


def rotate_example(rng: jax.Array, example: dict) -> dict:
    """A Haar-random Q ∈ O(3) acting on loc, vel and target (``x ↦ x Qᵀ``); charges unchanged."""
    return _act_on_example(random_orthogonal(rng), example)


def rotate_example_about_z(rng: jax.Array, example: dict) -> dict:
    """A Haar-random Q ∈ O(2) about z — a uniform rotation about z, followed with probability ½
    by the reflection y ↦ −y — acting on loc, vel and target: the symmetries that a uniform
    field along z leaves the physics (``--field``), where a general rotation would turn the
    field's push into another direction and make the augmented pair physically wrong."""
    k_angle, k_flip = jax.random.split(rng)
    rotation = rotation_about_axis(jax.random.uniform(k_angle, maxval=2 * jnp.pi), axis=2)
    flip = jnp.where(jax.random.bernoulli(k_flip), -1.0, 1.0)
    return _act_on_example(rotation @ jnp.diag(jnp.stack([1.0, flip, 1.0])), example)


def _act_on_example(q: jax.Array, example: dict) -> dict:
    out = dict(example)
    for key in ("loc", "vel", "target"):
        out[key] = rotate_points(example[key], q)
    return out


def random_generator(rng: jax.Array) -> jax.Array:
    """A = [a]_× for a uniformly random unit axis a: the generator of rotations about a."""
    a = jax.random.normal(rng, (3,))
    a = a / jnp.linalg.norm(a)
    zero = jnp.zeros(())
    return jnp.array([[zero, -a[2], a[1]], [a[2], zero, -a[0]], [-a[1], a[0], zero]])


def make_lie_regularizer(predict):
    """Scheduled relaxation's penalty R(variables, batch, rng) (module doc); ``predict(v, ex, project)``."""

    def per_example(variables, example, rng):
        gen = random_generator(rng)

        def full(loc, vel):
            return predict(variables, {**example, "loc": loc, "vel": vel}, False)

        out, tangent = jax.jvp(full, (example["loc"], example["vel"]), (example["loc"] @ gen.T, example["vel"] @ gen.T))
        lie = tangent + out @ gen  # d/dt R_t^{-1} f(R_t x) at t = 0 (row vectors: R^{-1} y = y R)
        contribution = out - predict(variables, example, True)
        return jnp.sum(lie**2), jnp.sum(contribution**2)

    def regularizer(variables, batch, rng):
        size = batch["loc"].shape[0]
        lie_sq, branch_sq = jax.vmap(per_example, in_axes=(None, 0, 0))(variables, batch, jax.random.split(rng, size))
        return jnp.sqrt(jnp.mean(lie_sq) + 1e-12) + jnp.sqrt(jnp.mean(branch_sq) + 1e-12)

    return regularizer


def make_predict(model):
    """``predict(variables, example, project) -> positions (5, 3)`` of an N-body model, one graph."""

    def predict(variables, ex, project):
        return model.apply(variables, ex["loc"], ex["vel"], ex["charges"], project=project)

    return predict


EQUIVARIANCE_EXAMPLES = 500
EQUIVARIANCE_ROTATIONS = 8


@partial(jax.jit, static_argnums=(0, 3))
def _displacements(predict, variables, inputs: dict, project: bool) -> jax.Array:
    """f(x) − x for a batch of graphs; one program per (predict, project), reused across seeds."""
    return jax.vmap(lambda ex: predict(variables, ex, project))(inputs) - inputs["loc"]


def equivariance_report(predict, variables, data: dict, key: jax.Array, num_examples: int = EQUIVARIANCE_EXAMPLES,
                        num_rotations: int = EQUIVARIANCE_ROTATIONS) -> dict:
    """How equivariant the FULL model (γ as trained) is, under all rotations and under rotations about z.

    With d(x) = f(x) − x the predicted displacement of each particle, on the first
    ``num_examples`` graphs x_n of ``data``,

        e(G) = mean_R mean_{n,i} ‖d(R·x_n)_i − R d(x_n)_i‖ / mean_{n,i} ‖d(x_n)_i‖

    (:func:`ace_jax.relative_equivariance_error`), R·x rotating loc and vel about the origin
    (charges unchanged), for ``num_rotations`` rotations R drawn Haar in SO(3) (``"so3"``) and
    uniformly among the rotations about z (``"z"``), both from ``key``. With a field E ẑ
    (``--field``) the physics is symmetric under the rotations about z only, so a model that
    breaks no more symmetry than the data has e(z) ≪ e(so3); at E = 0 neither needs breaking.
    Both are ~1e-7 (float32 round-off) for a model without branches (``variables`` without a
    ``"gamma"`` collection, evaluated with ``project=True``) or at γ = 0.
    Returns ``{"so3": e, "z": e}``.
    """
    if num_examples < 1 or num_rotations < 1:
        raise ValueError(f"num_examples and num_rotations must be >= 1, got {num_examples}, {num_rotations}")
    inputs = {k: jnp.asarray(data[k][:num_examples]) for k in ("loc", "vel", "charges")}
    project = not jax.tree.leaves(variables.get("gamma", {}))  # no branches: the model is its projection

    def f(x):
        return _displacements(predict, variables, x, project)

    def act_in(rotation, x):
        return {**x, "loc": rotate_points(x["loc"], rotation), "vel": rotate_points(x["vel"], rotation)}

    def act_out(rotation, y):
        return rotate_points(y, rotation)

    key_all, key_z = jax.random.split(key)
    rotations = {
        "so3": random_rotation(key_all, (num_rotations,)),
        "z": rotation_about_axis(jax.random.uniform(key_z, (num_rotations,), maxval=2 * np.pi), axis=2),
    }
    return {name: float(relative_equivariance_error(f, inputs, list(group), act_in, act_out))
            for name, group in rotations.items()}


def make_task(model, example: dict, field: float = 0.0) -> Task:
    """The engine's Task for an N-body model; ``example`` (one graph) fixes the input shapes.
    ``field`` (the data set's E along z) picks the augmentation of ``unconstrained`` and
    ``penalty``: all of O(3) without a field, O(2) about z with one."""
    for key in ("loc", "vel", "charges", "target"):
        if key not in example:
            raise ValueError(f"N-body example lacks {key!r}; has {sorted(example)}")

    predict = make_predict(model)

    # Jitted (one program per has_branches): eager init of a 4-layer model is slow on CPU.
    inits = {has: jax.jit(partial(model.init, project=not has)) for has in (True, False)}

    def init(rng, has_branches):
        return inits[bool(has_branches)](rng, example["loc"], example["vel"], example["charges"])

    def loss(variables, ex, rng, project):
        del rng
        return jnp.mean((predict(variables, ex, project) - ex["target"]) ** 2)

    def metric(variables, ex, project):
        return {METRIC: loss(variables, ex, None, project)}

    transform = rotate_example if field == 0 else rotate_example_about_z
    return Task(init=init, loss=loss, metric=metric, transform=transform,
                regularizer=make_lie_regularizer(predict))


def benchmark_case(model_name: str, batch: int, seed: int = 0, branch_kind: str | None = None,
                   branch_rank: int | None = None):
    """``(Task, batch_dict)`` for timing one train step: the N-body task of ``model_name`` (with
    SEGNN branches of ``branch_kind`` and ``branch_rank``) and ``batch`` random but plausible graphs (no data
    generation): positions ~ N(0, 1.5²), velocities of speed ~0.5–1, charges ±1, target =
    loc + vel (all float32, shapes loc/vel/target (batch, 5, 3), charges (batch, 5, 1))."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    rng = np.random.default_rng(seed)
    loc = 1.5 * rng.standard_normal((batch, 5, 3))
    vel = rng.standard_normal((batch, 5, 3))
    vel *= rng.uniform(0.5, 1.0, (batch, 5, 1)) / np.linalg.norm(vel, axis=-1, keepdims=True)
    charges = rng.choice([-1.0, 1.0], (batch, 5, 1))
    data = {"loc": loc, "vel": vel, "charges": charges, "target": loc + vel}
    data = {k: v.astype(np.float32) for k, v in data.items()}
    task = make_task(make_model(model_name, branch_kind=branch_kind, branch_rank=branch_rank),
                     {k: v[0] for k, v in data.items()})
    return task, data


# --------------------------------------------------------------------------- study


def load_splits(train_size: int, val_size: int, test_size: int, field: float, cache_dir=None) -> dict:
    """train / val / test dicts from ``data.nbody.load_task`` (first call generates the set)."""
    from data.nbody import load_task

    return {
        "train": load_task("train", num=train_size, field=field, cache_dir=cache_dir),
        "val": load_task("valid", num=val_size, field=field, cache_dir=cache_dir),
        "test": load_task("test", num=test_size, field=field, cache_dir=cache_dir),
    }


def method_summary(results, seeds, shared_program: bool = False) -> dict:
    """One method's entry of results.json from its per-seed ``FitResult``s; a :class:`Diverged`
    seed enters the summaries as NaN (mean and std null) and its lists as NaN / None.

    ``train_s_per_seed`` is each seed's ``FitResult.train_seconds``, the sum of the per-epoch
    ``seconds`` over every epoch of a run resumed in parts (``wall_s``, set by :func:`run_study`,
    times only the last call). ``train_s`` adds them over seeds; with ``shared_program`` (``--vmap-seeds``:
    every seed's record holds the time of the one pass all seeds share) it is the largest instead.
    A diverged seed keeps no history and is not counted (None).
    """

    def per_seed(read, missing=float("nan")):
        return [missing if isinstance(r, Diverged) else read(r) for r in results]

    projection = per_seed(lambda r: float(r.test["projection"][METRIC]))
    full = per_seed(lambda r: float(r.test["full"][METRIC]))
    train_s = per_seed(lambda r: r.train_seconds, None)
    counted = [t for t in train_s if t is not None]
    return {
        "test_mse_projection": summarize(projection),
        "test_mse_full": summarize(full),
        "test_mse_projection_per_seed": projection,
        "test_mse_full_per_seed": full,
        "best_epoch": per_seed(lambda r: int(r.best_epoch), None),
        "seeds": [int(s) for s in seeds],
        "final_gammas": per_seed(lambda r: r.history[-1]["gamma"], None),
        "final_multipliers": per_seed(lambda r: r.history[-1]["multiplier"], None),
        "final_slacks": per_seed(lambda r: r.history[-1]["slack"], None),
        "diverged": diverged_list(results),
        "train_s_per_seed": train_s,
        "train_s": (max(counted) if shared_program else sum(counted)) if counted else None,
    }


def render_table(model_name: str, summaries: dict, config: dict) -> str:
    """Markdown table in the style of the paper's Table 2 (left): test MSE per method."""
    label = model_name.upper()
    rows = []
    for name, entry in summaries.items():
        deployed = SELECT_ON[name]
        rows.append([
            METHOD_LABELS[name].format(model=label),
            fmt(entry["test_mse_projection"]),
            fmt(entry["test_mse_full"]),
            deployed,
            ", ".join("diverged" if e is None else str(e) for e in entry["best_epoch"]),
            f"{entry['equivariance_full']['so3']['mean']:.1e} / {entry['equivariance_full']['z']['mean']:.1e}",
            "–" if entry["train_s"] is None else f"{entry['train_s']:.0f}",
            f"{entry['wall_s']:.0f}",
        ])
    header = ["Method", "Test MSE (projection)", "Test MSE (full)", "Selected on", "Best epoch",
              "Full model's equivariance error, SO(3) / about z", "Training s (all epochs)", "Wall s (this call)"]
    intro = (
        f"N-body (charged, 5 particles), {config['train_size']} train / {config['val_size']} val / "
        f"{config['test_size']} test, field E = {config['field']}, {config['epochs']} epochs, "
        f"seeds {config['seeds']}; mean ± sample std over seeds.\n\n"
    )
    return intro + markdown_table(header, rows)


def run_study(args: argparse.Namespace) -> dict:
    """Run every requested method and write results.json, table.md and the plots."""
    preset = PRESETS[args.preset]
    methods = parse_list(args.methods, METHODS, "methods") if args.methods else list(preset["methods"])
    num_seeds = args.seeds if args.seeds is not None else preset["seeds"]
    epochs = args.epochs if args.epochs is not None else preset["epochs"]
    train_size = args.train_size if args.train_size is not None else preset["train_size"]
    if num_seeds < 1 or epochs < 1 or train_size < 1:
        raise ValueError(f"--seeds, --epochs and --train-size must be >= 1, got {num_seeds}, {epochs}, {train_size}")
    seeds = [args.seed + k for k in range(num_seeds)]
    # model options that do not fit the model fail here, before the data (minutes on a first run)
    make_model(args.model, branch_kind=args.branch_kind, parameterization=args.parameterization,
               branch_rank=args.branch_rank, branch_init_scale=args.branch_init_scale)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    splits = load_splits(train_size, preset["val_size"], preset["test_size"], args.field, args.cache_dir)
    example = {k: v[0] for k, v in splits["train"].items()}
    config_record = {
        "preset": args.preset, "model": args.model, "methods": methods, "seeds": seeds, "epochs": epochs,
        "train_size": len(splits["train"]["loc"]), "val_size": len(splits["val"]["loc"]),
        "test_size": len(splits["test"]["loc"]), "field": args.field, "batch_size": preset["batch_size"],
        "learning_rate": preset["learning_rate"], "dual_learning_rate": preset["dual_learning_rate"],
        "dual_optimizer": args.dual_optimizer, "dual_proportional": args.dual_proportional, "eval_every": preset["eval_every"],
        "spectral_branch": args.spectral_branch,
        "branch_kind": resolve_branch_kind(args.model, args.branch_kind), "branch_rank": args.branch_rank,
        "parameterization": args.parameterization, "vmap_seeds": args.vmap_seeds,
        "branch_init_scale": egnn_branch_init_scale(args.model, args.branch_init_scale),
        "select_on": {m: SELECT_ON[m] for m in methods}, "metric": f"test {METRIC} on positions",
        "device": jax.devices()[0].platform,
    }

    summaries, histories = {}, {}
    for name in methods:
        spectral = args.spectral_branch == "on" or (args.spectral_branch == "auto" and name == "ace-resilient")
        model = make_model(args.model, spectral_branch=spectral, branch_kind=args.branch_kind,
                           parameterization=args.parameterization, branch_rank=args.branch_rank,
                           branch_init_scale=args.branch_init_scale)
        task = make_task(model, example, field=args.field)
        config = TrainConfig(
            epochs=epochs, batch_size=preset["batch_size"], learning_rate=preset["learning_rate"],
            dual_learning_rate=preset["dual_learning_rate"], dual_optimizer=args.dual_optimizer,
            dual_proportional=args.dual_proportional, eval_every=preset["eval_every"], select_on=SELECT_ON[name], select_metric=METRIC,
            progress=not args.no_progress,
            run_settings={  # what else a checkpoint in DIR/<method>/seed<k> depends on
                "model": args.model, "field": args.field, "spectral_branch": spectral,
                "branch_kind": config_record["branch_kind"], "branch_rank": args.branch_rank,
                "parameterization": args.parameterization, "branch_init_scale": config_record["branch_init_scale"],
                "val_size": config_record["val_size"],
            },
        )
        t0 = time.perf_counter()
        run_dirs = [out / name / f"seed{s}" for s in seeds]
        if args.vmap_seeds:
            results = fit_seeds_vmapped(task, splits["train"], splits["val"], splits["test"], name, config, seeds,
                                        out_dirs=run_dirs)
        else:  # a diverged seed is recorded (Diverged) and the study goes on
            results = [
                fit_seed(lambda s=s, d=d: ace_jax.fit(task, splits["train"], splits["val"], splits["test"], name,
                                                      dataclasses.replace(config, seed=s, out_dir=str(d))), s)
                for s, d in zip(seeds, run_dirs)
            ]
        entry = method_summary(results, seeds, shared_program=args.vmap_seeds)
        # same rotations for every method of a seed (paired); the test split the study reports on;
        # one predict per method, so the seeds share one compiled program
        predict = make_predict(model)
        reports = [{"so3": float("nan"), "z": float("nan")} if isinstance(r, Diverged) else
                   equivariance_report(predict, r.best_variables, splits["test"], jax.random.fold_in(jax.random.PRNGKey(s), 1))
                   for s, r in zip(seeds, results)]
        entry["equivariance_full"] = {
            **{name: summarize([rep[name] for rep in reports]) for name in ("so3", "z")},
            **{f"{name}_per_seed": [rep[name] for rep in reports] for name in ("so3", "z")},
            "examples": min(EQUIVARIANCE_EXAMPLES, len(splits["test"]["loc"])), "rotations": EQUIVARIANCE_ROTATIONS,
        }
        entry["wall_s"] = time.perf_counter() - t0
        first = next(((s, r) for s, r in zip(seeds, results) if not isinstance(r, Diverged)), None)
        summaries[name], histories[name] = entry, first[1].history if first else []
        if first:
            plot_trajectories(first[1].history, out / f"trajectories_{name}.png",
                              f"{args.model.upper()} {name}: γ, λ, u (seed {first[0]})")
        print(f"{name}: projection {fmt(entry['test_mse_projection'])}, full {fmt(entry['test_mse_full'])}, "
              f"{entry['wall_s']:.0f} s", flush=True)

    results_json = {"config": config_record, "methods": summaries}
    write_json(out / "results.json", results_json)
    plot_curves(histories, out / "val_curves.png", METRIC, f"N-body {args.model.upper()}: validation MSE")
    (out / "table.md").write_text(render_table(args.model, summaries, config_record))
    return results_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.nbody", description=__doc__.split("\n")[0])
    add_study_args(parser, PRESETS)
    parser.add_argument("--model", choices=MODELS, default="segnn")
    parser.add_argument("--train-size", type=int, default=None, help="training trajectories (default: preset)")
    parser.add_argument("--field", type=float, default=0.0, help="external field E along z (0 = standard set)")
    parser.add_argument("--dual-optimizer", choices=("ascent", "adam"), default="ascent")
    parser.add_argument("--dual-proportional", type=float, default=0.0,
                        help="gain of the proportional (damping) term of the dual update; 0 = plain ascent")
    parser.add_argument("--vmap-seeds", action="store_true", help="train all seeds of a method in one program")
    parser.add_argument("--spectral-branch", choices=("auto", "on", "off"), default="auto",
                        help="spectrally normalised branches (auto: only for ace-resilient)")
    parser.add_argument("--branch-kind", choices=("dense", "axis", "in_kernel"), default=None,
                        help="SEGNN ACE branches: dense Linear on each block's flattened output (default, the "
                             "paper's), per-channel 3x3 vector mixing, or per-axis vector weights folded into "
                             "each block's last product (cheapest)")
    parser.add_argument("--branch-rank", type=int, default=None,
                        help="SEGNN dense branches factored through this rank (low-rank Linear; default: full rank)")
    parser.add_argument("--branch-init-scale", type=float, default=None,
                        help="EGNN: variance of each branch's last kernel relative to LeCun normal "
                             "(default: the model's)")
    parser.add_argument("--parameterization", choices=SEGNN_PARAMETERIZATIONS, default=SEGNN_PARAMETERIZATIONS[0],
                        help="SEGNN weights: N(0,1) used as W/sqrt(n) (e3nn-jax) or U(+-1/sqrt(n)) used as is "
                             "(torch.nn.Linear style, as the reference SEGNN)")
    parser.add_argument("--cache-dir", default=None, help="N-body data cache (default ~/.cache/ace_jax/nbody)")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    results = run_study(args)
    print((Path(args.out) / "table.md").read_text())
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    return results


if __name__ == "__main__":
    raise SystemExit(report_diverged(main()))
