"""The base model's half of a before/after capability measurement, kept on disk.

Every edit of a model is measured against the same base: its per-item task results and, for the
log-likelihood tasks, the hidden states entering the edited layer (replay.py). Kept in a
directory (`evaluate.py --capability-cache DIR`), they are computed once per model, task and
layer, and each later measurement pays for its edited weights only. An entry is found by a hash
of everything its numbers depend on: the base weights' bytes, the task's documents and batch
sizes, the layer, the dtype, device type and thread count (floating-point sums depend on them,
and an unedited model must still score a change of exactly 0), the torch version, and the code
that computes them (its syntax trees without docstrings: comments and documentation may change).
Anything else is a miss, and a miss is computed and written.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from replay import Replay

ROOT = Path(__file__).resolve().parent
SOURCES = ["model.py", "capability.py", "generate.py", "replay.py", "data.py", "tokenizer.py", "basecache.py"]


def code_digest(source: str) -> str:
    """The code of a module, not its comments or docstrings: editing those keeps what was kept."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().flatten().view(torch.uint8).numpy())
    return h.hexdigest()


class BaseCache(dict):
    """`capability.before_after`'s `base_cache` that also reads and writes `root`. Keys:
    (task, digest of its documents and batch sizes) -> the base results; (task, digest, L) -> a
    recorded Replay. Build it while the model holds its base weights."""

    def __init__(self, root, model):
        super().__init__()
        self.root, self.model = Path(root), model
        self.root.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256(weights_digest(model).encode())
        for name in SOURCES:
            h.update(code_digest((ROOT / name).read_text(encoding="utf-8")).encode())
        p = next(model.parameters())
        h.update(json.dumps([str(p.dtype), p.device.type, torch.get_num_threads(), torch.__version__]).encode())
        self.stamp = h.hexdigest()[:20]

    def _path(self, key) -> Path:
        return self.root / ("-".join([self.stamp, *map(str, key)]) + (".safetensors" if len(key) == 3 else ".json"))

    def __contains__(self, key) -> bool:
        return dict.__contains__(self, key) or self._path(key).exists()

    def __getitem__(self, key):
        if not dict.__contains__(self, key):
            path = self._path(key)
            if len(key) == 2:
                dict.__setitem__(self, key, json.loads(path.read_text()))
            else:
                t = load_file(str(path))
                r = Replay(self.model, key[2])
                r.kept = [(t[f"ids.{i}"], t[f"h.{i}"]) for i in range(len(t) // 2)]
                r.full = True  # a replay needs nothing more
                dict.__setitem__(self, key, r)
        return dict.__getitem__(self, key)

    def __setitem__(self, key, value):
        dict.__setitem__(self, key, value)
        path = self._path(key)
        if path.exists():
            return
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")  # written whole, then renamed
        if len(key) == 2:
            tmp.write_text(json.dumps(value))
        else:
            save_file({f"{k}.{i}": t.contiguous() for i, kept in enumerate(value.kept) for k, t in zip(("ids", "h"), kept)},
                      str(tmp))
        tmp.rename(path)
