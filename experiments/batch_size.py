"""Claim 2 (paper Figure 4): mini-batches keep capability; batch 1 hurts it.

    python experiments/batch_size.py --edits zsre_2k.json            # SmolLM2-135M, 100 edits
    python experiments/batch_size.py --edits zsre_2k.json --quick    # 16 edits, batches 1, 4, 16

LocFT-BF with batch sizes 1, 4, 16, 64 and 100 (those no larger than the edit set), everything
else at edit.py's defaults: reliability, generalization, Capability and both localities against
the batch size. With a fixed number of epochs a larger batch also means fewer optimiser steps
(n/batch per epoch), which the table shows beside each run.
Writes results/batch_size.{md,json,png}.
"""
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import common  # noqa: E402

NAME = "batch_size"


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,4,16,64,100; --quick 1,4,16)")
    a, n, limit = common.parse(p, argv, n=(100, 16))
    sizes = [int(b) for b in (a.batch_sizes or ("1,4,16" if a.quick else "1,4,16,64,100")).split(",") if int(b) <= n]
    lab, edits, hp = common.setup(a, n, limit)
    setting = f"Layer {hp.layer} `{hp.module}`, lr {hp.lr:g}, at most {hp.epochs} epochs"
    rows = []
    for bs in sizes:
        scores, log = lab.run(f"batch {bs}", edits, replace(hp, batch_size=bs))
        rows.append(common.show({"batch_size": bs, "steps": sum(e["steps"] for e in log["epochs"]),
                                 "epochs": log["epochs_run"], **scores, "train_s": log["seconds"]}))

    base, cols = common.columns(rows, common.COLUMNS)
    table = common.table(f"Batch size ({common.about(a, n)})", NAME, argv, setting, lab, rows,
                         ["batch_size", "steps", "epochs", *cols, "train_s"])
    common.save(a.out, NAME, table, {"args": vars(a), "n": n, "limit": limit, "rows": rows}, plot(rows, cols, base))
    print(table, end="")


def plot(rows, cols, base):
    fig, ax = common.pyplot().subplots(figsize=(7, 3.6))
    x = [r["batch_size"] for r in rows]
    common.curves(ax, x, rows, cols, "LocFT-BF by batch size (dotted: unedited capability)", base)
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(b) for b in x])
    ax.set_xlabel("batch size")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
