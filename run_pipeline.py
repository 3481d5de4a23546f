"""Runs the U-Net pipeline: python run_pipeline.py --stage all (see --help)."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
