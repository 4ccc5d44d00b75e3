"""``python -m qevo.compress``: the former name of ``python -m qevo.sharing``, which it runs
after a one-line notice (the old name goes in the next release)."""

import sys

if __name__ == "__main__":
    from qevo.cli import main
    from qevo.sharing.method import METHOD

    print("qevo: python -m qevo.compress is now python -m qevo.sharing (the old name goes in the next release)",
          file=sys.stderr)
    sys.exit(main("qevo.sharing", METHOD.run, METHOD.validate))
