"""``python -m qevo.sharing --config configs/<name>.py [--config.key=value ...] [--workdir DIR]``:
the command of :data:`qevo.sharing.method.METHOD` (:func:`qevo.cli.main`)."""

import sys

from qevo.cli import main
from qevo.sharing.method import METHOD

if __name__ == "__main__":
    sys.exit(main(f"qevo.{METHOD.name}", METHOD.run, METHOD.validate))
