"""Claim 4 (paper Figure 6): LocFT-BF scales with the number of edits.

    python experiments/n_edits.py --edits zsre_2k.json            # SmolLM2-135M: 100, 300, 1000, 2000 edits
    python experiments/n_edits.py --edits zsre_2k.json --quick    # 20 and 50 edits

LocFT-BF at edit.py's defaults on the first n edits of the file, for growing n: reliability,
generalization, Capability and both localities, and the training time per edit (prefix cache
included). Writes results/n_edits.{md,json,png}.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import capability  # noqa: E402
import data  # noqa: E402
import edit  # noqa: E402
import evaluate  # noqa: E402
import model as model_lib  # noqa: E402

NAME = "n_edits"
COLUMNS = ["reliability", "generalization", "Cap", "small", "locality_unchanged", "locality_teacher_forced"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--ckpt", default=str(ROOT / "weights" / "smollm2-135m"))
    p.add_argument("--edits", required=True, help="an edit file (ZsRE in the LocFT authors' layout, ...)")
    p.add_argument("--ns", default=None, help="comma-separated edit counts (default 100,300,1000,2000; --quick 20,50)")
    p.add_argument("--seed", type=int, default=None, help="a random subset of the file for each n")
    p.add_argument("--layer", default=str(edit.Hparams.layer))
    p.add_argument("--capability", default="all", help="capability tasks (evaluate.py --capability)")
    p.add_argument("--limit", type=int, default=None, help="capability documents per task (default 20; --quick 5)")
    p.add_argument("--capability-data", default=str(capability.DATA_DIR))
    p.add_argument("--quick", action="store_true", help="a few minutes on a CPU")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    a = p.parse_args(argv)
    ns = [int(x) for x in (a.ns or ("20,50" if a.quick else "100,300,1000,2000")).split(",")]
    limit = a.limit or (5 if a.quick else 20)
    tasks = capability.check(a.capability, limit, a.capability_data)
    model, tok = model_lib.load(a.ckpt)
    hp = edit.Hparams(layer=edit.resolve_layer(a.layer, model.args.n_layers))
    rows, cache = [], {}
    for n in ns:
        edits = data.load_edits(a.edits, n=n, seed=a.seed)
        print(f"== {len(edits)} edits", flush=True)
        trained, log = edit.edit(model, tok, edits, hp)
        report = evaluate.measure(model, tok, edits, None, trained, tasks, limit, a.capability_data, cache)
        rows.append({"n": len(edits), "batch_size": log["batch_size"], "epochs": log["epochs_run"],
                     **evaluate.headline(report), "train_s": log["seconds"], "s_per_edit": log["seconds"] / len(edits)})
        print(json.dumps(rows[-1]), flush=True)

    base = {k.removesuffix("_base"): v for k, v in rows[0].items() if k.endswith("_base")}
    cols = [c for c in COLUMNS if c in rows[0]]
    lines = [f"# Number of edits ({Path(a.ckpt).name}, {Path(a.edits).name})", "",
             f"`python experiments/{NAME}.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             f"Layer {hp.layer} `{hp.module}`, lr {hp.lr:g}, batch min(100, ceil(n/10)), at most {hp.epochs} epochs; "
             f"capability: {', '.join(tasks)} with --limit {limit} (base model: "
             + ", ".join(f"{k} {v:.3f}" for k, v in base.items()) + ")", "",
             "| edits | batch | epochs | " + " | ".join(cols) + " | train s | s per edit |", "|---" * (len(cols) + 5) + "|"]
    lines += ["| " + " | ".join([str(r["n"]), str(r["batch_size"]), str(r["epochs"])] + [f"{r[c]:.3f}" for c in cols]
                               + [f"{r['train_s']:.0f}", f"{r['s_per_edit']:.3f}"]) + " |" for r in rows]
    save(Path(a.out), "\n".join(lines) + "\n", {"args": vars(a), "limit": limit, "rows": rows}, plot(rows, cols, base))
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

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [2, 1]})
    x = [r["n"] for r in rows]
    for c in cols:
        line, = ax.plot(x, [r[c] for r in rows], marker="o", label=c)
        if c in base:
            ax.axhline(base[c], color=line.get_color(), linestyle="dotted", linewidth=1)
    for a in (ax, ax2):
        a.set_xscale("log")
        a.set_xlabel("edits")
    ax.set_ylim(0, 1.05)
    ax.set_title("LocFT-BF by number of edits (dotted: unedited capability)", fontsize=9)
    ax.legend(fontsize=7)
    ax2.plot(x, [r["s_per_edit"] for r in rows], marker="o", color="black")
    ax2.set_ylim(bottom=0)
    ax2.set_title("training seconds per edit", fontsize=9)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
