"""`python -m mythos ...` is the `mythos` command (torchrun needs a module: torchrun -m mythos train ...)."""

from .cli import main

main()
