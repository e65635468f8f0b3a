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

NAME = "ftpp"
COLUMNS = ["reliability", "generalization", "locality_unchanged", "locality_em", "Cap", "small"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--ckpt", default=str(ROOT / "weights" / "smollm2-135m"))
    p.add_argument("--edits", required=True, help="a CounterFact file (its old answers drive the smoothing)")
    p.add_argument("--n", type=int, default=None, help="edits (default 200; --quick 20)")
    p.add_argument("--seed", type=int, default=None, help="with --n: a random subset of the file")
    p.add_argument("--layer", default=str(edit.Hparams.layer))
    p.add_argument("--alpha", type=float, default=0.1, help="--smooth-alpha of the smoothing rows")
    p.add_argument("--l1", type=float, default=1.0, help="--general-kl of the general-KL rows")
    p.add_argument("--l2", type=float, default=1.0, help="--local-kl of the local-KL rows")
    p.add_argument("--text", default=str(ROOT / "data" / "heldout_text.txt"), help="held-out text for the drift")
    p.add_argument("--capability", default="all", help="capability tasks (evaluate.py --capability)")
    p.add_argument("--limit", type=int, default=None, help="capability documents per task (default 20; --quick 5)")
    p.add_argument("--capability-data", default=str(capability.DATA_DIR))
    p.add_argument("--quick", action="store_true", help="a few minutes on a CPU")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    a = p.parse_args(argv)
    n, limit = a.n or (20 if a.quick else 200), a.limit or (5 if a.quick else 20)
    tasks = capability.check(a.capability, limit, a.capability_data)
    text = "\n".join(s for s in Path(a.text).read_text(encoding="utf-8").splitlines() if s.strip() and not s.startswith("#"))
    model, tok = model_lib.load(a.ckpt)
    edits = data.load_edits(a.edits, n=n, seed=a.seed)
    hp = edit.Hparams(layer=edit.resolve_layer(a.layer, model.args.n_layers))
    runs = {"plain LocFT-BF": hp, f"+ smoothing (A={a.alpha:g})": replace(hp, smooth_alpha=a.alpha),
            f"+ general KL (L1={a.l1:g})": replace(hp, general_kl=a.l1), f"+ local KL (L2={a.l2:g})": replace(hp, local_kl=a.l2),
            "all three": replace(hp, smooth_alpha=a.alpha, general_kl=a.l1, local_kl=a.l2)}
    rows, cache = [], {}
    for name, run_hp in runs.items():
        print(f"== {name}", flush=True)
        trained, log = edit.edit(model, tok, edits, run_hp)
        report = evaluate.measure(model, tok, edits, None, trained, tasks, limit, a.capability_data, cache, text)
        rows.append({"run": name, **evaluate.headline(report), "train_s": log["seconds"], "ftpp": log.get("ftpp")})
        print(json.dumps(rows[-1]), flush=True)

    base = {k.removesuffix("_base"): v for k, v in rows[0].items() if k.endswith("_base")}
    cols = [c for c in COLUMNS if c in rows[0]]
    lines = [f"# FT++ regularisers ({Path(a.ckpt).name}, {n} edits of {Path(a.edits).name})", "",
             f"`python experiments/{NAME}.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             f"Layer {hp.layer} `{hp.module}`, lr {hp.lr:g}, batch {edit.auto_batch_size(n)}, at most {hp.epochs} epochs; "
             f"held-out text {Path(a.text).name}; capability: {', '.join(tasks)} with --limit {limit} (base model: "
             + ", ".join(f"{k} {v:.3f}" for k, v in base.items() if k != "perplexity") + f", held-out perplexity {base['perplexity']:.2f})", "",
             "| run | " + " | ".join(cols) + " | held-out ppl | KL/token | train s |", "|---" * (len(cols) + 4) + "|"]
    lines += ["| " + " | ".join([r["run"]] + [f"{r[c]:.3f}" for c in cols]
                               + [f"{r['perplexity']:.2f}", f"{r['kl_per_token']:.4f}", f"{r['train_s']:.0f}"]) + " |"
              for r in rows]
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

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar([j + i * width for j in range(len(cols))], [r[c] for c in cols], width, label=r["run"])
        ax2.bar(i, r["perplexity"] - base["perplexity"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))], [c.replace("_", "\n") for c in cols], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title("FT++ regularisers", fontsize=9)
    ax.legend(fontsize=7)
    ax2.set_xticks(range(len(rows)), [str(i + 1) for i in range(len(rows))], fontsize=8)
    ax2.set_title("held-out perplexity, edited - base\n(runs in legend order)", fontsize=9)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
