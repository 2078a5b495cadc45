"""Training: run folders, exact resume, ablation flags, free-running rollout, DDP, bf16."""

import dataclasses
import json
import math
import platform
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from dcesynth.case import load_case, save_case
from dcesynth.cli import app
from dcesynth.config import PRESETS, RunConfig, preset
from dcesynth.model import UNet3D, build_model
from dcesynth.phantom import PhantomConfig, simulate_cohort
from dcesynth.regression import RegressionModel, fit_regression
from dcesynth.rundir import RunDir
from dcesynth.train.trainer import (
    Trainer,
    build_trainer,
    split_cases,
    stages,
    teacher_probability,
    training_split,
)

TINY_FEATURES = (4, 4, 8, 8, 16, 4)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The models here are tiny: with 2 threads on a busy 2-core machine, thread hand-offs
    # cost far more than the convolutions (measured 5-10x slower than 1 thread).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    data = tmp_path_factory.mktemp("cohort")
    simulate_cohort(data, 4, seed=0, config=PhantomConfig(shape=(48, 48, 32)), workers=1)
    return data


def tiny(config: RunConfig, **train) -> RunConfig:
    """``config`` shrunk to a seconds-long run: tiny U-Net, 32x32x16 patches, fp32."""
    small = dict(patch=(32, 32, 16), cases_per_step=1, val_every=100, amp=False, workers=0)
    schedule = dataclasses.replace(
        config.train, **{**small, "warmup_steps": 4, "optim_steps": 4, **train}
    )
    model = dataclasses.replace(config.model, features=TINY_FEATURES)
    return dataclasses.replace(config, model=model, train=schedule)


def train_cli(*args: str):
    return CliRunner().invoke(app, ["train", *map(str, args)])


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("n_cases", "n_val"), [(2, 1), (10, 2), (300, 60), (500, 100), (1500, 100)]
)
def test_split_holds_out_a_fraction_of_the_cases_up_to_the_cap(tmp_path, n_cases, n_val):
    folders = [tmp_path / f"case_{i:04d}" for i in range(n_cases)]
    train_dirs, val_dirs = split_cases(folders, 0.2, seed=3, max_val=100)
    assert len(val_dirs) == n_val
    assert sorted(train_dirs + val_dirs) == folders
    assert split_cases(folders, 0.2, seed=3, max_val=100) == (train_dirs, val_dirs)


def test_max_val_cases_below_one_is_refused():
    with pytest.raises(ValueError, match="max_val_cases must be at least 1"):
        dataclasses.replace(PRESETS["cpu"].train, max_val_cases=0)


@pytest.fixture(scope="module")
def straight_run(cohort, tmp_path_factory):
    """8 uninterrupted fp32 steps (4 warm-up + 4 optimisation): weights and loss per step."""
    run = tmp_path_factory.mktemp("straight")
    trainer = build_trainer(cohort, run, tiny(preset("demo")))
    snapshots, losses = {}, {}

    def record(step, stage, terms, speed):
        snapshots[step], losses[step] = weights(trainer), terms["total"]

    trainer.fit(max_steps=8, on_step=record)
    return {"run": run, "weights": snapshots, "losses": losses}


def test_cli_train_demo_preset_writes_a_run_folder(cohort, tmp_path):
    run = tmp_path / "run"
    result = train_cli(cohort, "--out", run, "--preset", "demo", "--max-steps", 6)
    assert result.exit_code == 0, result.output
    assert "step 6: val enh. error last phase" in result.stdout
    for name in ("last.safetensors", "last_state.pt", "best.safetensors"):
        assert (run / "checkpoints" / name).is_file(), name
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    # The run records what it learnt from the data: 4 phases after 1dyn.
    assert RunConfig.from_json(config) == dataclasses.replace(preset("demo"), n_targets=4)
    assert torch.load(run / "checkpoints" / "last_state.pt", weights_only=True)["step"] == 6
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(entry["step"], entry["stage"]) for entry in log] == [(6, "warm-up")]
    assert (run / "train.log").is_file()


def test_the_optimisation_stage_keeps_the_weights_the_warm_up_ended_with(straight_run):
    warmup = load_file(RunDir(straight_run["run"]).warmup_weights)
    assert_same_weights(warmup, straight_run["weights"][4])


