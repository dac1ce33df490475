"""Train an mmdet or mmseg model (NAT / DiNAT backbones included) from a config.

Its command line is nat_mm/tools/train.py, so an installed nat_mm has it too:
``python -m nat_mm.tools.train``. Options: ``--help``.
"""

import sys

from nat_mm.tools.train import main

if __name__ == '__main__':
    sys.exit(main())
