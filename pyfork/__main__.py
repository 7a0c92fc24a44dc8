"""`python -m pyfork ...`: the same command line as the `pyfork` script (pyfork/cli.py)."""

from pyfork.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
