"""Let the tests run from a source checkout too: when the package is not installed, import it
from ../src."""

import sys
from pathlib import Path

try:
    import vlmkit_example_connector  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
