"""The pre-registered analysis of the ``paper-cpu`` protocol (issue 17): paired seeds, paired points.

Pure functions (no files, no global state) except :func:`verdicts_from_export`, which reads one export
directory. The rule they implement is written in docs/RESULTS.md, section "CC-Dist vs CC-IBP closer to the
paper's protocol", before any run:

- per seed s, the difference d_s = metric(CC-Dist, seed s) − metric(CC-IBP, seed s) in percentage points
  (same seed: same initialization and data order), its mean and a two-sided 95 % Student t interval
  (:func:`paired_t_interval`);
- per test point, CC-Dist's and CC-IBP's branch-and-bound verdicts about the *same* point, ε and seed
  (:func:`pair_verdicts` refuses anything else), pooled over seeds, and the exact McNemar test on the
  discordant pairs (:func:`mcnemar_exact`);
- :func:`decide` turns both into one of "gain appears", "worse", "no gain of the paper's size",
  "inconclusive".
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: the paper's CC-Dist − CC-IBP gain in BaB-certified accuracy on CIFAR-10 2/255 (Table 1), in points
PAPER_EFFECT_POINTS = 1.1


# ------------------------------------------------------------------------------------ statistics


@dataclasses.dataclass(frozen=True)
class TInterval:
    """Mean of paired differences and its two-sided Student t confidence interval."""

    n: int
    mean: float
    sd: float
    low: float
    high: float
    confidence: float


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1 or not 0.0 < p < 1.0:
        raise ValueError(f"need df >= 1 and 0 < p < 1, got df={df}, p={p}")
    from scipy.stats import t  # scipy comes with scikit-learn, a dependency

    return float(t.ppf(p, df))


def paired_t_interval(differences: Sequence[float], confidence: float = 0.95) -> TInterval:
    """mean ± t_{(1+c)/2, n−1} · sd/√n of the paired differences (n ≥ 2, sample sd)."""
    d = [float(v) for v in differences]
    if len(d) < 2:
        raise ValueError(f"a t interval needs at least 2 paired differences, got {len(d)}")
    if not all(math.isfinite(v) for v in d):
        raise ValueError(f"non-finite difference in {d}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n, mean, sd = len(d), statistics.fmean(d), statistics.stdev(d)
    half = t_quantile((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
    return TInterval(n, mean, sd, mean - half, mean + half, confidence)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs (certified by A only, by B only) under
    H0 are Binomial(only_a + only_b, 1/2); p = min(1, 2·P[X ≤ min]). No discordant pair: p = 1."""
    if only_a < 0 or only_b < 0 or int(only_a) != only_a or int(only_b) != only_b:
        raise ValueError(f"discordant counts must be non-negative integers, got {only_a}, {only_b}")
    n, k = int(only_a) + int(only_b), min(int(only_a), int(only_b))
    if n == 0:
        return 1.0
    # exact integer arithmetic, then one division: no underflow for thousands of pairs
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)


# -------------------------------------------------------------------------------- point verdicts


@dataclasses.dataclass(frozen=True)
class PointVerdict:
    """Whether one model is certified on one test point at one ε, and what that claim is about.

    ``model_sha256`` is the hash of the verified network's weights (export manifest); ``category`` is the
    point's outcome (misclassified, pre-certified, attacked, safe, unsafe, timeout, error, missing).
    """

    model_sha256: str
    method: str
    seed: int
    dataset: str
    index: int
    label: int
    eps: float
    certified: bool
    category: str = ""


@dataclasses.dataclass(frozen=True)
class PairedVerdicts:
    """Two models' verdicts on the same points of one seed; ``a``/``b`` are parallel to ``indices``."""

    seed: int
    method_a: str
    method_b: str
    indices: tuple[int, ...]
    a: tuple[bool, ...]
    b: tuple[bool, ...]

    def counts(self) -> dict[str, int]:
        both = sum(x and y for x, y in zip(self.a, self.b, strict=True))
        only_a = sum(x and not y for x, y in zip(self.a, self.b, strict=True))
        only_b = sum(y and not x for x, y in zip(self.a, self.b, strict=True))
        return {
            "both": both,
            "only_a": only_a,
            "only_b": only_b,
            "neither": len(self.a) - both - only_a - only_b,
        }


def _one(values: set, what: str, side: str) -> Any:
    if len(values) != 1:
        raise ValueError(
            f"verdicts of side {side} are about {len(values)} different {what}: {sorted(values)}"
        )
    return next(iter(values))


