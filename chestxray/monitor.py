"""Drift monitoring: the reference distributions a checkpoint carries, and the figures the monitor shows.

The reference is fitted on the split the trust parts are fitted on (fit_trust: the calibration/validation split):
each label's calibrated probability, the in-scope score and two input statistics (brightness and contrast of the
model's input), and each image's mean label rank (the mean over labels of its probability's percentile among the
split's probabilities of that label), kept as sorted samples, plus the split's prevalence, called-positive and
out-of-scope rates. The monitor compares the newest `window` answered analyses with it (CheXstray, Soin et al.
2022: inputs and outputs, no ground truth needed):

- the population stability index (PSI) over the reference's deciles, an effect size (written by hand: a few lines,
  no library ships it; a test compares it with the formula computed independently);
- the two-sample Kolmogorov-Smirnov test (scipy.stats.ks_2samp), whose p-value counts both samples' sizes;
- a one-sided binomial test of the out-of-scope count against the reference's out-of-scope rate (scipy);
- per label, Fisher's exact test (scipy) of the window's called-positive count (calibrated probability at or above
  the label's threshold, before the evidence gate: the reference's own definition) against the reference split's
  count. A prevalence shift moves a label's called-positive rate as far as the model tells the finding apart, even
  where the whole probability distribution moves too little for PSI (a rare label's mass sits in one decile).

The mean label rank pools the labels' weak signals: a change of the patient mix (more or fewer images with any
finding) moves many labels' probabilities the same way, each too little for its own test, and the mean over labels
keeps that common move while averaging away each label's own noise. Percentiles, not the probabilities themselves,
so that every label counts equally (a sum of calibrated probabilities would be a test of the common labels only).
It is tested as the label probabilities are; a reference written before it has none, and the monitor skips it.

A quantity alerts when its shift is both large and not explained by chance: its PSI, less the PSI two samples of
these sizes from one distribution show by chance, exceeds `AlertLimits.psi`, and its p-value is below
`AlertLimits.alpha` divided by the number of quantities (Bonferroni: at most one false alert per 1/alpha checks,
whatever the label count). Between two samples of sizes n and m from one distribution, PSI over k bins is about
(1/n + 1/m) times a chi-square with k - 1 degrees of freedom (Yurdakul 2018, "Statistical properties of the population
stability index"), so a window of 200 against a split of 248 shows 0.08 on average: the rule of thumb's 0.25 is meant
for the populations, not for that noise. The out-of-scope rate and the called-positive rates, proportions, have their
tests alone.

The monitor checks the window at every `AlertLimits.step`-th answered analysis (check_ends), not after each one:
windows one analysis apart share all but one analysis, so re-testing after each would add almost no evidence while
giving the p-value and PSI a fresh chance to cross their limits each time; alerts that flickered on and off with
single analyses were most of the false alerts in benchmarks/bench_drift.py. `AlertLimits.consecutive` > 1 also asks
the same quantity to alert at that many consecutive checks (debouncing), at `step` analyses of delay per extra check.
Feedback agreement (PPV, sensitivity) comes with Wilson intervals (scipy.stats.binomtest). No Flask, no database.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

import numpy as np

REFERENCE_FORMAT = 1
REFERENCE_POINTS = 2000  # a larger split is kept as this many quantiles (KS and PSI need no more)
PSI_BINS = 10
SCOPE = "scope_score"
BRIGHTNESS = "brightness"
CONTRAST = "contrast"
OUT_OF_SCOPE = "out_of_scope_rate"
CALLED = "called_positive:"  # + label: the called-positive rate at the reference's threshold
INPUTS = (SCOPE, BRIGHTNESS, CONTRAST)
MEAN_LABEL_RANK = "mean_label_rank"  # per image: the mean over labels of the probability's reference percentile


def probability_key(label: str) -> str:
    return f"probability:{label}"


def called_key(label: str) -> str:
    return f"{CALLED}{label}"


@dataclass(frozen=True)
class AlertLimits:
    """When the monitor alerts. window: the newest answered analyses compared with the reference (no alert before
    it is full); psi: the PSI beyond chance above which a shift counts as major (0.25, the usual rule of thumb:
    < 0.1 stable, 0.1-0.25 moderate); alpha: the family-wise false-alert probability per check (Bonferroni over
    quantities); step: a check at every step-th answered analysis (default: an eighth of the window); consecutive:
    checks in a row at which a quantity must alert. The defaults were chosen with benchmarks/bench_drift.py
    (BENCHMARKS.md); docs/MONITORING.md says how, what they cost in delay, and how to choose."""

    window: int = 200
    psi: float = 0.25
    alpha: float = 0.0001
    step: int | None = None
    consecutive: int = 1

    def __post_init__(self) -> None:
        if self.window < 20:
            raise ValueError(f"the drift window must hold at least 20 analyses, got {self.window}")
        if not (self.psi > 0 and 0 < self.alpha < 1):
            raise ValueError(f"alert limits need psi > 0 and 0 < alpha < 1, got psi={self.psi}, alpha={self.alpha}")
        if self.step is None:
            object.__setattr__(self, "step", max(1, self.window // 8))
        if not (1 <= self.step <= self.window and self.consecutive >= 1):
            raise ValueError(f"alert limits need 1 <= step <= window ({self.window}) and consecutive >= 1, got "
                             f"step={self.step}, consecutive={self.consecutive}")


@dataclass(frozen=True)
class Reference:
    """Reference distributions from the split the model was calibrated on; plain data in the checkpoint."""

    split: str
    n_images: int
    samples: dict[str, np.ndarray]  # quantity -> sorted values (at most REFERENCE_POINTS)
    prevalence: dict[str, float] = field(default_factory=dict)  # label -> fraction positive on the split
    positive_rate: dict[str, float] = field(default_factory=dict)  # label -> fraction with p >= threshold
    out_of_scope_rate: float | None = None
    thresholds: dict[str, float] = field(default_factory=dict)  # label -> the threshold positive_rate was counted at

    def to_dict(self) -> dict:
        return {"format": REFERENCE_FORMAT, "split": self.split, "n_images": int(self.n_images),
                "samples": {key: [float(v) for v in values] for key, values in self.samples.items()},
                "prevalence": dict(self.prevalence), "positive_rate": dict(self.positive_rate),
                "out_of_scope_rate": self.out_of_scope_rate, "thresholds": dict(self.thresholds)}

    @classmethod
    def from_dict(cls, d: Mapping) -> Reference:
        """Raises ValueError for a malformed entry."""
        if not isinstance(d, Mapping) or d.get("format") != REFERENCE_FORMAT:
            raise ValueError(f"the monitoring reference is not format {REFERENCE_FORMAT}")
        try:
            samples = {str(key): np.sort(np.asarray(values, dtype=float)) for key, values in d["samples"].items()}
            return cls(str(d["split"]), int(d["n_images"]), samples,
                       {str(k): float(v) for k, v in (d.get("prevalence") or {}).items()},
                       {str(k): float(v) for k, v in (d.get("positive_rate") or {}).items()},
                       None if d.get("out_of_scope_rate") is None else float(d["out_of_scope_rate"]),
                       {str(k): float(v) for k, v in (d.get("thresholds") or {}).items()})
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"the monitoring reference is malformed ({type(exc).__name__}: {exc})") from None


def _kept(values: np.ndarray) -> np.ndarray:
    values = np.sort(np.asarray(values, dtype=float)[np.isfinite(values)])
    if len(values) <= REFERENCE_POINTS:
        return values
    return np.quantile(values, (np.arange(REFERENCE_POINTS) + 0.5) / REFERENCE_POINTS)


def mean_label_rank(probabilities: np.ndarray, samples: Sequence[np.ndarray]) -> np.ndarray:
    """(N, L) calibrated probabilities and each label's sorted reference sample (L of them) -> (N,) the mean over
    labels of the probability's mid-rank percentile in its label's sample, in [0, 1] (ties count half; NaN where a
    label's probability is missing)."""
    probabilities = np.asarray(probabilities, dtype=float)
    ranks = np.empty_like(probabilities)
    for j, sample in enumerate(samples):
        p = probabilities[:, j]
        ranks[:, j] = (np.searchsorted(sample, p, "left") + np.searchsorted(sample, p, "right")) / (2 * len(sample))
        ranks[np.isnan(p), j] = np.nan
    return ranks.mean(axis=1)


def fit_reference(calibrated: np.ndarray, labels: Sequence[str], targets: np.ndarray | None = None,
                  thresholds: Sequence[float] | None = None, scope_scores: np.ndarray | None = None,
                  scope_limit: float | None = None, image_stats: np.ndarray | None = None,
                  mean: float = 0.0, std: float = 1.0, split: str = "validation") -> Reference:
    """The reference from one split: calibrated (N, L) probabilities, targets (N, L) 0/1, thresholds (L,), scope
    scores (N,) and their limit, image_stats (N, scope.IMAGE_STATS) from scope.image_statistics with the
    normalisation (mean, std) of channel 0 it was computed with."""
    calibrated = np.asarray(calibrated, dtype=float)
    samples = {probability_key(label): _kept(calibrated[:, j]) for j, label in enumerate(labels)}
    if len(labels) > 1:  # of one label, the rank is that label's probability again: no second test of it
        samples[MEAN_LABEL_RANK] = _kept(mean_label_rank(calibrated, [samples[probability_key(x)] for x in labels]))
    prevalence = positive_rate = cuts = {}
    if targets is not None:
        prevalence = {label: float(np.mean(np.asarray(targets)[:, j])) for j, label in enumerate(labels)}
    if thresholds is not None:
        positive_rate = {label: float(np.mean(calibrated[:, j] >= thresholds[j])) for j, label in enumerate(labels)}
        cuts = {label: float(thresholds[j]) for j, label in enumerate(labels)}
    out_of_scope = None
    if scope_scores is not None:
        samples[SCOPE] = _kept(scope_scores)
        if scope_limit is not None:
            out_of_scope = float(np.mean(np.asarray(scope_scores) > scope_limit))
    if image_stats is not None:
        from .trust.scope import CONTRAST as CONTRAST_COLUMN
        from .trust.scope import THUMBNAIL

        stats = np.asarray(image_stats, dtype=float)
        # The thumbnail averages the normalised input over equal cells, so its mean is the input's mean.
        samples[BRIGHTNESS] = _kept(stats[:, : THUMBNAIL**2].mean(axis=1) * std + mean)
        samples[CONTRAST] = _kept(stats[:, CONTRAST_COLUMN])
    return Reference(split, len(calibrated), samples, prevalence, positive_rate, out_of_scope, cuts)


def input_statistics(inputs: np.ndarray) -> tuple[float, float]:
    """(brightness, contrast) of a model input after the per-image transform ((1, S, S) uint8, or floats in
    [0, 1]; a NumPy array or a CPU tensor): its mean and (sample) standard deviation in [0, 1], as fit_reference
    reads them from scope.image_statistics."""
    v = np.asarray(inputs)
    v = (v / 255.0 if v.dtype == np.uint8 else v).astype(np.float64).ravel()
    return float(v.mean()), float(v.std(ddof=1))


def psi_edges(reference: np.ndarray, bins: int = PSI_BINS) -> np.ndarray:
    """The inner edges of the reference's quantile bins (fewer than bins - 1 where quantiles tie)."""
    return np.unique(np.quantile(np.asarray(reference, dtype=float), np.linspace(0, 1, bins + 1)[1:-1]))


def psi(reference: np.ndarray, sample: np.ndarray, bins: int = PSI_BINS) -> float:
    """Population stability index of `sample` against `reference` over the reference's quantile bins:
    sum (q - p) ln(q / p), with half a count added to every bin (no infinite terms for an empty bin)."""
    reference, sample = np.asarray(reference, dtype=float), np.asarray(sample, dtype=float)
    edges = psi_edges(reference, bins)
    k = len(edges) + 1
    p = (np.bincount(np.searchsorted(edges, reference, side="right"), minlength=k) + 0.5) / (len(reference) + 0.5 * k)
    q = (np.bincount(np.searchsorted(edges, sample, side="right"), minlength=k) + 0.5) / (len(sample) + 0.5 * k)
    return float(np.sum((q - p) * np.log(q / p)))


def psi_chance(n_reference: int, n: int, n_bins: int) -> float:
    """The PSI expected by chance between samples of n_reference and n values from one distribution over n_bins
    bins: (n_bins - 1) (1/n_reference + 1/n), the mean of its chi-square approximation (Yurdakul 2018)."""
    if n_reference <= 0 or n <= 0:
        raise ValueError(f"both samples need values, got {n_reference} and {n}")
    return (n_bins - 1) * (1 / n_reference + 1 / n)


def wilson(successes: int, trials: int, level: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion (scipy.stats.binomtest); None without trials."""
    if trials <= 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


@dataclass(frozen=True)
class DriftRow:
    """One quantity's drift over a window: PSI and KS statistic (None where not defined) and the test's p-value;
    psi_chance: the part of PSI these sample sizes show by chance (the alert needs psi - psi_chance > the limit)."""

    quantity: str
    n: int
    psi: float | None
    ks: float | None
    p_value: float | None
    alert: bool
    observed: float | None = None  # for the out-of-scope rate: the window's rate
    expected: float | None = None  # and the reference's
    psi_chance: float | None = None


def quantities(reference: Reference) -> list[str]:
    """The quantities the monitor tests for this reference: its samples, the out-of-scope rate if known, and the
    called-positive rate of each label whose threshold it recorded."""
    return [*reference.samples, *([OUT_OF_SCOPE] if reference.out_of_scope_rate is not None else []),
            *(called_key(label) for label in reference.positive_rate if label in reference.thresholds)]


def window_values(columns: Mapping, reference: Reference) -> dict[str, np.ndarray]:
    """The store's columns (AnalysisStore.columns) as quantity -> values, for the quantities the reference has."""
    values: dict[str, np.ndarray] = {}
    answered = np.asarray(columns["outcome"]) == "answered"
    for j, label in enumerate(columns["labels"]):
        values[probability_key(label)] = np.asarray(columns["probability"])[answered, j]
        if label in reference.thresholds:
            p = values[probability_key(label)]
            values[called_key(label)] = np.where(np.isfinite(p), p >= reference.thresholds[label], np.nan)
    for name in INPUTS:
        values[name] = np.asarray(columns[name], dtype=float)[answered]
    if MEAN_LABEL_RANK in reference.samples:
        values.update(pooled_values(columns, reference, answered))
    in_scope = np.asarray(columns["in_scope"], dtype=object)[answered]
    values[OUT_OF_SCOPE] = np.array([float(v is False) for v in in_scope if v is not None])
    return {key: v[np.isfinite(v)] for key, v in values.items() if key in quantities(reference)}


def pooled_values(columns: Mapping, reference: Reference, answered: np.ndarray) -> dict[str, np.ndarray]:
    """{MEAN_LABEL_RANK: (N,)} for the answered rows of the store's columns, over the labels the reference has a
    probability sample of; {} when the columns lack one of them (the pooled figure would mean something else)."""
    labels = [key[len("probability:"):] for key in reference.samples if key.startswith("probability:")]
    if not labels or not set(labels) <= set(columns["labels"]):
        return {}
    index = [list(columns["labels"]).index(label) for label in labels]
    probabilities = np.asarray(columns["probability"], dtype=float)[answered][:, index]
    return {MEAN_LABEL_RANK: mean_label_rank(probabilities, [reference.samples[probability_key(x)] for x in labels])}


def drift(reference: Reference, values: Mapping[str, np.ndarray], limits: AlertLimits = AlertLimits(),
          min_n: int | None = None) -> list[DriftRow]:
    """Each reference quantity of `values` (window_values) against the reference, one check: a quantity alerts
    only with at least `min_n` values (default: the full window). `limits.step` and `limits.consecutive` are
    checked_drift's."""
    from scipy.stats import binomtest, fisher_exact, ks_2samp

    names = quantities(reference)
    alpha = limits.alpha / max(1, len(names))
    min_n = limits.window if min_n is None else min_n
    rows = []
    for name in names:
        v = np.asarray(values.get(name, ()), dtype=float)
        if name == OUT_OF_SCOPE:
            k, n = int(v.sum()), len(v)
            p = binomtest(k, n, reference.out_of_scope_rate, alternative="greater").pvalue if n else None
            rows.append(DriftRow(name, n, None, None, p, bool(n >= min_n and p is not None and p < alpha),
                                 observed=k / n if n else None, expected=reference.out_of_scope_rate))
            continue
        if name.startswith(CALLED):
            k, n = int(v.sum()), len(v)
            rate = reference.positive_rate[name[len(CALLED):]]
            k_ref = int(round(rate * reference.n_images))
            p = fisher_exact([[k, n - k], [k_ref, reference.n_images - k_ref]]).pvalue if n else None
            rows.append(DriftRow(name, n, None, None, None if p is None else float(p),
                                 bool(n >= min_n and p is not None and p < alpha),
                                 observed=k / n if n else None, expected=rate))
            continue
        if len(v) == 0:
            rows.append(DriftRow(name, 0, None, None, None, False))
            continue
        ref = reference.samples[name]
        result = ks_2samp(v, ref)
        index = psi(ref, v)
        # A reference kept as quantiles stands for its whole split: chance shrinks with the split's size.
        n_ref = reference.n_images if len(ref) >= REFERENCE_POINTS else len(ref)
        chance = psi_chance(n_ref, len(v), len(psi_edges(ref)) + 1)
        rows.append(DriftRow(name, len(v), index, float(result.statistic), float(result.pvalue),
                             bool(len(v) >= min_n and index - chance > limits.psi and result.pvalue < alpha),
                             psi_chance=chance))
    return rows


def check_ends(answered: int, limits: AlertLimits) -> list[int]:
    """The answered-analysis counts at which the newest `limits.consecutive` checks fell, oldest first: a check at
    every multiple of `limits.step` once the window is full; fewer (none before the first) early on."""
    last = answered - answered % limits.step
    ends = [last - i * limits.step for i in reversed(range(limits.consecutive))]
    return [end for end in ends if end >= limits.window]


def check_span(answered: int, limits: AlertLimits) -> int:
    """How many of the newest answered analyses checked_drift needs (AnalysisStore.columns(last=...))."""
    ends = check_ends(answered, limits)
    return answered - ends[0] + limits.window if ends else min(answered, limits.window)


def checked_drift(reference: Reference, columns: Mapping, answered: int,
                  limits: AlertLimits = AlertLimits()) -> tuple[list[DriftRow], int]:
    """The drift rows of the newest check and the analyses in its window, from the columns (AnalysisStore.columns)
    of the newest check_span(answered) answered analyses of `answered` in all. A row alerts only when its quantity
    alerted at each of the newest `limits.consecutive` checks; before the first check, the newest analyses are shown
    and nothing alerts. Raises ValueError when the columns hold fewer analyses than check_span asks."""
    n_rows = len(columns["outcome"])
    span = check_span(answered, limits)
    if n_rows < span:
        raise ValueError(f"the drift check needs the newest {span} answered analyses, got {n_rows}")
    ends = check_ends(answered, limits)
    if not ends:
        return drift(reference, window_values(columns, reference), limits), n_rows
    checks = []
    for end in ends:
        stop = n_rows - (answered - end)
        part = {key: (np.asarray(value)[stop - limits.window:stop] if key != "labels" else value)
                for key, value in columns.items()}
        checks.append(drift(reference, window_values(part, reference), limits))
    newest = checks[-1]
    if len(ends) < limits.consecutive:
        return [replace(row, alert=False) for row in newest], limits.window
    persistent = {row.quantity for row in newest if all(
        any(r.quantity == row.quantity and r.alert for r in rows) for rows in checks)}
    return [replace(row, alert=row.quantity in persistent) for row in newest], limits.window


def effective_truth(call: str, agree: bool | None, truth: str | None) -> bool | None:
    """Whether the finding is present according to a review: the true label if given, else what agreeing or
    disagreeing with a positive/negative call implies; None when the review says nothing about it."""
    if truth is not None:
        return truth == "present"
    if agree is None or call not in ("positive", "negative"):
        return None
    return (call == "positive") == agree


@dataclass(frozen=True)
class Agreement:
    """One label's feedback: reviews, agreement with the calls, PPV and sensitivity with Wilson 95 % intervals."""

    label: str
    reviews: int
    agree: int
    disagree: int
    ppv: float | None
    ppv_ci: tuple[float, float] | None
    ppv_n: int
    sensitivity: float | None
    sensitivity_ci: tuple[float, float] | None
    sensitivity_n: int


def agreement(reviews: Sequence[tuple[str, str, bool | None, str | None]], labels: Sequence[str]) -> list[Agreement]:
    """Per label, from (label, call, agree, truth) reviews: PPV = true among called positive, sensitivity = called
    positive among true; only positive/negative calls count (no call, nothing to agree with)."""
    out = []
    for label in labels:
        mine = [r for r in reviews if r[0] == label]
        tp = fp = fn = 0
        for _, call, agree, truth in mine:
            present = effective_truth(call, agree, truth)
            if present is None or call not in ("positive", "negative"):
                continue
            tp += call == "positive" and present
            fp += call == "positive" and not present
            fn += call == "negative" and present
        out.append(Agreement(label, len(mine), sum(r[2] is True for r in mine), sum(r[2] is False for r in mine),
                             tp / (tp + fp) if tp + fp else None, wilson(tp, tp + fp), tp + fp,
                             tp / (tp + fn) if tp + fn else None, wilson(tp, tp + fn), tp + fn))
    return out


def period_start(when: datetime, unit: str) -> datetime:
    """The start of the day or ISO week (Monday) holding `when`, in its time zone."""
    day = when.replace(hour=0, minute=0, second=0, microsecond=0)
    if unit == "day":
        return day
    if unit == "week":
        return day - timedelta(days=day.weekday())
    raise ValueError(f"the period is 'day' or 'week', got {unit!r}")


def percentile(values: np.ndarray, q: float) -> float | None:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(np.percentile(v, q)) if len(v) else None


@dataclass
class Period:
    """One day's or week's figures."""

    start: datetime
    volume: dict[str, int]  # source -> analyses
    total: int
    refused: int
    failed: int
    answered: int
    out_of_scope: int
    positive_rate: dict[str, float | None]  # label -> called positive among answered in-scope analyses
    latency_p50: float | None
    latency_p95: float | None
    drift: list[DriftRow]

    @property
    def refused_rate(self) -> float | None:
        return self.refused / self.total if self.total else None

    @property
    def out_of_scope_rate(self) -> float | None:
        return self.out_of_scope / self.answered if self.answered else None


def periods(columns: Mapping, unit: str, reference: Reference | None, limits: AlertLimits = AlertLimits(),
            min_n: int = 30) -> list[Period]:
    """The store's columns (AnalysisStore.columns) grouped by day or week, oldest first; drift per period against
    the reference (rows with fewer than min_n values are shown but never alert)."""
    created = columns["created"]
    keys = np.array([period_start(t, unit) for t in created], dtype=object)
    out = []
    for start in sorted(set(keys)):
        sel = keys == start
        part = {key: (np.asarray(value)[sel] if key != "labels" else value) for key, value in columns.items()}
        outcome = part["outcome"]
        answered = outcome == "answered"
        in_scope = np.array([v is not False for v in part["in_scope"]], dtype=bool) & answered
        calls = part["call"][in_scope] if len(part["labels"]) else np.empty((0, 0))
        out.append(Period(
            start=start,
            volume={s: int(np.sum(part["source"] == s)) for s in sorted(set(part["source"]))},
            total=int(sel.sum()), refused=int(np.sum(outcome == "refused")), failed=int(np.sum(outcome == "failed")),
            answered=int(answered.sum()), out_of_scope=int(sum(v is False for v in part["in_scope"][answered])),
            positive_rate={label: (float(np.mean(calls[:, j] == "positive")) if len(calls) else None)
                           for j, label in enumerate(part["labels"])},
            latency_p50=percentile(part["latency_ms"][answered], 50),
            latency_p95=percentile(part["latency_ms"][answered], 95),
            drift=drift(reference, window_values(part, reference), limits, min_n=min_n) if reference else [],
        ))
    return out


def finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value
