"""``python -m node.cli``: the same as ``dicom-node``."""

import sys

from node.cli import main

sys.exit(main())