def test_resume_continues_exactly_across_and_within_stages(cohort, tmp_path, straight_run):
    config = tiny(preset("demo"))
    build_trainer(cohort, tmp_path, config).fit(max_steps=3)
    # Steps 4-6 cross into the optimisation stage (fresh optimiser from the warm-up weights).
    across = build_trainer(cohort, tmp_path, config, resume=True)
    assert across.step == 3
    across.fit(max_steps=6)
    assert_same_weights(weights(across), straight_run["weights"][6])
    # Step 7 resumes the optimisation stage's own optimiser and schedule mid-way.
    within = build_trainer(cohort, tmp_path, config, resume=True)
    assert (within.step, within.optimizer_stage) == (6, "optimisation")
    within.fit(max_steps=7)
    assert_same_weights(weights(within), straight_run["weights"][7])


@pytest.mark.parametrize(
    ("flag", "field", "value", "first_stage"),
    [
        ("--no-warmup", ("train", "warmup_steps"), 0, "optimisation"),
        ("--no-temporal", ("model", "temporal"), False, "warm-up"),
        ("--model=baseline", ("model", "name"), "baseline", "optimisation"),
        ("--normalisation=ti", ("model", "normalisation"), "ti", "warm-up"),
        ("--scheduled-sampling=0.5", ("train", "scheduled_sampling"), 0.5, "warm-up"),
        ("--case-features", ("model", "case_features"), True, "warm-up"),
        ("--prior=regression", ("model", "prior"), "regression", "warm-up"),
    ],
    ids=[
        "no-warmup",
        "no-temporal",
        "baseline",
        "ti-normalisation",
        "scheduled-sampling",
        "case-features",
        "regression-prior",
    ],
)
def test_cli_ablation_flags_train_and_are_recorded(
    cohort, tmp_path, flag, field, value, first_stage
):
    run = tmp_path / "run"
    result = train_cli(cohort, "--out", run, "--preset", "demo", "--max-steps", 1, flag)
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    assert config[field[0]][field[1]] == value
    assert (
        config["train"]["warmup_steps"] + config["train"]["optim_steps"]
        == PRESETS["demo"].train.total_steps
    )
    # The regression model (a prior) is normalised as the network is.
    assert config["regression"]["normalisation"] == config["model"]["normalisation"]
    log = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert (log["step"], log["stage"]) == (1, first_stage)
    tensors = load_file(run / "checkpoints" / "last.safetensors")
    temporal = any("lstm" in name or "time" in name for name in tensors)
    assert temporal == (config["model"]["temporal"] and config["model"]["name"] == "iterunet")


def test_baseline_checkpoint_holds_one_unet_per_target_phase(cohort, tmp_path):
    config = tiny(preset("demo", model="baseline"), warmup_steps=0, optim_steps=1)
    build_trainer(cohort, tmp_path, config).fit()
    tensors = load_file(tmp_path / "checkpoints" / "last.safetensors")
    assert {name.split(".")[1] for name in tensors} == {"0", "1", "2", "3"}
    assert all(name.startswith("unets.") for name in tensors)


def test_warmup_feeds_real_phases_and_optimisation_feeds_own_outputs(cohort, tmp_path, monkeypatch):
    calls = []  # (current phases fed, steps, U-Net output); validation runs in eval mode
    original = UNet3D.forward

    def spy(self, x, embedding=None, state=None, steps=1):
        out, state = original(self, x, embedding, state, steps)
        if self.training:
            calls.append((x[:, 1:].detach().clone(), steps, out.detach().clone()))
        return out, state

    monkeypatch.setattr(UNet3D, "forward", spy)
    trainer = build_trainer(cohort, tmp_path, tiny(preset("demo"), warmup_steps=1, optim_steps=1))
    trainer.fit()
    (fed, steps, _), *free_running = calls
    assert steps == 4 and len(free_running) == 4  # warm-up: its four steps in one batch

    real = trainer.batches[0]["phases"]
    for k, current in enumerate(fed.chunk(4)):
        assert torch.equal(current, real[:, k + 1 : k + 2])

    real = trainer.batches[1]["phases"]
    assert torch.equal(free_running[0][0], real[:, 1:2])
    for k in range(1, 4):
        current = free_running[k][0]
        previous_prediction = free_running[k - 1][0] + free_running[k - 1][2]
        torch.testing.assert_close(current, previous_prediction)
        assert not torch.allclose(current, real[:, k + 1 : k + 2], atol=1e-3)


