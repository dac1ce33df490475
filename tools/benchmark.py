"""Speed and peak memory of a NAT / DiNAT model next to its Swin-T peer, measured the same way.

Its command line is nat_mm/tools/benchmark.py, so an installed nat_mm has it too:
``python -m nat_mm.tools.benchmark``. Options: ``--help``.
"""

import sys

from nat_mm.tools.benchmark import main

if __name__ == '__main__':
    sys.exit(main())
