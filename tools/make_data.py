"""Generate the embedded demo datasets (COCO instances + panoptic, ADE20K) with a progress bar.

Its command line is nat_mm/tools/make_data.py, so an installed nat_mm has it too:
``python -m nat_mm.tools.make_data``. Options: ``--help``.
"""

import sys

from nat_mm.tools.make_data import main

if __name__ == '__main__':
    sys.exit(main())
