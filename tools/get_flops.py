"""Parameters and GFLOPs of a NAT / DiNAT model: a whole mmdet / mmseg config or a bare backbone.

Its command line is nat_mm/tools/get_flops.py, so an installed nat_mm has it too:
``python -m nat_mm.tools.get_flops``. Options: ``--help``.
"""

import sys

from nat_mm.tools.get_flops import main

if __name__ == '__main__':
    sys.exit(main())
