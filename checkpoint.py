"""Crash safety: a run's state after every epoch (so `--resume` continues it bit for bit), and
output directories that appear whole or not at all. Nothing is ever half-written: files are
written under a temporary name and renamed into place; Ctrl-C leaves the last whole state."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from distributed import world_and_rank
from preflight import EditError, partial_dir


@dataclass
class Checkpoint:
    """Where a run keeps its state after every epoch, and what a run resuming it must share with
    it (the hyper-parameters, the edits, the base tensors)."""
    path: Path
    fingerprint: dict
    stop_loss: float  # a run whose last epoch's mean loss is below it had stopped early

    def save(self, state: dict, params: dict[str, nn.Parameter], log: dict):
        """Write atomically: a temporary file renamed over the last checkpoint."""
        if world_and_rank()[1] != 0:
            return
        state = {**state, "params": {n: p.detach().cpu() for n, p in params.items()}, "log": log,
                 "fingerprint": self.fingerprint}
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            torch.save(state, tmp)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)  # Ctrl-C mid-write: the last whole checkpoint stays

    def restore(self, params, opt, shuffle, log: dict, say) -> int:
        """Put the saved state back; returns the epochs (or edits) it had done."""
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state["params"][n])
        if opt is not None:
            opt.load_state_dict(state["opt"])
            shuffle.set_state(state["shuffle"])
        log.update(state["log"])
        say(f"resuming from {self.path} after {'epoch' if opt is not None else 'edit'} {state['epoch']}")
        stopped = log.get("epochs") and log["epochs"][-1]["mean_loss"] < self.stop_loss
        return 10**9 if stopped else state["epoch"]  # a run that had stopped early trains no more


class Interrupted(Exception):
    """Ctrl-C during a run; the message says what is left."""


def start(out: Path, fingerprint: dict, resume: bool, stop_loss: float) -> Checkpoint:
    """The run's OUT.partial directory (emptied unless resuming) and its checkpoint file."""
    partial = partial_dir(out)
    if world_and_rank()[1] == 0:
        if partial.exists() and not resume:  # --overwrite: start over
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
    return Checkpoint(partial / "checkpoint.pt", fingerprint, stop_loss)


@contextmanager
def keep_or_clean(checkpoint: Checkpoint):
    """Around training: Ctrl-C keeps the last whole state for --resume (or removes an empty
    OUT.partial); a failed run removes it."""
    try:
        yield
    except KeyboardInterrupt:
        if checkpoint.path.exists():
            raise Interrupted(f"interrupted; --resume continues from the state in {checkpoint.path.parent}") from None
        shutil.rmtree(checkpoint.path.parent, ignore_errors=True)
        raise Interrupted("interrupted; no half-written output is left") from None
    except EditError:
        shutil.rmtree(checkpoint.path.parent, ignore_errors=True)
        raise


def atomic_dir(final: Path, write, overwrite: bool):
    """Build a directory next to `final`, then move it into place; nothing half-written remains."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if final.exists():
            if not overwrite:
                raise EditError(f"{final} exists; pass --overwrite to replace it")
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
