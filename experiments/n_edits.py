"""Claim 4 (paper Figure 6): LocFT-BF scales with the number of edits.

    python experiments/n_edits.py --edits zsre_2k.json            # SmolLM2-135M: 100, 300, 1000, 2000 edits
    python experiments/n_edits.py --edits zsre_2k.json --quick    # 20 and 50 edits

LocFT-BF at edit.py's defaults on the first n edits of the file, for growing n: reliability,
generalization, Capability and both localities, and the training time per edit (prefix cache
included). Writes results/n_edits.{md,json,png}.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import data  # noqa: E402
import edit  # noqa: E402
import preflight  # noqa: E402
from experiments import common  # noqa: E402

NAME = "n_edits"


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--ns", default=None, help="comma-separated edit counts (default 100,300,1000,2000; --quick 20,50)")
    p.add_argument("--seed", type=int, default=None, help="a random subset of the file for each n")
    a, _, limit = common.parse(p, argv, n=None)
    ns = [int(x) for x in (a.ns or ("20,50" if a.quick else "100,300,1000,2000")).split(",")]
    lab = common.load(a, limit)
    hp = edit.Hparams(layer=preflight.resolve_layer(a.layer, lab.model.args.n_layers))
    setting = f"Layer {hp.layer} `{hp.module}`, lr {hp.lr:g}, batch min(100, ceil(n/10)), at most {hp.epochs} epochs"
    rows = []
    for n in ns:
        edits = data.load_edits(a.edits, n=n, seed=a.seed)
        scores, log = lab.run(f"{len(edits)} edits", edits, hp)
        rows.append(common.show({"n": len(edits), "batch_size": log["batch_size"], "epochs": log["epochs_run"],
                                 **scores, "train_s": log["seconds"], "s_per_edit": log["seconds"] / len(edits)}))

    base, cols = common.columns(rows, common.COLUMNS)
    table = common.table(f"Number of edits ({common.about(a)})", NAME, argv, setting, lab, rows,
                         ["n", "batch_size", "epochs", *cols, "train_s", "s_per_edit"])
    common.save(a.out, NAME, table, {"args": vars(a), "limit": limit, "rows": rows}, plot(rows, cols, base))
    print(table, end="")


def plot(rows, cols, base):
    fig, (ax, ax2) = common.pyplot().subplots(1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [2, 1]})
    x = [r["n"] for r in rows]
    common.curves(ax, x, rows, cols, "LocFT-BF by number of edits (dotted: unedited capability)", base)
    for a in (ax, ax2):
        a.set_xscale("log")
        a.set_xlabel("edits")
    ax2.plot(x, [r["s_per_edit"] for r in rows], marker="o", color="black")
    ax2.set_ylim(bottom=0)
    ax2.set_title("training seconds per edit", fontsize=9)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
