"""Export a NAT / DiNAT network to ONNX or an ExportedProgram and check it against eager PyTorch.

Its command line is nat_mm/tools/export.py, so an installed nat_mm has it too:
``python -m nat_mm.tools.export``. Options: ``--help``.
"""

import sys

from nat_mm.tools.export import main

if __name__ == '__main__':
    sys.exit(main())
