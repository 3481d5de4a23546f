"""Lets the TFDS builders import `pipeline` from this checkout where it is not installed.

`tfds build datasets/<name>` imports a builder as the package `<name>`, with `datasets/`
first on `sys.path` while it does, so each builder package's `__init__.py` can import
this module by its plain name before `pipeline` is importable. Where the project is
installed (`pip install -e '.[tfds-cli]'`, the documented way to a working `tfds`
command), it does nothing. A builder module loaded by its file path needs `pipeline`
importable already.
"""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("pipeline") is None:
    # Appended, not prepended: the checkout's other folders must shadow no installed module.
    sys.path.append(str(Path(__file__).resolve().parents[1]))