@pytest.mark.parametrize(
    ("fraction", "expected"),
    [(0.0, [0.0, 0.0, 0.0, 0.0]), (0.5, [1.0, 0.5, 0.0, 0.0]), (1.0, [1.0, 0.75, 0.5, 0.25])],
)
def test_scheduled_sampling_probability_falls_linearly_over_its_share_of_stage_2(
    fraction, expected
):
    config = tiny(preset("demo"), warmup_steps=2, optim_steps=4, scheduled_sampling=fraction)
    warmup, optimisation = stages(config)
    assert teacher_probability(config.train, warmup, 0) == 1.0
    assert [teacher_probability(config.train, optimisation, 2 + i) for i in range(4)] == expected


def test_scheduled_sampling_feeds_real_phases_early_in_stage_2_and_is_recorded(
    cohort, tmp_path, monkeypatch
):
    masks = []  # (global step, teacher_mask) of every training rollout in stage 2
    trainer = build_trainer(
        cohort,
        tmp_path,
        tiny(preset("demo"), warmup_steps=1, optim_steps=4, val_every=5, scheduled_sampling=1.0),
    )
    original = trainer.teacher_inputs

    def spy(targets, stage):
        teacher, mask = original(targets, stage)
        if not stage.teacher_forcing:
            masks.append((trainer.step, mask))
        return teacher, mask

    monkeypatch.setattr(trainer, "teacher_inputs", spy)
    trainer.fit()
    assert [step for step, _ in masks] == [1, 2, 3, 4]
    assert masks[0][1].all()  # probability 1 at the stage's first step
    assert all(mask is not None and mask.shape == (2, 4) for _, mask in masks)
    trainer.step = 3  # as --resume would find it: the same draws
    _, redrawn = original(torch.zeros(2, 4, 1, 1, 1), trainer.stage_at(3))
    assert torch.equal(redrawn, masks[2][1])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["train"]["scheduled_sampling"] == 1.0


def test_scheduled_sampling_outside_0_to_1_is_refused():
    with pytest.raises(ValueError, match="scheduled_sampling"):
        tiny(preset("demo"), scheduled_sampling=1.5)


# 4, 6 and 8 phases at different times, as collections such as MAMA-MIA mix them.
MIXED_PROTOCOLS_S = (
    (0.0, 80.0, 160.0, 240.0),
    (0.0, 584.0, 714.0, 846.0, 977.0, 1108.0),
    (0.0, 60.0, 120.0, 180.0, 240.0, 300.0, 360.0, 420.0),
)


@pytest.fixture(scope="module")
def mixed_cohort(tmp_path_factory):
    """Six cases, two per protocol of MIXED_PROTOCOLS_S, in one folder."""
    root = tmp_path_factory.mktemp("mixed")
    data = root / "data"
    for index, times_s in enumerate(MIXED_PROTOCOLS_S):
        config = PhantomConfig(shape=(48, 48, 32), times_s=times_s)
        for folder in simulate_cohort(root / f"p{index}", 2, seed=index, config=config, workers=1):
            case = load_case(folder)
            save_case(dataclasses.replace(case, case_id=f"p{index}_{case.case_id}"), data)
    return data


def test_iterunet_trains_on_a_cohort_of_mixed_protocols(mixed_cohort, tmp_path):
    trainer = build_trainer(mixed_cohort, tmp_path, tiny(preset("demo"), val_every=2))
    assert {len(case.times_s) for case in trainer.batches.cases} == {4, 6, 8}
    # Each step's patches share a protocol length; over steps every length comes up.
    lengths = [trainer.batches[step]["phases"].shape[1] for step in range(40)]
    assert set(lengths) == {4, 6, 8}
    metrics = trainer.fit(max_steps=4)
    validated = {len(case.times_s) for case in trainer.val_cases}
    assert max(validated) - 1 == max(
        int(key.removeprefix("val_enh_error_").removesuffix("dyn"))
        for key in metrics
        if key.endswith("dyn")
    )
    assert all(math.isfinite(value) for value in metrics.values())
    assert RunDir(tmp_path).config.n_targets == 6


