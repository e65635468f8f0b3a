"""Claim 2 (paper Figure 4): mini-batches keep capability; batch 1 hurts it.

    python experiments/batch_size.py --edits zsre_2k.json            # SmolLM2-135M, 100 edits
    python experiments/batch_size.py --edits zsre_2k.json --quick    # 16 edits, batches 1, 4, 16

LocFT-BF with batch sizes 1, 4, 16, 64 and 100 (those no larger than the edit set), everything
else at edit.py's defaults: reliability, generalization, Capability and both localities against
the batch size. With a fixed number of epochs a larger batch also means fewer optimiser steps
(n/batch per epoch), which the table shows beside each run.
Writes results/batch_size.{md,json,png}.
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

NAME = "batch_size"
COLUMNS = ["reliability", "generalization", "Cap", "small", "locality_unchanged", "locality_teacher_forced"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--ckpt", default=str(ROOT / "weights" / "smollm2-135m"))
    p.add_argument("--edits", required=True, help="an edit file (ZsRE in the LocFT authors' layout, ...)")
    p.add_argument("--n", type=int, default=None, help="edits (default 100; --quick 16)")
    p.add_argument("--seed", type=int, default=None, help="with --n: a random subset of the file")
    p.add_argument("--layer", default=str(edit.Hparams.layer))
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,4,16,64,100; --quick 1,4,16)")
    p.add_argument("--capability", default="all", help="capability tasks (evaluate.py --capability)")
    p.add_argument("--limit", type=int, default=None, help="capability documents per task (default 20; --quick 5)")
    p.add_argument("--capability-data", default=str(capability.DATA_DIR))
    p.add_argument("--quick", action="store_true", help="a few minutes on a CPU")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    a = p.parse_args(argv)
    n, limit = a.n or (16 if a.quick else 100), a.limit or (5 if a.quick else 20)
    sizes = [int(b) for b in (a.batch_sizes or ("1,4,16" if a.quick else "1,4,16,64,100")).split(",") if int(b) <= n]
    tasks = capability.check(a.capability, limit, a.capability_data)
    model, tok = model_lib.load(a.ckpt)
    edits = data.load_edits(a.edits, n=n, seed=a.seed)
    hp = edit.Hparams(layer=edit.resolve_layer(a.layer, model.args.n_layers))
    rows, cache = [], {}
    for bs in sizes:
        print(f"== batch {bs}", flush=True)
        trained, log = edit.edit(model, tok, edits, replace(hp, batch_size=bs))
        report = evaluate.measure(model, tok, edits, None, trained, tasks, limit, a.capability_data, cache)
        rows.append({"batch_size": bs, "steps": sum(e["steps"] for e in log["epochs"]), "epochs": log["epochs_run"],
                     **evaluate.headline(report), "train_s": log["seconds"]})
        print(json.dumps(rows[-1]), flush=True)

    base = {k.removesuffix("_base"): v for k, v in rows[0].items() if k.endswith("_base")}
    cols = [c for c in COLUMNS if c in rows[0]]
    lines = [f"# Batch size ({Path(a.ckpt).name}, {n} edits of {Path(a.edits).name})", "",
             f"`python experiments/{NAME}.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             f"Layer {hp.layer} `{hp.module}`, lr {hp.lr:g}, at most {hp.epochs} epochs; capability: "
             f"{', '.join(tasks)} with --limit {limit} (base model: " + ", ".join(f"{k} {v:.3f}" for k, v in base.items()) + ")",
             "", "| batch | steps | epochs | " + " | ".join(cols) + " | train s |", "|---" * (len(cols) + 4) + "|"]
    lines += ["| " + " | ".join([str(r["batch_size"]), str(r["steps"]), str(r["epochs"])] + [f"{r[c]:.3f}" for c in cols]
                               + [f"{r['train_s']:.0f}"]) + " |" for r in rows]
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

    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = [r["batch_size"] for r in rows]
    for c in cols:
        line, = ax.plot(x, [r[c] for r in rows], marker="o", label=c)
        if c in base:
            ax.axhline(base[c], color=line.get_color(), linestyle="dotted", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(b) for b in x])
    ax.set_xlabel("batch size")
    ax.set_ylim(0, 1.05)
    ax.set_title("LocFT-BF by batch size (dotted: unedited capability)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
