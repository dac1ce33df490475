"""Convert NAT / DiNAT checkpoints between the original, mmdet/mmseg and HuggingFace layouts.

Its command line is nat_mm/tools/convert_checkpoint.py, so an installed nat_mm has it too:
``python -m nat_mm.tools.convert_checkpoint``. Options: ``--help``.
"""

import sys

from nat_mm.tools.convert_checkpoint import main

if __name__ == '__main__':
    sys.exit(main())
