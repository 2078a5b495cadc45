"""`dcesynth simulate`: a good run, and bad input ending in exit 2, one `error:` line, no output."""

import json

import pytest
from typer.testing import CliRunner

from dcesynth.case import load_case
from dcesynth.cli import app


def simulate(*args: str):
    return CliRunner().invoke(app, ["simulate", *args])


def test_simulate_writes_loadable_cases(tmp_path):
    out = tmp_path / "cohort"
    result = simulate(str(out), "--cases", "2", "--seed", "5", "--shape", "32", "32", "16")
    assert result.exit_code == 0, result.stderr
    assert f"wrote 2 cases to {out}" in result.stdout
    cases = [load_case(out / f"phantom_{i:04d}") for i in range(2)]
    assert [case.shape for case in cases] == [(32, 32, 16)] * 2
    assert all(case.lesions for case in cases)


def test_simulate_takes_any_protocol(tmp_path):
    out = tmp_path / "cohort"
    result = simulate(str(out), "--cases", "1", "--shape", "32", "32", "16", "--times", "0,60,420")
    assert result.exit_code == 0, result.stderr
    assert load_case(out / "phantom_0000").times_s == [0.0, 60.0, 420.0]


def test_simulate_randomised_phantom_writes_cases_with_their_own_protocol(tmp_path):
    out = tmp_path / "cohort"
    result = simulate(
        str(out),
        "--cases",
        "3",
        "--seed",
        "2",
        "--shape",
        "32",
        "32",
        "16",
        "--phantom",
        "randomised",
    )
    assert result.exit_code == 0, result.stderr
    cases = [load_case(out / f"phantom_{i:04d}") for i in range(3)]
    metas = [json.loads((out / case.case_id / "meta.json").read_text()) for case in cases]
    assert len({tuple(meta["times_s"]) for meta in metas}) == 3
    for case, meta in zip(cases, metas, strict=True):
        assert case.phase_names == meta["phases"] and 3 <= len(case.times_s) <= 8
        assert {"field_t", "noise_model", "aif_family"} <= meta["acquisition"].keys()
        assert all(lesion["curve_type"] for lesion in case.lesions)


def test_simulate_randomised_phantom_keeps_given_times(tmp_path):
    out = tmp_path / "cohort"
    args = ["--cases", "1", "--shape", "32", "32", "16", "--phantom", "randomised"]
    result = simulate(str(out), *args, "--times", "0,60,120")
    assert result.exit_code == 0, result.stderr
    assert load_case(out / "phantom_0000").times_s == [0.0, 60.0, 120.0]


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--cases", "0"], "error: --cases: need at least 1 case, got 0"),
        (["--times", "0,85,85,225"], "error: --times: times must be strictly increasing"),
        (["--times", "0,85,soon"], "error: --times: expected comma-separated seconds"),
        (["--times", "10,85,155"], "error: --times: the pre-contrast phase must be at 0 s"),
        (["--shape", "32", "32", "15"], "error: --shape: must be at least (32, 32, 16)"),
        (["--seed", "-1"], "error: --seed: must be 0 or more, got -1"),
        (["--phantom", "wild"], "error: --phantom: expected one of default, randomised"),
    ],
    ids=[
        "no-cases",
        "repeated-time",
        "not-a-number",
        "pre-not-at-0",
        "shape-too-small",
        "negative-seed",
        "unknown-phantom",
    ],
)
def test_simulate_bad_option_exits_2_with_one_error_line(tmp_path, args, problem):
    out = tmp_path / "cohort"
    result = simulate(str(out), "--shape", "32", "32", "16", *args)
    assert result.exit_code == 2
    assert result.stderr.startswith(problem)
    assert len(result.stderr.splitlines()) == 1
    assert not out.exists()


def test_simulate_into_a_path_under_a_file_exits_2_naming_it(tmp_path):
    # A path below a regular file cannot be created, even by root (chmod would not stop root).
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder")
    out = blocker / "cohort"
    result = simulate(str(out), "--cases", "1", "--shape", "32", "32", "16")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {out}: output folder is not writable")
    assert len(result.stderr.splitlines()) == 1
    assert blocker.read_text() == "not a folder"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
