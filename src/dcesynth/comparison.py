"""Uncertainty of the evaluation: intervals of every metric, paired model comparisons, verdicts.

Works on the ``per_case`` records of ``report.evaluate`` with one draw of resampled
cases (``stats.resample_counts``) for all metrics and models, so that two models are
compared on the same resampled cases (paired bootstrap). Metric names are flat here:
``psnr_2dyn``, ``ssim_2dyn``, ``enh_error_2dyn`` … per phase, then the lesion metrics
of ``pages.LESION_METRICS``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dcesynth.pages import LESION_METRICS
from dcesynth.stats import clustered_means, paired_comparison, percentile_interval

REFERENCE_MODEL = "copy-1dyn"
REFERENCE_LABEL = "copy-forward"
"""How sentences name the reference: it copies the first post-contrast phase forward."""
PRIMARY_PAIRS = (
    ("iterunet", "baseline"),
    ("iterunet", "regression"),
    ("iterunet-prior", "regression"),
    ("iterunet-prior", "iterunet"),
    ("iterunet-prior", "baseline"),
)
"""Besides every model against the reference, these pairs are compared when both are
there: iterU-Net against the paper's baseline and the regression model, and iterU-Net on
the regression prior against the prior's model, iterU-Net without it and the baseline."""
IMAGE_METRICS = ("psnr", "ssim")
VERDICT_METRIC = "enh_error_last"
"""The verdict's metric: the paper's headline, the lesion enhancement error at the last phase."""


@dataclass(frozen=True)
class Samples:
    """One metric of one model over its units (cases or lesions).

    Attributes:
        values: (N,) float64, NaN where the model has no value (a phase it does not predict).
        cases: (N,) int64 index of each unit's case in ``per_case`` order.
    """

    values: np.ndarray
    cases: np.ndarray


def _phase_order(name: str) -> int:
    return int(name.removesuffix("dyn"))


def _as_values(values: list) -> np.ndarray:
    return np.asarray([np.nan if value is None else value for value in values], dtype=np.float64)


def metric_samples(per_case: dict, model: str) -> dict[str, Samples]:
    """A model's values of every scalar metric, per unit, by flat metric name.

    Args:
        per_case: ``report.evaluate``'s per_case records (every model for every case).
        model: the model's name.

    Returns:
        ``{"psnr_2dyn": Samples, "ssim_2dyn", "enh_error_2dyn", …, "scc", …}``: image
        metrics one unit per case, the others one per lesion, phases in time order.
    """
    records = [case["models"][model] for case in per_case.values()]
    lesions = [lesion for record in records for lesion in record["lesions"]]
    case_index = np.arange(len(records))
    lesion_case = np.asarray(
        [index for index, record in enumerate(records) for _ in record["lesions"]], dtype=np.int64
    )
    phases = sorted({name for record in records for name in record["per_phase"]}, key=_phase_order)
    samples = {}
    for phase in phases:
        for key in IMAGE_METRICS:
            values = [record["per_phase"].get(phase, {}).get(key) for record in records]
            samples[f"{key}_{phase}"] = Samples(_as_values(values), case_index)
        values = [lesion["enh_error"].get(phase) for lesion in lesions]
        samples[f"enh_error_{phase}"] = Samples(_as_values(values), lesion_case)
    for key in LESION_METRICS:
        samples[key] = Samples(_as_values([lesion[key] for lesion in lesions]), lesion_case)
    return samples


def intervals(samples: dict[str, Samples], counts: np.ndarray) -> dict[str, list[float] | None]:
    """Flat metric name -> 95 % bootstrap interval of its mean (None without values).

    Args:
        samples: ``metric_samples`` of one model.
        counts: (R, C) ``stats.resample_counts`` of the cohort's C cases.
    """
    result = {}
    for name, sample in samples.items():
        present = np.isfinite(sample.values)
        means = clustered_means(sample.values[present], sample.cases[present], counts)
        result[name] = percentile_interval(means)
    return result


def with_intervals(entry: dict, model_intervals: dict[str, list[float] | None]) -> dict:
    """A model's metrics.json entry with ``m_ci95`` right after every scalar metric ``m``.

    Args:
        entry: ``{"per_phase": {phase: {"psnr", …}}, "scc", …}`` (other keys are kept).
        model_intervals: ``intervals`` of the same model.
    """

    def beside(metrics: dict, suffix: str) -> dict:
        out = {}
        for key, value in metrics.items():
            out[key] = value
            if f"{key}{suffix}" in model_intervals:
                out[f"{key}_ci95"] = model_intervals[f"{key}{suffix}"]
        return out

    result = beside(entry, "")
    result["per_phase"] = {
        phase: beside(values, f"_{phase}") for phase, values in entry["per_phase"].items()
    }
    return result


