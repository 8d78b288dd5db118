#!/usr/bin/env python
"""Run a resnet-lab sweep: `python sweep.py sweeps/quickstart.yaml` (see README)."""

import sys

from resnet_lab.cli import main

if __name__ == "__main__":
    sys.exit(main())
