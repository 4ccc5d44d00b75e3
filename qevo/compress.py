"""``python -m qevo.compress``: the former name of ``python -m qevo.sharing``, which it runs
after a one-line notice (the old name goes in the next release)."""

import runpy
import sys

if __name__ == "__main__":
    print("qevo: python -m qevo.compress is now python -m qevo.sharing (the old name goes in the next release)",
          file=sys.stderr)
    runpy.run_module("qevo.sharing", run_name="__main__", alter_sys=True)
