"""`python -m dcesynth ...`, also what `torchrun -m dcesynth train ...` runs."""

from dcesynth.cli import main

main()
