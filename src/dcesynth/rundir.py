"""A run folder: the one place that knows where a training run keeps what, and reads it.

Layout::

    RUN/config.json                      resolved RunConfig (see dcesynth.config)
    RUN/checkpoints/last.safetensors     weights at the last saved step
    RUN/checkpoints/last_state.pt        step, stage, optimizer and scheduler state
    RUN/checkpoints/best.safetensors     weights with the lowest validation error
    RUN/checkpoints/warmup.safetensors   weights at the end of the warm-up stage
    RUN/log.jsonl                        one JSON line per validation
    RUN/train.log                        the human-readable log
    RUN/regression.safetensors           the fitted model of a regression run (no checkpoints)
    RUN/prior.safetensors                the regression model an iterU-Net run steps from
                                         (``ModelConfig.prior``), fitted on its training cases

Every other module asks a :class:`RunDir` for these paths rather than spelling them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dcesynth.config import RunConfig
from dcesynth.io import InputError, atomic_write_json, check_writable_dir
from dcesynth.train.checkpoint import weights_metadata


class _RunFile:
    """A file or folder of a run at a fixed place below the run folder (a descriptor)."""

    def __init__(self, *parts: str, doc: str):
        self.parts = parts
        self.__doc__ = doc

    def __get__(self, run: RunDir | None, owner: type | None = None):
        return self if run is None else run.path.joinpath(*self.parts)


class RunDir:
    """The files of one run folder (which need not exist yet) and what they say.

    Args:
        path: the run folder, ``RUN``.
    """

    config_file = _RunFile("config.json", doc="The resolved RunConfig.")
    checkpoints = _RunFile("checkpoints", doc="The folder of weights and training state.")
    last_weights = _RunFile("checkpoints", "last.safetensors", doc="Weights at the last save.")
    state = _RunFile(
        "checkpoints", "last_state.pt", doc="The training state saved with ``last_weights``."
    )
    best_weights = _RunFile(
        "checkpoints", "best.safetensors", doc="Weights with the lowest validation error."
    )
    warmup_weights = _RunFile(
        "checkpoints", "warmup.safetensors", doc="Weights at the end of the warm-up stage."
    )
    log_jsonl = _RunFile("log.jsonl", doc="One JSON line per validation.")
    train_log = _RunFile("train.log", doc="The human-readable log.")
    regression_file = _RunFile("regression.safetensors", doc="A regression run's fitted model.")
    prior_file = _RunFile(
        "prior.safetensors", doc="The regression model a network run with a prior steps from."
    )

    def __init__(self, path: Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config(self) -> RunConfig:
        """The run's config, read from ``config.json``.

        Raises:
            InputError: no config.json (not a run folder) or one that is not a RunConfig.
        """
        path = self.config_file
        if not path.is_file():
            raise InputError(f"{path}: not a run folder (config.json missing)")
        try:
            return RunConfig.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{path}: invalid run config ({exc})") from exc

    def write_config(self, config: RunConfig) -> None:
        """Write ``config`` to ``config.json`` atomically (the folder must exist)."""
        atomic_write_json(self.config_file, config.to_json())

    def create(self, config: RunConfig) -> None:
        """Make the folder and its checkpoints folder, check they are writable, write ``config``."""
        check_writable_dir(self.checkpoints)
        self.write_config(config)

    @property
    def started(self) -> bool:
        """Whether training saved something to resume from: a state or a regression fit."""
        return self.state.is_file() or self.regression_file.is_file()

    def check_unused(self) -> None:
        """Refuse to start a new run in a folder that holds one.

        Raises:
            InputError: a training state or a fitted regression model is there.
        """
        if self.started:
            raise InputError(f"{self.path}: holds a run already; use --resume or a new --out")

    def append_log(self, record: dict[str, Any]) -> None:
        """Add one validation record as a JSON line to ``log.jsonl``."""
        with open(self.log_jsonl, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def weights_for_prediction(self) -> Path:
        """The weights ``predict`` loads: the regression model, else best, else last.

        Raises:
            InputError: not a run folder, or a network run without best or last weights.
        """
        if self.config.model.name == "regression":
            return self.regression_file
        for path in (self.best_weights, self.last_weights):
            if path.is_file():
                return path
        raise InputError(f"{self.checkpoints}: no best.safetensors or last.safetensors")

    @property
    def n_targets(self) -> int:
        """Phases after 1dyn that the run's model predicts.

        From config.json; a run whose config does not record it keeps it in the
        metadata of its weights (1 when absent there too).

        Raises:
            InputError: not a run folder, no weights, or metadata that is not a
                positive integer.
        """
        recorded = self.config.n_targets
        if recorded is not None:
            return recorded
        weights = self.weights_for_prediction()
        text = weights_metadata(weights).get("n_targets", "1")
        if not text.isdigit() or int(text) < 1:
            raise InputError(
                f"{weights}: metadata n_targets must be a positive integer, got {text!r}"
            )
        return int(text)
