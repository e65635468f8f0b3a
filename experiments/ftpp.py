"""Claim 6 (FT++, "Fine-Tuning Done Right... FT++", eq. 4-7): what each regulariser buys.

    python experiments/ftpp.py --edits counterfact_2k.json            # SmolLM2-135M, 200 edits
    python experiments/ftpp.py --edits counterfact_2k.json --quick    # 20 edits

Plain LocFT-BF, then with each FT++ regulariser alone and all three together: label smoothing
toward the old answer (A), KL to the base model on general text (L1), KL on the prediction of
the relation's last token (L2). The FT++ paper gives no values; A = 0.1, L1 = L2 = 1 are this
project's. Reliability, generalization, both localities (CounterFact's neighbourhood prompts
keep the old answer, so locality EM means something here), perplexity drift and per-token KL on
held-out text, and Capability. One model in memory; every run starts from the base weights.
Writes results/ftpp.{md,json,png}.
"""
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import edit  # noqa: E402
from experiments import common  # noqa: E402

NAME = "ftpp"
COLUMNS = ["reliability", "generalization", "locality_unchanged", "locality_em", "Cap", "small"]


def main(argv=None):
    p = common.parser(__doc__, edits="a CounterFact file (its old answers drive the smoothing)")
    p.add_argument("--alpha", type=float, default=0.1, help="--smooth-alpha of the smoothing rows")
    p.add_argument("--l1", type=float, default=1.0, help="--general-kl of the general-KL rows")
    p.add_argument("--l2", type=float, default=1.0, help="--local-kl of the local-KL rows")
    p.add_argument("--text", default=str(common.ROOT / "data" / "heldout_text.txt"), help="held-out text for the drift")
    a, n, limit = common.parse(p, argv, n=(200, 20))
    text = "\n".join(s for s in Path(a.text).read_text(encoding="utf-8").splitlines() if s.strip() and not s.startswith("#"))
    lab, edits, hp = common.setup(a, n, limit, text)
    setting = (f"Layer {hp.layer} `{hp.module}`, lr {hp.lr:g}, batch {edit.auto_batch_size(n)}, "
               f"at most {hp.epochs} epochs; held-out text {Path(a.text).name}")
    runs = {"plain LocFT-BF": hp, f"+ smoothing (A={a.alpha:g})": replace(hp, smooth_alpha=a.alpha),
            f"+ general KL (L1={a.l1:g})": replace(hp, general_kl=a.l1), f"+ local KL (L2={a.l2:g})": replace(hp, local_kl=a.l2),
            "all three": replace(hp, smooth_alpha=a.alpha, general_kl=a.l1, local_kl=a.l2)}
    rows = []
    for name, run_hp in runs.items():
        scores, log = lab.run(name, edits, run_hp)
        rows.append(common.show({"run": name, **scores, "train_s": log["seconds"], "ftpp": log.get("ftpp")}))

    base, cols = common.columns(rows, COLUMNS)
    table = common.table(f"FT++ regularisers ({common.about(a, n)})", NAME, argv, setting, lab, rows,
                         ["run", *cols, "perplexity", "kl_per_token", "train_s"])
    common.save(a.out, NAME, table, {"args": vars(a), "n": n, "limit": limit, "rows": rows}, plot(rows, cols, base))
    print(table, end="")


def plot(rows, cols, base):
    fig, (ax, ax2) = common.pyplot().subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 1]})
    common.bars(ax, rows, cols, "FT++ regularisers")
    ax2.bar(range(len(rows)), [r["perplexity"] - base["perplexity"] for r in rows])
    ax2.set_xticks(range(len(rows)), [str(i + 1) for i in range(len(rows))], fontsize=8)
    ax2.set_title("held-out perplexity, edited - base\n(runs in legend order)", fontsize=9)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
