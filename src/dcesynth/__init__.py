"""dcesynth: synthesize delayed-phase breast DCE-MRI from pre + early phase (iterU-Net)."""

__version__ = "0.1.0"
