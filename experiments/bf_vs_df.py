"""Claim 1 (paper Table 1, Figure 1): breadth-first beats depth-first.

    python experiments/bf_vs_df.py --edits zsre_2k.json            # SmolLM2-135M, 100 edits
    python experiments/bf_vs_df.py --edits zsre_2k.json --quick    # 20 edits, a few minutes

The same fine-tuning three ways, at the same tuning location and learning rate: the depth-first
pipeline (one edit at a time, in order, each with a fresh Adam and at most 25 steps), the
breadth-first pipeline with batch size 1 (the paper's first step: every edit still gets at most
25 steps, but the whole set is reshuffled every epoch), and LocFT-BF (breadth-first with
mini-batches, edit.py's default batch size). Reliability, generalization (greedy, the authors'
protocol), Capability (benchmark accuracy, base and edited) and both localities.
Writes results/bf_vs_df.{md,json,png}.
"""
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import edit  # noqa: E402
from experiments import common  # noqa: E402

NAME = "bf_vs_df"


def main(argv=None):
    a, n, limit = common.parse(common.parser(__doc__), argv, n=(100, 20))
    lab, edits, hp = common.setup(a, n, limit)
    setting = (f"Layer {hp.layer} `{hp.module}`, lr {hp.lr:g}, "
               f"at most {hp.epochs} epochs / {hp.max_steps} steps per edit")
    runs = {"depth-first (batch 1)": replace(hp, pipeline="df"),
            "breadth-first, batch 1": replace(hp, batch_size=1),
            f"LocFT-BF (batch {edit.auto_batch_size(n)})": hp}
    rows = []
    for name, run_hp in runs.items():
        scores, log = lab.run(name, edits, run_hp)
        rows.append(common.show({"run": name, **scores, "train_s": log["seconds"]}))

    base, cols = common.columns(rows, common.COLUMNS)
    table = common.table(f"Breadth-first vs depth-first ({common.about(a, n)})", NAME, argv, setting, lab, rows,
                         ["run", *cols, "train_s"], note="Cap = the paper's set, small = the small-model set; ")
    fig = common.bar_figure(rows, cols, "Breadth-first vs depth-first (dotted: unedited capability)", base)
    common.save(a.out, NAME, table, {"args": vars(a), "n": n, "limit": limit, "rows": rows}, fig)
    print(table, end="")


if __name__ == "__main__":
    main()
