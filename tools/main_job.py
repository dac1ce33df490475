"""The main job (``make demo``): demo data; the untrained and trained Mask R-CNN + NAT, UPerNet +
DiNAT and Mask2Former + NAT evaluated and painted; a summary.

Its command line is nat_mm/tools/main_job.py, so an installed nat_mm has it too:
``python -m nat_mm.tools.main_job``. Options: ``--help``.
"""

import sys

from nat_mm.tools.main_job import main

if __name__ == '__main__':
    sys.exit(main())
