"""``python -m qevo.export --workdir RUN [--model NAME] --out FILE.onnx [--verify]``: the
command of :func:`qevo.export.exporter.main`."""

import sys

from qevo.export.exporter import main

if __name__ == "__main__":
    sys.exit(main())
