"""benchmarks/roi.py: the ROI an import derives from a phantom's images matches the phantom's."""

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dcesynth import pipeline
from dcesynth.phantom_config import PHANTOMS

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "roi.py"
SPEC = importlib.util.spec_from_file_location("roi", SCRIPT)
roi = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(roi)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("roi") / "cohort"
    config = dataclasses.replace(PHANTOMS["default"], shape=(48, 48, 24))
    pipeline.simulate(folder, 3, seed=4, config=config, workers=1)
    return folder


def test_pooling_averages_blocks_and_cuts_the_remainder():
    volume = np.arange(5 * 4 * 2, dtype=float).reshape(5, 4, 2)
    pooled = roi.pooled(volume, 2)
    assert pooled.shape == (2, 2, 1)
    assert pooled[0, 0, 0] == volume[:2, :2, :2].mean()
    assert pooled[1, 1, 0] == volume[2:4, 2:4, :2].mean()
    np.testing.assert_array_equal(roi.pooled(volume, 1), volume)


def test_the_derived_roi_matches_the_phantom_roi_where_the_whole_breast_does_not(cohort):
    for folder in sorted(cohort.iterdir()):
        scores = roi.score_case(folder)
        derived, breast = scores["derived ROI"], scores["whole breast"]
        assert derived["dice"] > 0.9 and breast["dice"] < 0.6
        assert abs(derived["mean_ratio"] - 1.0) < 0.05 and breast["mean_ratio"] > 1.2
        assert 0.9 < derived["sd_ratio"] < 1.4


def test_the_script_prints_the_table_and_writes_the_figures(cohort, tmp_path):
    out = tmp_path / "roi.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(cohort), "--pool", "2", "--out", str(out)],
        capture_output=True,
        encoding="utf-8",
        check=True,
    )
    assert result.stdout.startswith("3 cases scored, 0 refused by the automatic breast mask")
    assert "| derived ROI |" in result.stdout and "| whole breast |" in result.stdout
    figures = json.loads(out.read_text())
    assert len(figures["cases"]) == 3 and figures["refused"] == []
    median, low, high = figures["summary"]["derived ROI"]["dice"]
    assert low <= median <= high
