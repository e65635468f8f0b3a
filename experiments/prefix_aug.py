"""Claim 5 (paper Appendix A.4): prefix augmentation lifts generalization on CounterFact.

    python experiments/prefix_aug.py --edits counterfact_2k.json            # SmolLM2-135M, 100 edits
    python experiments/prefix_aug.py --edits counterfact_2k.json --quick    # 20 edits

CounterFact's paraphrases put an unrelated sentence before the question, so an edit learnt on
the bare prompt often does not carry over. LocFT-BF with and without `--augment-prefixes K`
(each prompt also trained behind K short unrelated prefixes, as MEMIT and AlphaEdit do):
reliability, generalization, Capability and both localities.
Writes results/prefix_aug.{md,json,png}.
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

NAME = "prefix_aug"
COLUMNS = ["reliability", "generalization", "Cap", "small", "locality_unchanged", "locality_teacher_forced"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--ckpt", default=str(ROOT / "weights" / "smollm2-135m"))
    p.add_argument("--edits", required=True, help="a CounterFact file (the LocFT authors' layout, or ROME's)")
    p.add_argument("--n", type=int, default=None, help="edits (default 100; --quick 20)")
    p.add_argument("--seed", type=int, default=None, help="with --n: a random subset of the file")
    p.add_argument("--layer", default=str(edit.Hparams.layer))
    p.add_argument("--k", type=int, default=5, help="prefixes per edit")
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
    rows, cache = [], {}
    for name, run_hp in (("LocFT-BF", hp), (f"LocFT-BF + {a.k} prefixes", replace(hp, augment_prefixes=a.k))):
        print(f"== {name}", flush=True)
        trained, log = edit.edit(model, tok, edits, run_hp)
        report = evaluate.measure(model, tok, edits, None, trained, tasks, limit, a.capability_data, cache)
        rows.append({"run": name, "sequences": log["n_sequences"], "batch_size": log["batch_size"],
                     **evaluate.headline(report), "train_s": log["seconds"]})
        print(json.dumps(rows[-1]), flush=True)

    base = {k.removesuffix("_base"): v for k, v in rows[0].items() if k.endswith("_base")}
    cols = [c for c in COLUMNS if c in rows[0]]
    lines = [f"# Prefix augmentation ({Path(a.ckpt).name}, {n} edits of {Path(a.edits).name})", "",
             f"`python experiments/{NAME}.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             f"Layer {hp.layer} `{hp.module}`, lr {hp.lr:g}, at most {hp.epochs} epochs, batch min(100, ceil(sequences/10)); "
             f"capability: {', '.join(tasks)} with --limit {limit} (base model: "
             + ", ".join(f"{k} {v:.3f}" for k, v in base.items()) + ")", "",
             "| run | sequences | batch | " + " | ".join(cols) + " | train s |", "|---" * (len(cols) + 4) + "|"]
    lines += ["| " + " | ".join([r["run"], str(r["sequences"]), str(r["batch_size"])] + [f"{r[c]:.3f}" for c in cols]
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

    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar([j + i * width for j in range(len(cols))], [r[c] for c in cols], width, label=r["run"])
    for j, c in enumerate(cols):  # the unedited model's capability, for comparison
        if c in base:
            ax.hlines(base[c], j - width / 2, j + 0.8 - width / 2, colors="black", linestyles="dotted")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))], [c.replace("_", "\n") for c in cols], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title("Prefix augmentation (dotted: unedited capability)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