def pair_verdicts(a: Sequence[PointVerdict], b: Sequence[PointVerdict]) -> PairedVerdicts:
    """Pair two models' verdicts point by point, refusing anything that is not a like-for-like pair.

    Raises ValueError when a side mixes models, methods, seeds, datasets or ε; when the sides differ in
    seed, dataset or ε, share a model, or have one method; when a point appears twice on a side, the
    sides cover different points, or a point's label differs between the sides.
    """
    if not a or not b:
        raise ValueError("both sides need at least one verdict")
    sides = {"A": a, "B": b}
    info = {}
    for side, vs in sides.items():
        info[side] = {
            "model": _one({v.model_sha256 for v in vs}, "models", side),
            "method": _one({v.method for v in vs}, "methods", side),
            "seed": _one({v.seed for v in vs}, "seeds", side),
            "dataset": _one({v.dataset for v in vs}, "datasets", side),
            "eps": _one({float(v.eps) for v in vs}, "ε values", side),
        }
        idx = [v.index for v in vs]
        if len(set(idx)) != len(idx):
            dup = sorted({i for i in idx if idx.count(i) > 1})
            raise ValueError(f"side {side} has several verdicts about test points {dup}")
    ia, ib = info["A"], info["B"]
    for key in ("seed", "dataset", "eps"):
        if ia[key] != ib[key]:
            raise ValueError(
                f"the sides differ in {key}: {ia[key]!r} vs {ib[key]!r}; not a paired comparison"
            )
    if ia["model"] == ib["model"]:
        raise ValueError(f"both sides are verdicts about the same model {ia['model'][:12]}")
    if ia["method"] == ib["method"]:
        raise ValueError(f"both sides are method {ia['method']!r}")
    by_a = {v.index: v for v in a}
    by_b = {v.index: v for v in b}
    if set(by_a) != set(by_b):
        only = sorted(set(by_a) ^ set(by_b))
        raise ValueError(f"the sides cover different test points (e.g. {only[:5]}): not paired")
    bad = [i for i in by_a if by_a[i].label != by_b[i].label]
    if bad:
        raise ValueError(f"test points {bad[:5]} have different labels on the two sides: different data")
    indices = tuple(sorted(by_a))
    return PairedVerdicts(
        ia["seed"],
        ia["method"],
        ib["method"],
        indices,
        tuple(bool(by_a[i].certified) for i in indices),
        tuple(bool(by_b[i].certified) for i in indices),
    )


def pool_pairs(pairs: Sequence[PairedVerdicts]) -> dict[str, int]:
    """Sum the 2×2 counts over seeds; refuses two pairings of one seed or a change of methods."""
    if not pairs:
        raise ValueError("no paired verdicts to pool")
    seeds = [p.seed for p in pairs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seed(s) {sorted({s for s in seeds if seeds.count(s) > 1})} pooled twice")
    methods = {(p.method_a, p.method_b) for p in pairs}
    if len(methods) != 1:
        raise ValueError(f"the pairs compare different methods: {sorted(methods)}")
    total = {"both": 0, "only_a": 0, "only_b": 0, "neither": 0}
    for p in pairs:
        for k, v in p.counts().items():
            total[k] += v
    total["pairs"] = sum(len(p.indices) for p in pairs)
    return total


def verdicts_from_export(
    export_dir: str | Path, method: str, seed: int, checkpoint: str | Path | None = None
) -> list[PointVerdict]:
    """The per-point verdicts of one verified export directory (manifest + α,β-CROWN records).

    A point sent to branch and bound counts as certified only when its record says so (no record:
    ``missing``, not certified). Raises ValueError when ``checkpoint`` is given and is not the file the
    export was made from, or when a record names another test point, model or ε than the manifest.
    """
    from ccdist_plugin.verification import summarize

    export = Path(export_dir)
    manifest = json.loads((export / "manifest.json").read_text())
    if checkpoint is not None:
        from ccdist_plugin.fileio import file_sha256

        if manifest.get("checkpoint_sha256") != file_sha256(checkpoint):
            raise ValueError(f"{export} was exported from another checkpoint than {checkpoint}")
    model, eps = manifest["model_sha256"], float(manifest["eps"])
    summary = summarize(export)
    records = {int(r["instance"]): r for r in summary.instances}
    verdicts = []
    for p in manifest["points"]:
        inst = p.get("instance")
        rec = records.get(int(inst)) if inst is not None else None
        if rec is not None:
            if int(rec.get("index", p["index"])) != int(p["index"]):
                raise ValueError(f"{export}: record of instance {inst} is about point {rec['index']}")
            if rec.get("model_sha256", model) != model or float(rec.get("eps", eps)) != eps:
                raise ValueError(f"{export}: record of instance {inst} is about another model or ε")
        if p["outcome"] == "bab":
            category = rec["verdict"] if rec is not None else "missing"
            certified = bool(rec is not None and rec.get("certified"))
        else:
            category = p["outcome"]
            certified = p["outcome"] == "pre-certified" and (rec is None or bool(rec.get("certified")))
        verdicts.append(
            PointVerdict(
                model,
                method,
                seed,
                str(manifest.get("dataset")),
                int(p["index"]),
                int(p["label"]),
                eps,
                certified,
                category,
            )
        )
    return verdicts


# ------------------------------------------------------------------------------------- decision


def decide(interval: TInterval, only_dist: int, only_ibp: int, p_value: float, alpha: float = 0.05) -> str:
    """The pre-registered verdict on the primary metric (differences CC-Dist − CC-IBP, in points).

    - "gain appears": the interval lies above 0 *and* McNemar rejects (p < alpha) with more points
      certified by CC-Dist only than by CC-IBP only;
    - "worse": the interval lies below 0 and McNemar rejects the other way;
    - "no gain of the paper's size": not the above, and the interval's upper end is below the paper's
      effect (+1.1 points);
    - "inconclusive": anything else (e.g. the interval contains both 0 and +1.1, or the tests disagree).
    """
    rejects = p_value < alpha
    if interval.low > 0 and rejects and only_dist > only_ibp:
        return "gain appears"
    if interval.high < 0 and rejects and only_ibp > only_dist:
        return "worse"
    if interval.high < PAPER_EFFECT_POINTS:
        return "no gain of the paper's size"
    return "inconclusive"


def per_seed_differences(
    dist: dict[int, float], ibp: dict[int, float], scale: float = 100.0
) -> tuple[list[int], list[float]]:
    """Seeds present for both methods and d_s = scale·(dist[s] − ibp[s]); refuses unpaired seeds."""
    if set(dist) != set(ibp):
        raise ValueError(f"seeds differ between the methods: {sorted(dist)} vs {sorted(ibp)}")
    seeds = sorted(dist)
    return seeds, [scale * (dist[s] - ibp[s]) for s in seeds]
