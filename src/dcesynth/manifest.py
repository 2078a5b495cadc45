"""The manifest of a predictions folder: which run predicted which phases of each case.

``predict`` writes ``OUT/predictions.json`` beside the case folders it writes, and
rewrites it after every case, keeping the entries of cases predicted before;
``evaluate`` reads it to know the phases a model predicted. Predictions from other
tools have no manifest: ``read_manifest`` gives None and the files themselves are
looked at. Keys (docs/run-folder.md)::

    {"cases": {"phantom_0000": {"run": "/abs/path/RUN", "model": "iterunet",
                                "inputs": ["pre", "1dyn"],
                                "phases": ["2dyn", "3dyn", "4dyn", "5dyn"],
                                "times_s": [155.0, 225.0, 295.0, 365.0]}, ...}}
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dcesynth.case import phase_names
from dcesynth.io import InputError, atomic_write_json

MANIFEST_NAME = "predictions.json"


@dataclass(frozen=True)
class PredictedCase:
    """How one case's phases were predicted.

    Attributes:
        run: the run folder of the model, absolute.
        model: the run's model name (``ModelConfig.name``).
        inputs: the observed phases the model was given, ``pre, 1dyn[, 2dyn...]``.
        phases: the predicted phases, in order (the phases after ``inputs``).
        times_s: their times, seconds after injection.
    """

    run: str
    model: str
    inputs: tuple[str, ...]
    phases: tuple[str, ...]
    times_s: tuple[float, ...]

    @property
    def first_predicted(self) -> int:
        """Index of the first predicted phase in the case's series (2 for pre, 1dyn in)."""
        return len(self.inputs)

    @classmethod
    def from_json(cls, data: Any) -> PredictedCase:
        """An entry of the manifest; ValueError naming what is wrong with it."""
        if not isinstance(data, dict):
            raise ValueError(f"expected an object, got {data!r}")
        entry = cls(
            run=_text(data, "run"),
            model=_text(data, "model"),
            inputs=tuple(_list(data, "inputs", str)),
            phases=tuple(_list(data, "phases", str)),
            times_s=tuple(float(t) for t in _list(data, "times_s", int | float)),
        )
        names = phase_names(len(entry.inputs) + len(entry.phases))
        if len(entry.inputs) < 2 or list(entry.inputs + entry.phases) != names:
            raise ValueError(f"inputs and phases must be pre, 1dyn, ..., got {list(names)}")
        if len(entry.times_s) != len(entry.phases):
            raise ValueError(f"{len(entry.times_s)} times for {len(entry.phases)} phases")
        return entry


def _text(data: dict, key: str) -> str:
    if not isinstance(data.get(key), str):
        raise ValueError(f"{key!r} must be text")
    return data[key]


def _list(data: dict, key: str, kind) -> list:
    value = data.get(key)
    if not isinstance(value, list) or not all(isinstance(item, kind) for item in value):
        raise ValueError(f"{key!r} must be a list")
    return value


def manifest_path(pred_dir: Path) -> Path:
    """Where the manifest of a predictions folder lives."""
    return Path(pred_dir) / MANIFEST_NAME


def read_manifest(pred_dir: Path) -> dict[str, PredictedCase] | None:
    """Case id -> how it was predicted, from ``pred_dir``'s manifest; None without one.

    Raises:
        InputError: a manifest that is not valid JSON or not in the layout above.
    """
    path = manifest_path(pred_dir)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("cases"), dict):
            raise ValueError("expected an object with 'cases'")
        return {str(case): PredictedCase.from_json(e) for case, e in data["cases"].items()}
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: invalid predictions manifest ({exc})") from exc


def write_manifest(pred_dir: Path, cases: dict[str, PredictedCase]) -> None:
    """Write ``pred_dir``'s manifest listing ``cases`` (case id -> entry), atomically."""
    atomic_write_json(
        manifest_path(pred_dir),
        {"cases": {name: asdict(entry) for name, entry in sorted(cases.items())}},
    )