def test_the_baseline_refuses_a_cohort_of_mixed_protocols(mixed_cohort, tmp_path):
    run = tmp_path / "run"
    result = train_cli(mixed_cohort, "--out", run, "--model", "baseline", "--max-steps", 1)
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {mixed_cohort}: the baseline predicts the phases of one protocol, but the "
        "cases have 4, 6, 8 phases; train iterU-Net on a mixed cohort, or the baseline on "
        "cases of one protocol\n"
    )
    assert not run.exists()


def test_a_regression_prior_is_fitted_on_the_training_cases_and_resumes_exactly(cohort, tmp_path):
    config = tiny(preset("demo", prior="regression"))
    straight = build_trainer(cohort, tmp_path / "straight", config)
    train_dirs, val_dirs = training_split(cohort, config.train)
    saved = RegressionModel.load(RunDir(tmp_path / "straight").prior_file)
    expected = fit_regression([lambda d=d: load_case(d) for d in train_dirs], config.regression)
    np.testing.assert_array_equal(saved.voxel.coef, expected.voxel.coef)
    np.testing.assert_array_equal(saved.lesion.coef, expected.lesion.coef)
    batch = straight.batches[0]
    # The prior's pre and 1dyn are the patch's own (before the phases' intensity noise).
    assert batch["prior"].shape == batch["phases"].shape
    np.testing.assert_allclose(
        straight.val_cases[0].prior[:2], straight.val_cases[0].phases[:2], atol=1e-5
    )
    straight.fit(max_steps=6)
    build_trainer(cohort, tmp_path / "resumed", config).fit(max_steps=5)
    resumed = build_trainer(cohort, tmp_path / "resumed", config, resume=True)
    resumed.fit(max_steps=6)
    assert_same_weights(weights(resumed), weights(straight))


def test_a_regression_prior_is_fitted_on_a_cohort_of_mixed_protocols(mixed_cohort, tmp_path):
    trainer = build_trainer(
        mixed_cohort, tmp_path, tiny(preset("demo", prior="regression"), val_every=2)
    )
    prior = RegressionModel.load(RunDir(tmp_path).prior_file)
    # The training cases' phases after 1dyn fall on at most 12 distinct times: each is a knot.
    later_s = {t - case.times_s[1] for case in trainer.batches.cases for t in case.times_s[2:]}
    assert prior.knots_s == sorted(later_s)
    for case in trainer.batches.cases:
        assert case.prior.shape == case.phases.shape
    metrics = trainer.fit(max_steps=4)
    assert all(math.isfinite(value) for value in metrics.values())


def test_a_case_of_two_phases_is_refused_by_name(cohort, tmp_path):
    data = tmp_path / "data"
    for folder in sorted(cohort.iterdir())[:2]:
        save_case(load_case(folder), data)
    case = load_case(sorted(cohort.iterdir())[0])
    short = dataclasses.replace(
        case, case_id="short", phases=case.phases[:2], times_s=case.times_s[:2]
    )
    save_case(short, data)
    result = train_cli(data, "--out", tmp_path / "run", "--max-steps", 1)
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {data / 'short'}: training needs at least 3 phases (pre, 2 post), got 2\n"
    )


def test_second_training_into_a_run_folder_exits_2(cohort, straight_run):
    run = straight_run["run"]
    config_before = (run / "config.json").read_bytes()
    result = train_cli(cohort, "--out", run, "--max-steps", 1)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {run}: holds a run already; use --resume")
    assert len(result.stderr.splitlines()) == 1
    assert (run / "config.json").read_bytes() == config_before


