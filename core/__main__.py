"""``python -m kvmmu``: the same as the ``kvmmu`` command."""

from kvmmu.cli import main

main()