def comparison_pairs(models: list[str]) -> list[tuple[str, str]]:
    """(first, second) pairs to compare: every model against the reference, then each of
    ``PRIMARY_PAIRS`` whose two models are present."""
    pairs = [(model, REFERENCE_MODEL) for model in models if model != REFERENCE_MODEL]
    return pairs + [pair for pair in PRIMARY_PAIRS if set(pair) <= set(models)]


def _shared(first: Samples, second: Samples) -> np.ndarray:
    """(N,) bool: the units both models have a value of."""
    return np.isfinite(first.values) & np.isfinite(second.values)


def _is_error(name: str) -> bool:
    return name == "dtw" or name.startswith("enh_error")


def paired_block(samples: dict[str, dict[str, Samples]], counts: np.ndarray) -> dict:
    """metrics.json's ``"paired"``: ``{"A - B": {metric: stats.paired_comparison}}``.

    Only metrics and units both models have (a model that starts later lacks the
    early phases); ratios for the error metrics (enhancement errors, DTW).

    Args:
        samples: model name -> ``metric_samples`` (the models in report order).
        counts: (R, C) ``stats.resample_counts`` of the cohort's C cases.
    """
    block = {}
    for first, second in comparison_pairs(list(samples)):
        entry = {}
        for name, sample in samples[first].items():
            if name not in samples[second]:
                continue
            other = samples[second][name]
            shared = _shared(sample, other)
            if not shared.any():
                continue
            entry[name] = paired_comparison(
                sample.values[shared],
                other.values[shared],
                sample.cases[shared],
                counts,
                ratio=_is_error(name),
            )
        block[f"{first} - {second}"] = entry
    return block


def _label(model: str) -> str:
    return REFERENCE_LABEL if model == REFERENCE_MODEL else model


def verdict(first: str, second: str, comparison: dict, lesions: int, cases: int) -> str:
    """One plain sentence: did ``first`` beat ``second`` on the last phase's lesion error?

    Decided by the 95 % interval of the error ratio first / second: wholly below 1,
    beat; wholly above 1, worse; containing 1, the two cannot be told apart. Without a
    ratio (the second model's error is 0 in some resample) the same by the interval
    of the difference against 0.

    Args:
        first: name of the first model, as the sentence should say it.
        second: the same of the second.
        comparison: the pair's ``paired_comparison`` of the enhancement error at the
            last phase (``{"diff", "ci95", "ratio", "ratio_ci95"}``).
        lesions: number of lesions compared.
        cases: number of cases they are in.
    """
    if comparison.get("ratio") is not None:
        (low, high), null = comparison["ratio_ci95"], 1.0
        size = f"its error was {comparison['ratio']:.2f}× {second}'s"
        interval = f"{low:.2f}–{high:.2f}"
    else:
        (low, high), null = comparison["ci95"], 0.0
        size = f"its error differed from {second}'s by {comparison['diff']:+.3f}"
        interval = f"{low:+.3f} to {high:+.3f}"
    metric = "the lesion enhancement error at the last phase"
    evidence = f"{lesions} lesions in {cases} cases"
    if high < null:
        return f"{first} beat {second} on {metric}: {size} (95 % interval {interval}, {evidence})."
    if low > null:
        return (
            f"{first} was worse than {second} on {metric}: {size} "
            f"(95 % interval {interval}, {evidence})."
        )
    return (
        f"{first} did not beat {second} on {metric}: {size}, and the 95 % interval "
        f"{interval} includes {null:g}, so the two cannot be told apart ({evidence})."
    )


def verdicts(paired: dict, samples: dict[str, dict[str, Samples]]) -> dict[str, str]:
    """Pair name ("A - B") -> ``verdict`` sentence, for every pair of ``paired_block``."""
    sentences = {}
    for first, second in comparison_pairs(list(samples)):
        shared = _shared(samples[first][VERDICT_METRIC], samples[second][VERDICT_METRIC])
        cases = samples[first][VERDICT_METRIC].cases[shared]
        name = f"{first} - {second}"
        sentences[name] = verdict(
            _label(first),
            _label(second),
            paired[name][VERDICT_METRIC],
            lesions=int(shared.sum()),
            cases=len(np.unique(cases)),
        )
    return sentences
