"""benchmarks/shift.py: each shift leaves training's range in one factor; the run end to end."""

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest

from dcesynth import pipeline
from dcesynth.config import preset
from dcesynth.phantom_config import PHANTOMS

SHIFT_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "shift.py"
SPEC = importlib.util.spec_from_file_location("shift", SHIFT_PATH)
shift = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(shift)

TINY_FEATURES = (4, 4, 8, 8, 16, 4)


def anisotropy(config) -> tuple[float, float]:
    """(least, most) in-plane spacing over slice spacing the config can draw."""
    inplane = [fov / config.shape[0] for fov in config.fov_inplane_range_mm]
    slab = [fov / config.shape[2] for fov in config.fov_slab_range_mm]
    return inplane[0] / slab[1], inplane[1] / slab[0]


def test_every_configuration_is_valid_and_training_narrows_the_randomised_phantom():
    configs = shift.shift_configs()
    assert list(configs) == ["none", "paper", "aif", "field", "oblique", "protocol", "snr", "all"]
    for config in configs.values():
        config.validate()
    training, randomised = shift.TRAINING, PHANTOMS["randomised"]
    assert configs["none"] == training
    assert set(training.field_strengths_t) < set(randomised.field_strengths_t)
    assert training.n_phases_range[1] < randomised.n_phases_range[1]
    assert training.aif_families == randomised.aif_families
    assert training.snr_range == randomised.snr_range


def test_each_shift_leaves_the_training_range_in_its_own_factor_only():
    configs, training = shift.shift_configs(), shift.TRAINING
    aif = configs["aif"]
    assert aif.aif_rate_scale_range[0] > training.aif_rate_scale_range[1]
    assert aif.aif_amplitude_range[1] < training.aif_amplitude_range[0]
    assert aif.injection_duration_range_s[0] > training.injection_duration_range_s[1]
    assert not set(configs["field"].field_strengths_t) & set(training.field_strengths_t)
    assert configs["snr"].snr_range[1] < training.snr_range[0]
    assert configs["protocol"].n_phases_range[0] > training.n_phases_range[1]
    assert configs["protocol"].phase_spacing_range_s == (60.0, 60.0)
    assert configs["oblique"].oblique_max_deg > training.oblique_max_deg
    assert anisotropy(configs["oblique"])[0] > anisotropy(training)[1]
    for name, fields in shift.SHIFTED_FACTORS.items():
        changed = {
            field.name
            for field in dataclasses.fields(training)
            if getattr(configs[name], field.name) != getattr(training, field.name)
        }
        assert changed == set(fields), name
    every = {key for fields in shift.SHIFTED_FACTORS.values() for key in fields}
    assert {key: getattr(configs["all"], key) for key in every} == {
        key: value for fields in shift.SHIFTED_FACTORS.values() for key, value in fields.items()
    }


def test_an_unknown_cohort_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"unknown shift cohorts \['gantry'\]; choose from none"):
        shift.run_shifts(tmp_path / "run", tmp_path / "out", 2, 0, names=["snr", "gantry"])


def test_summary_reads_the_ratio_and_agreements_from_metrics():
    metrics = {
        "cases": 9,
        "lesions": 11,
        "models": {
            "iterunet": {"curve_type_agreement": 0.7, "curve_type_agreement_ci95": [0.5, 0.9]},
            "copy-1dyn": {"curve_type_agreement": 0.5, "curve_type_agreement_ci95": [0.3, 0.7]},
        },
        "paired": {
            "iterunet - copy-1dyn": {
                "enh_error_last": {
                    "diff": -1.0,
                    "ci95": [-2, 0],
                    "ratio": 0.6,
                    "ratio_ci95": [0.4, 0.8],
                }
            }
        },
    }
    row = shift.summarise(metrics, "iterunet")
    assert row == {
        "cases": 9,
        "lesions": 11,
        "ratio_to_copy": 0.6,
        "ratio_to_copy_ci95": [0.4, 0.8],
        "agreement": 0.7,
        "agreement_ci95": [0.5, 0.9],
        "copy_agreement": 0.5,
        "copy_agreement_ci95": [0.3, 0.7],
    }
    assert shift.table({"snr": row}).splitlines()[1].split()[:4] == ["snr", "9", "11", "0.60"]


def test_a_training_cohort_can_be_drawn_inside_a_shift(tmp_path, monkeypatch):
    monkeypatch.setattr(shift, "TRAINING", dataclasses.replace(shift.TRAINING, shape=(32, 32, 16)))
    shift.simulate_training(tmp_path / "protocol", 2, seed=3, cohort="protocol")
    for meta in (tmp_path / "protocol").glob("*/meta.json"):
        assert json.loads(meta.read_text())["times_s"] == [0, 60, 120, 180, 240, 300, 360]
    with pytest.raises(ValueError, match=r"unknown cohort 'gantry'; choose from none, paper"):
        shift.simulate_training(tmp_path / "x", 2, seed=3, cohort="gantry")


@pytest.mark.slow
def test_a_trained_run_is_scored_on_shift_cohorts(tmp_path):
    data = tmp_path / "train"
    training = dataclasses.replace(shift.TRAINING, shape=(32, 32, 16))
    pipeline.simulate(data, 4, seed=5, config=training)
    config = preset("demo")
    config = dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, features=TINY_FEATURES),
        train=dataclasses.replace(
            config.train, warmup_steps=1, optim_steps=1, cases_per_step=1, val_every=100
        ),
    )
    run = tmp_path / "run"
    pipeline.train(data, run, config)
    out = tmp_path / "shift"
    names = ["protocol", "snr"]
    rows = shift.run_shifts(run, out, lesions=2, seed=0, shape=(32, 32, 16), names=names)
    assert list(rows) == names
    assert json.loads((out / "shift.json").read_text()) == rows
    for name, row in rows.items():
        assert row["cases"] >= 1 and row["lesions"] >= 2, name
        assert math.isfinite(row["ratio_to_copy"]), name
        low, high = row["ratio_to_copy_ci95"]
        assert low <= row["ratio_to_copy"] <= high, name
        assert (out / "reports" / name / "index.html").is_file()
    protocol_case = next((out / "data" / "protocol").glob("*/meta.json"))
    assert json.loads(protocol_case.read_text())["times_s"] == [0, 60, 120, 180, 240, 300, 360]
    # A second call finds every cohort, prediction and report in place and reads them back.
    assert shift.run_shifts(run, out, 2, seed=0, shape=(32, 32, 16), names=names) == rows
