"""`python -m vlclassify ...` (and `torchrun ... -m vlclassify extract ...`): the CLI."""

from .cli import main

main()
