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
import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import capability  # noqa: E402
import data  # noqa: E402
import edit  # noqa: E402
import evaluate  # noqa: E402
import model as model_lib  # noqa: E402

NAME = "bf_vs_df"
COLUMNS = ["reliability", "generalization", "Cap", "small", "locality_unchanged", "locality_teacher_forced"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--ckpt", default=str(ROOT / "weights" / "smollm2-135m"))
    p.add_argument("--edits", required=True, help="an edit file (ZsRE in the LocFT authors' layout, ...)")
    p.add_argument("--n", type=int, default=None, help="edits (default 100; --quick 20)")
    p.add_argument("--seed", type=int, default=None, help="with --n: a random subset of the file")
    p.add_argument("--layer", default=str(edit.Hparams.layer))
    p.add_argument("--capability", default="all", help="capability tasks (evaluate.py --capability)")
    p.add_argument("--limit", type=int, default=None, help="capability documents per task (default 20; --quick 5)")
    p.add_argument("--capability-data", default=str(capability.DATA_DIR))
    p.add_argument("--quick", action="store_true", help="a few minutes on a CPU")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    a = p.parse_args(argv)
    n, limit = a.n or (20 if a.quick else 100), a.limit or (5 if a.quick else 20)
    tasks = capability.check(a.capability, limit, a.capability_data)
    model, tok = model_lib.load(a.ckpt)
    edits = data.load_edits(a.edits, n=n, seed=a.seed)
    hp = edit.Hparams(layer=edit.resolve_layer(a.layer, model.args.n_layers))
    runs = {"depth-first (batch 1)": replace(hp, pipeline="df"),
            "breadth-first, batch 1": replace(hp, batch_size=1),
            f"LocFT-BF (batch {edit.auto_batch_size(n)})": hp}
    rows, cache = [], {}
    for name, run_hp in runs.items():
        print(f"== {name}", flush=True)
        trained, log = edit.edit(model, tok, edits, run_hp)
        report = evaluate.measure(model, tok, edits, None, trained, tasks, limit, a.capability_data, cache)
        rows.append({"run": name, **evaluate.headline(report), "train_s": log["seconds"]})
        print(json.dumps(rows[-1]), flush=True)

    base = {k.removesuffix("_base"): v for k, v in rows[0].items() if k.endswith("_base")}
    cols = [c for c in COLUMNS if c in rows[0]]
    lines = [f"# Breadth-first vs depth-first ({Path(a.ckpt).name}, {n} edits of {Path(a.edits).name})", "",
             f"`python experiments/{NAME}.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             f"Layer {hp.layer} `{hp.module}`, lr {hp.lr:g}, at most {hp.epochs} epochs / {hp.max_steps} steps per "
             f"edit; capability: {', '.join(tasks)} with --limit {limit} (Cap = the paper's set, small = the "
             f"small-model set; base model: " + ", ".join(f"{k} {v:.3f}" for k, v in base.items()) + ")", "",
             "| run | " + " | ".join(cols) + " | train s |", "|---" * (len(cols) + 2) + "|"]
    lines += ["| " + " | ".join([r["run"]] + [f"{r[c]:.3f}" for c in cols] + [f"{r['train_s']:.0f}"]) + " |" for r in rows]
    save(Path(a.out), "\n".join(lines) + "\n", {"args": vars(a), "n": n, "limit": limit, "rows": rows},
         plot(rows, cols, base))
    print("\n".join(lines))


def save(out: Path, table: str, results: dict, fig):
    """NAME.md, NAME.json and NAME.png in `out`, each written under a temporary name first."""
    out.mkdir(parents=True, exist_ok=True)
    for suffix, write in ((".md", lambda p: p.write_text(table)), (".json", lambda p: p.write_text(json.dumps(results, indent=1))),
                          (".png", lambda p: fig.savefig(p, dpi=90, format="png"))):
        tmp = out / f".{NAME}{suffix}.tmp"
        write(tmp)
        tmp.replace(out / f"{NAME}{suffix}")


def plot(rows, cols, base):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar([j + i * width for j in range(len(cols))], [r[c] for c in cols], width, label=r["run"])
    for j, c in enumerate(cols):  # the unedited model's capability, for comparison
        if c in base:
            ax.hlines(base[c], j - width / 2, j + 0.8 - width / 2, colors="black", linestyles="dotted")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))], [c.replace("_", "\n") for c in cols], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title("Breadth-first vs depth-first (dotted: unedited capability)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
