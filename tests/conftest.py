"""Test-wide settings.

One thread per process: the models in the tests are tiny, and on a busy 2-core
machine two OpenMP threads per process make 3-D convolutions up to 20x slower
(threads spin while waiting for a core). Set before torch is imported, so that
the processes a test spawns (the DDP test) inherit it.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
