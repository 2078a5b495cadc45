"""Property: randomly damaged files give the documented error or a valid result, never a crash.

``load_case`` and the importers are given case folders with one file damaged at
random (truncated, bytes flipped in the gzip stream or in the NIfTI header, replaced
by garbage, emptied or deleted). Each either succeeds with a valid case or raises
InputError; an import never leaves a partial case behind.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcesynth.case import load_case, save_case
from dcesynth.data.importers import import_cohort
from dcesynth.io import InputError
from test_case import make_case
from test_importers import _write_mamamia, _write_reference

KINDS = ("truncate", "flip", "header", "garbage", "empty", "delete")
FEW = settings(max_examples=25, deadline=None)


@st.composite
def damages(draw, names: list[str]) -> tuple[str, str, float, int]:
    """(file name, kind of damage, where in the file (0-1), byte to XOR in)."""
    return (
        draw(st.sampled_from(names)),
        draw(st.sampled_from(KINDS)),
        draw(st.floats(0.0, 1.0)),
        draw(st.integers(1, 255)),
    )


def damage(path: Path, kind: str, where: float, byte: int) -> None:
    data = bytearray(path.read_bytes())
    if kind == "delete":
        path.unlink()
    elif kind == "truncate":
        path.write_bytes(data[: int(where * len(data))])
    elif kind == "flip":
        data[int(where * (len(data) - 1))] ^= byte
        path.write_bytes(data)
    elif kind == "header" and path.name.endswith(".nii.gz"):
        # Inside the gzip stream: what nibabel parses (dims, datatype, scaling, offset).
        raw = bytearray(gzip.decompress(data))
        raw[int(where * 351)] ^= byte
        path.write_bytes(gzip.compress(bytes(raw)))
    elif kind in ("header", "garbage"):
        path.write_bytes(bytes((i * byte) % 256 for i in range(len(data))))
    else:
        path.write_bytes(b"")


CASE_FILES = [f"{name}.nii.gz" for name in make_case().phase_names] + [
    "seg.nii.gz",
    "roi.nii.gz",
    "meta.json",
]


@FEW
@given(damages(CASE_FILES))
def test_load_case_of_a_damaged_case_is_valid_or_an_input_error(hit):
    name, kind, where, byte = hit
    with tempfile.TemporaryDirectory() as root:
        case_dir = save_case(make_case(), Path(root))
        damage(case_dir / name, kind, where, byte)
        try:
            case = load_case(case_dir)
        except InputError:
            return
        case.validate()


def assert_no_partial_output(out: Path, raised: bool) -> None:
    """Only whole, loadable cases in ``out``, no temporary folders; no ``out`` if none."""
    if raised:
        assert not out.exists()
        return
    for folder in out.iterdir():
        assert not folder.name.startswith("."), folder
        load_case(folder)


def import_damaged(kind: str, write_source, hit) -> None:
    """Write a one-case source, damage one file of it, import it into a fresh folder."""
    name, how, where, byte = hit
    with tempfile.TemporaryDirectory() as root:
        src, out = Path(root) / "src", Path(root) / "out"
        write_source(src)
        damage(src / name, how, where, byte)
        try:
            import_cohort(kind, src, out)
        except InputError:
            assert_no_partial_output(out, raised=True)
        else:
            assert_no_partial_output(out, raised=False)


REFERENCE_FILES = [f"P_01/{name}.nii.gz" for name in ("pre", "1dyn", "3dyn", "5dyn", "seg", "roi")]


@FEW
@given(damages(REFERENCE_FILES))
def test_reference_import_of_a_damaged_case_never_crashes_or_leaves_partial_output(hit):
    import_damaged("reference", lambda src: _write_reference(src, "P_01"), hit)


MAMAMIA_FILES = [
    "images/P_01/p_01_0000.nii.gz",
    "images/P_01/p_01_0001.nii.gz",
    "images/P_01/p_01_0002.nii.gz",
    "segmentations/expert/p_01.nii.gz",
    "patient_info_files/p_01.json",
]


@FEW
@given(damages(MAMAMIA_FILES))
def test_mamamia_import_of_a_damaged_case_never_crashes_or_leaves_partial_output(hit):
    times = {"acquisition_times": [0, 90, 180]}
    import_damaged("mama-mia", lambda src: _write_mamamia(src, "P_01", 3, times), hit)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_damage_changes_the_file(tmp_path, kind):
    path = tmp_path / "meta.json"
    path.write_text(json.dumps({"times_s": [0, 85]}))
    before = path.read_bytes()
    damage(path, kind, 0.5, 7)
    assert not path.exists() or path.read_bytes() != before
