"""`python -m vlclassify ...` (and `torchrun ... -m vlclassify extract ...`): the CLI."""

from .cli import main

if __name__ == "__main__":  # importing the module (e.g. the wheel check's import of every module) runs nothing
    main()
