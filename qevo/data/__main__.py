"""``python -m qevo.data --name NAME --out ARCHIVE.tar.gz``: the command of
:func:`qevo.data.datasets.main`."""

import sys

from qevo.data.datasets import main

if __name__ == "__main__":
    sys.exit(main())
