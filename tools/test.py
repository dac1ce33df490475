"""Test (evaluate) an mmdet or mmseg model from a config and a checkpoint.

Its command line is nat_mm/tools/test.py, so an installed nat_mm has it too:
``python -m nat_mm.tools.test``. Options: ``--help``.
"""

import sys

from nat_mm.tools.test import main

if __name__ == '__main__':
    sys.exit(main())
