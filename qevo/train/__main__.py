"""``python -m qevo.train --config configs/<name>.py [--config.key=value ...] [--workdir DIR]``:
the command of :data:`qevo.train.method.METHOD` (:func:`qevo.cli.main`)."""

import sys

from qevo.cli import main
from qevo.train.method import METHOD

if __name__ == "__main__":
    sys.exit(main(f"qevo.{METHOD.name}", METHOD.run, METHOD.validate))
