"""Benchmark the na2d backends against Swin-style window attention (and the gather oracle).

Its command line is nat_mm/tools/benchmark_na.py, so an installed nat_mm has it too:
``python -m nat_mm.tools.benchmark_na``. Options: ``--help``.
"""

import sys

from nat_mm.tools.benchmark_na import main

if __name__ == '__main__':
    sys.exit(main())