def test_resume_without_a_run_exits_2(cohort, tmp_path):
    result = train_cli(cohort, "--out", tmp_path, "--resume", "--max-steps", 1)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {tmp_path / 'config.json'}: not a run folder")
    assert len(result.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


# Without AVX-512 the CPU emulates bf16: this test then took 423 s of a 12-minute suite on
# an AVX2 CPU. bf16 is never the default there (`dcesynth.accel.use_bf16`).
NATIVE_BF16 = torch.cuda.is_available() or torch.backends.cpu.get_cpu_capability() == "AVX512"


@pytest.mark.skipif(not NATIVE_BF16, reason="bf16 is emulated on this CPU (no AVX-512)")
def test_bf16_autocast_trains_to_the_same_loss(tmp_path):
    """bf16 must not train to a worse loss than fp32 (the mean of the last three of eight
    steps; 10 % slack for the drift of the trajectories). The patch keeps 4x2x2 voxels at
    the U-Net's deepest level: on 2x2x1 or 2x2x2 voxels oneDNN's bf16 convolution backward
    gave gradients that differed from call to call, in any memory layout, on this project's
    CPU (see docs/performance.md)."""
    data = tmp_path / "cohort"
    simulate_cohort(data, 4, seed=0, config=PhantomConfig(shape=(64, 32, 32)), workers=1)
    losses = {}
    for precision, amp in (("fp32", False), ("bf16", True)):
        config = tiny(preset("demo"), patch=(64, 32, 32), amp=amp)
        trainer = build_trainer(data, tmp_path / precision, config)
        totals: dict[int, float] = {}

        def record(step, stage, terms, speed, totals=totals):
            totals[step] = terms["total"]

        trainer.fit(max_steps=8, on_step=record)
        losses[precision] = sum(totals[step] for step in (6, 7, 8)) / 3
    assert losses["bf16"] <= 1.10 * losses["fp32"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_on_rank(rank, data, run_root, results, port, config):
    """One torchrun-like rank: env:// rendezvous, its own run folder, 2 steps."""
    import os

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    with build_trainer(data, run_root / f"rank{rank}", config) as trainer:
        trainer.fit(max_steps=2)
        torch.save(
            {"weights": weights(trainer), "first_batch": trainer.batches[0]["phases"]},
            results / f"rank{rank}.pt",
        )


def test_two_gloo_ranks_keep_identical_weights_and_only_rank_0_writes(cohort, tmp_path):
    config = tiny(preset("demo"), warmup_steps=1, optim_steps=1)
    results = tmp_path / "results"
    results.mkdir()
    args = (cohort, tmp_path, results, free_port(), config)
    context = torch.multiprocessing.spawn(train_on_rank, args=args, nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("DDP ranks did not finish within 300 s")

    rank0, rank1 = (torch.load(results / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.equal(rank0["first_batch"], rank1["first_batch"])
    assert_same_weights(rank1["weights"], rank0["weights"])
    torch.manual_seed(config.train.seed)
    initial = build_model("iterunet", TINY_FEATURES, True, 4).state_dict()
    assert any(not torch.equal(rank0["weights"][k], v) for k, v in initial.items())
    assert (tmp_path / "rank0" / "checkpoints" / "last.safetensors").is_file()
    assert not (tmp_path / "rank1").exists()


REALLOCATION_SCRIPT = """
import resource, statistics, sys, torch
from dcesynth.accel.cpu import keep_freed_host_memory
applied = keep_freed_host_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(10):  # 64 MiB: allocated, written and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(2**24)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, statistics.median(faults))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc")
def test_keep_freed_host_memory_reuses_freed_pages():
    """After it, a freed 64 MiB tensor's pages serve the next ones: the median allocation of
    ten faults no page in, where with glibc's defaults each faults in all 16384 again (the
    first allocations settle the heap either way, hence the median)."""
    faults = {}
    for mode in ("keep", "default"):
        result = subprocess.run(
            [sys.executable, "-c", REALLOCATION_SCRIPT, mode],
            capture_output=True, text=True, check=True, timeout=120,
        )  # fmt: skip
        applied, faults[mode] = result.stdout.split()
        assert applied == {"keep": "True", "default": "None"}[mode]
    assert float(faults["default"]) >= 16384
    assert float(faults["keep"]) < 100


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--prior", "x"), "--prior: unknown prior 'x'; choose none, regression"),
        (
            ("--model", "baseline", "--prior", "regression"),
            "--prior: only iterunet starts from a prior, not baseline",
        ),
    ],
)
def test_a_prior_for_another_model_or_an_unknown_prior_is_refused(cohort, tmp_path, args, message):
    result = train_cli(cohort, "--out", tmp_path / "run", *args)
    assert (result.exit_code, result.stderr) == (2, f"error: {message}\n")
    assert not (tmp_path / "run").exists()
