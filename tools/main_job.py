"""The main job (``make demo``): demo data, then train, evaluate and paint a Mask R-CNN + NAT and

Its command line is nat_mm/tools/main_job.py, so an installed nat_mm has it too:
``python -m nat_mm.tools.main_job``. Options: ``--help``.
"""

import sys

from nat_mm.tools.main_job import main

if __name__ == '__main__':
    sys.exit(main())
