import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project is a set of top-level scripts, not a package
sys.path.insert(0, str(ROOT / "tests"))  # shared test helpers (tiny.py)
