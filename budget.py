"""When LocFT-BF stops training: the step budget.

After every epoch, in this order:
1. early stop (the paper's): the epoch's mean loss is below the stop loss (1e-2); the set is learnt;
2. plateau: for `patience` epochs no new edit has been learnt and the mean loss has not fallen
   by `min_gain` (relative) below its best before them; more epochs stopped helping;
3. the cap: `epochs` epochs.
"""
from __future__ import annotations

AUTHORS = {"epochs": 25, "batch_size": 100, "patience": 0}  # the LocFT authors' script: 25 epochs of 100


def stop(epochs: list[dict], hp, stop_loss: float) -> str | None:
    """Why training stops after the last of `epochs` (the log's entries: mean_loss, learnt), or None."""
    last = epochs[-1]
    if last["mean_loss"] < stop_loss:
        return f"early stop: mean loss below {stop_loss:g}"
    if plateau(epochs, hp.patience, hp.min_gain):
        return f"plateau: no edit learnt and the loss down less than {hp.min_gain:.0%} in {hp.patience} epochs"
    if last["epoch"] >= hp.epochs:
        return f"epoch cap: {hp.epochs} epochs"
    return None


def plateau(epochs: list[dict], patience: int, min_gain: float) -> bool:
    """The last `patience` epochs learnt no edit beyond the best count before them, and their best
    loss is above (1 - min_gain) x the best loss before them. `patience` 0: never."""
    if not patience or len(epochs) <= patience:
        return False
    before, recent = epochs[:-patience], epochs[-patience:]
    no_new = max(e["learnt"] for e in recent) <= max(e["learnt"] for e in before)
    flat = min(e["mean_loss"] for e in recent) > (1 - min_gain) * min(e["mean_loss"] for e in before)
    return no_new and flat


def advise(log: dict, hp, say):
    """One line when a run ends at its epoch cap with edits not learnt: what to change."""
    missed = log["learnt"]["edits"] - log["learnt"]["learnt"]
    if missed and (log.get("stop") or "").startswith("epoch cap"):
        say(f"stopped at the epoch cap with {missed} of {log['learnt']['edits']} edits not learnt: "
            f"raise --epochs (now {hp.epochs}) or --lr (now {hp.lr:g}), "
            f"or use a smaller --batch-size (now {log['batch_size']}) for more steps per epoch")
