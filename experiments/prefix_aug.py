"""Claim 5 (paper Appendix A.4): prefix augmentation lifts generalization on CounterFact.

    python experiments/prefix_aug.py --edits counterfact_2k.json            # SmolLM2-135M, 100 edits
    python experiments/prefix_aug.py --edits counterfact_2k.json --quick    # 20 edits

CounterFact's paraphrases put an unrelated sentence before the question, so an edit learnt on
the bare prompt often does not carry over. LocFT-BF with and without `--augment-prefixes K`
(each prompt also trained behind K short unrelated prefixes, as MEMIT and AlphaEdit do):
reliability, generalization, Capability and both localities.
Writes results/prefix_aug.{md,json,png}.
"""
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import common  # noqa: E402

NAME = "prefix_aug"


def main(argv=None):
    p = common.parser(__doc__, edits="a CounterFact file (the LocFT authors' layout, or ROME's)")
    p.add_argument("--k", type=int, default=5, help="prefixes per edit")
    a, n, limit = common.parse(p, argv, n=(100, 20))
    lab, edits, hp = common.setup(a, n, limit)
    setting = (f"Layer {hp.layer} `{hp.module}`, lr {hp.lr:g}, at most {hp.epochs} epochs, "
               "edit.py's batch rule for each run's sequences (the batch column)")
    rows = []
    for name, run_hp in (("LocFT-BF", hp), (f"LocFT-BF + {a.k} prefixes", replace(hp, augment_prefixes=a.k))):
        scores, log = lab.run(name, edits, run_hp)
        rows.append(common.show({"run": name, "sequences": log["n_sequences"], "batch_size": log["batch_size"],
                                 **scores, "train_s": log["seconds"]}))

    base, cols = common.columns(rows, common.COLUMNS)
    table = common.table(f"Prefix augmentation ({common.about(a, n)})", NAME, argv, setting, lab, rows,
                         ["run", "sequences", "batch_size", *cols, "train_s"])
    fig = common.bar_figure(rows, cols, "Prefix augmentation (dotted: unedited capability)", base)
    common.save(a.out, NAME, table, {"args": vars(a), "n": n, "limit": limit, "rows": rows}, fig)
    print(table, end="")


if __name__ == "__main__":
    main()
