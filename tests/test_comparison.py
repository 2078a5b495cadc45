"""Which models are paired, and the verdict sentences read off the intervals."""

from dcesynth.comparison import REFERENCE_MODEL, comparison_pairs, verdict


def _error_ratio(ratio: float, low: float, high: float) -> dict:
    return {"diff": 0.0, "ci95": [-1.0, 1.0], "ratio": ratio, "ratio_ci95": [low, high]}


def test_verdict_says_beat_when_the_ratio_interval_lies_below_one():
    sentence = verdict("iterunet", "copy-forward", _error_ratio(0.55, 0.45, 0.68), 125, 100)
    assert sentence == (
        "iterunet beat copy-forward on the lesion enhancement error at the last phase: "
        "its error was 0.55× copy-forward's (95 % interval 0.45–0.68, 125 lesions in 100 cases)."
    )


def test_verdict_says_not_distinguishable_when_the_ratio_interval_includes_one():
    sentence = verdict("iterunet", "copy-forward", _error_ratio(0.91, 0.72, 1.11), 125, 100)
    assert sentence.startswith("iterunet did not beat copy-forward")
    assert "0.91× copy-forward's" in sentence
    assert "the 95 % interval 0.72–1.11 includes 1" in sentence


def test_verdict_says_worse_when_the_ratio_interval_lies_above_one():
    sentence = verdict("iterunet", "baseline", _error_ratio(1.4, 1.1, 1.8), 8, 6)
    assert sentence.startswith("iterunet was worse than baseline")
    assert "1.40× baseline's (95 % interval 1.10–1.80, 8 lesions in 6 cases)" in sentence


def test_verdict_without_a_ratio_reads_the_difference_against_zero():
    comparison = {"diff": 0.3, "ci95": [0.1, 0.5], "ratio": None, "ratio_ci95": None}
    sentence = verdict("iterunet", "baseline", comparison, 2, 2)
    assert sentence.startswith("iterunet was worse than baseline")
    assert "by +0.300 (95 % interval +0.100 to +0.500" in sentence


def test_every_model_is_paired_with_copy_and_iterunet_with_baseline_and_regression():
    models = ["iterunet", "baseline", "regression", "no-warmup", REFERENCE_MODEL]
    assert comparison_pairs(models) == [
        ("iterunet", REFERENCE_MODEL),
        ("baseline", REFERENCE_MODEL),
        ("regression", REFERENCE_MODEL),
        ("no-warmup", REFERENCE_MODEL),
        ("iterunet", "baseline"),
        ("iterunet", "regression"),
    ]


def test_iterunet_on_the_prior_is_paired_with_the_regression_iterunet_and_the_baseline():
    models = ["iterunet", "iterunet-prior", "baseline", "regression", REFERENCE_MODEL]
    assert comparison_pairs(models)[4:] == [
        ("iterunet", "baseline"),
        ("iterunet", "regression"),
        ("iterunet-prior", "regression"),
        ("iterunet-prior", "iterunet"),
        ("iterunet-prior", "baseline"),
    ]
    demo = ["iterunet-prior", "baseline", "regression", REFERENCE_MODEL]
    assert comparison_pairs(demo)[3:] == [
        ("iterunet-prior", "regression"),
        ("iterunet-prior", "baseline"),
    ]


def test_without_iterunet_models_are_paired_with_copy_only():
    assert comparison_pairs(["baseline", "regression", REFERENCE_MODEL]) == [
        ("baseline", REFERENCE_MODEL),
        ("regression", REFERENCE_MODEL),
    ]
