"""``python -m adamix_zoo``: the CLI, also as a module for launchers (``torchrun -m adamix_zoo train``)."""

from adamix_zoo.cli import main

if __name__ == "__main__":
    main()
