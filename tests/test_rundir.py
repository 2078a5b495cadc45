"""The run folder: one object knows its files, its config and the model's number of targets."""

import dataclasses

import pytest
from safetensors.torch import load_file, save_file

from dcesynth.io import InputError
from dcesynth.rundir import RunDir
from test_infer import make_run


def test_every_file_lies_in_the_run_folder_or_its_checkpoints(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.config_file.parent == run.path == run.log_jsonl.parent == run.train_log.parent
    assert run.regression_file.parent == run.path
    for path in (run.last_weights, run.best_weights, run.warmup_weights, run.state):
        assert path.parent == run.checkpoints == run.path / run.checkpoints.name
    names = [run.last_weights, run.best_weights, run.warmup_weights, run.state]
    assert len({path.name for path in names}) == 4


def test_a_folder_without_config_is_not_a_run_folder(tmp_path):
    with pytest.raises(InputError, match="not a run folder"):
        assert RunDir(tmp_path).config


def test_create_writes_the_config_that_reads_back(tmp_path):
    run = RunDir(tmp_path / "run")
    config = RunDir(make_run(tmp_path)).config
    run.create(config)
    assert run.checkpoints.is_dir()
    assert run.config == config


def test_n_targets_comes_from_the_config_when_recorded(tmp_path):
    run = RunDir(make_run(tmp_path, "baseline", n_targets=3))
    run.write_config(dataclasses.replace(run.config, n_targets=5))
    assert run.n_targets == 5


def test_n_targets_of_a_config_without_it_comes_from_the_weights_metadata(tmp_path):
    run = RunDir(make_run(tmp_path, "baseline", n_targets=3))
    assert run.config.n_targets is None
    assert run.n_targets == 3


def test_a_config_with_a_bad_n_targets_is_refused(tmp_path):
    run = RunDir(make_run(tmp_path))
    run.config_file.write_text(
        run.config_file.read_text().replace('"n_targets": null', '"n_targets": 0')
    )
    with pytest.raises(InputError, match="invalid run config"):
        assert run.n_targets


def test_prediction_uses_the_best_weights_else_the_last(tmp_path):
    run = RunDir(make_run(tmp_path))
    assert run.weights_for_prediction() == run.last_weights
    save_file(load_file(run.last_weights), run.best_weights)
    assert run.weights_for_prediction() == run.best_weights
    run.best_weights.unlink()
    run.last_weights.unlink()
    with pytest.raises(InputError, match="no best.safetensors or last.safetensors"):
        run.weights_for_prediction()


def test_a_new_run_is_refused_where_a_run_was_started(tmp_path):
    run = RunDir(tmp_path)
    run.check_unused()
    run.regression_file.write_bytes(b"")
    assert run.started
    with pytest.raises(InputError, match="holds a run already"):
        run.check_unused()
