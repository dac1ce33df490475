"""Run a trained mmdet or mmseg model on an image or a folder and save painted predictions.

Its command line is nat_mm/tools/demo.py, so an installed nat_mm has it too:
``python -m nat_mm.tools.demo``. Options: ``--help``.
"""

import sys

from nat_mm.tools.demo import main

if __name__ == '__main__':
    sys.exit(main())
