"""File I/O that never leaves partial output: temp file in the target folder, then rename.

NIfTI is read and written through nibabel. Compressed files are gzipped here with
``mtime=0`` so that the same image always gives the same bytes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np


class InputError(ValueError):
    """Bad user input (file, argument or data); the CLI prints it as one `error:` line."""


AFFINE_ATOL = 1e-4


def _umask() -> int:
    """The process umask (os.umask can only be read by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            # mkstemp makes the file private (0600); give it the mode open() would have.
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: object) -> None:
    """Write ``obj`` as indented UTF-8 JSON, atomically."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def gzip_bytes(raw: bytes) -> bytes:
    """Gzip ``raw`` deterministically (header mtime 0) with zlib's run-length strategy.

    Noisy float32 images barely compress (about 10 %) whatever the effort, and masks
    are long runs: Z_RLE gives the same sizes as gzip level 1 at a third of its time.
    """
    compressor = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS, 8, zlib.Z_RLE)
    return compressor.compress(raw) + compressor.flush()


def nifti_bytes(array: np.ndarray, affine: np.ndarray, compress: bool = True) -> bytes:
    """Encode a 3-D array and its 4x4 affine as (gzipped, deterministic) NIfTI-1 bytes."""
    image = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm", "sec")
    raw = image.to_bytes()
    return gzip_bytes(raw) if compress else raw


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write one NIfTI image atomically; ``.nii.gz`` names are gzipped."""
    path = Path(path)
    atomic_write_bytes(path, nifti_bytes(array, affine, compress=path.name.endswith(".gz")))


NIFTI_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    zlib.error,
    nib.filebasedimages.ImageFileError,
    nib.spatialimages.HeaderDataError,
    nib.spatialimages.ImageDataError,
)
"""What nibabel raises for a missing, damaged or foreign file."""


@contextmanager
def _nibabel_quiet() -> Iterator[None]:
    """Silence nibabel's own stderr log of header problems: the InputError reports them."""
    logger = nib.imageglobals.logger
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _unreadable(path: Path, exc: Exception) -> InputError:
    return InputError(f"{path}: cannot read NIfTI ({exc.__class__.__name__}: {exc})")


def _open_nifti(path: Path) -> nib.Nifti1Image:
    """The image with its header read, its data not yet; InputError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        with _nibabel_quiet():
            return nib.load(path)
    except NIFTI_ERRORS as exc:
        raise _unreadable(path, exc) from exc


def nifti_shape(path: Path) -> tuple[int, ...]:
    """The shape in a NIfTI header, read without the data (``load_nifti`` checks the rest)."""
    return tuple(int(n) for n in _open_nifti(path).shape)


def load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3-D NIfTI image.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        ``(array, affine)``: the (X, Y, Z) data as stored (scaled to float when the
        header asks for it) and the 4x4 float64 affine.

    Raises:
        InputError: missing, unreadable or truncated file, or not 3-D.
    """
    image = _open_nifti(path)
    try:
        with _nibabel_quiet():
            data = np.asanyarray(image.dataobj)
    except NIFTI_ERRORS as exc:
        raise _unreadable(path, exc) from exc
    data = np.squeeze(data) if data.ndim > 3 and all(n == 1 for n in data.shape[3:]) else data
    if data.ndim != 3:
        raise InputError(f"{path}: expected a 3-D image, got shape {tuple(data.shape)}")
    return data, np.asarray(image.affine, dtype=np.float64)


@contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """Build a folder under a temporary name beside ``target``; rename it on success.

    On any error the temporary folder is removed and ``target`` is left untouched;
    an existing ``target`` is replaced only once the new one is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        # mkdtemp makes the folder private (0700); give it the mode mkdir() would have.
        staging.chmod(0o777 & ~_umask())
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists (absolute)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def check_output_dir(path: Path, option: str | None = None) -> Path:
    """Check, without creating anything, that ``path`` can be made a folder and written to.

    Args:
        path: the output folder (need not exist yet).
        option: the option that named it (``"--out"``), for the message.

    Raises:
        InputError: ``path`` or one of its ancestors is a file, or the closest existing
            ancestor is not writable.
    """
    path = Path(path)
    name = f"{option} {path}" if option else str(path)
    existing = nearest_existing(path)
    if not existing.is_dir():
        raise InputError(f"{name}: output folder is not writable ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{name}: output folder is not writable ({existing} is read-only)")
    return path


def check_writable_dir(path: Path) -> Path:
    """Create ``path`` if needed and check we can write in it; InputError otherwise."""
    path = check_output_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe.", delete=True)
        probe.close()
    except OSError as exc:
        raise InputError(f"{path}: output folder is not writable ({exc.strerror})") from exc
    return path
