"""What the console shows: Keras' live progress bars on a terminal, plain lines in logs.

Keras draws its bars with carriage returns and ANSI colours, which turn a log file that
is not a terminal (a batch job's output, `tee`, CI) into escape codes; there its verbose
mode 2 writes one plain line per bar or epoch instead.
"""

from __future__ import annotations

import sys

import keras


def verbosity() -> int:
    """Keras' `verbose`: 1 (live bar) on a terminal, 2 (one plain line) elsewhere."""
    return 1 if sys.stdout.isatty() else 2


def progress_bar(total: int, unit: str) -> keras.utils.Progbar:
    """A progress bar over `total` units, live on a terminal, one plain line in a log."""
    return keras.utils.Progbar(total, unit_name=unit, verbose=verbosity())
