"""Claim 3 (paper Figure 5): where to tune. down_proj of a later layer keeps capability.

    python experiments/location.py --edits zsre_2k.json            # SmolLM2-135M: every 3rd layer x 5 modules
    python experiments/location.py --edits zsre_2k.json --quick    # 3 layers x 5 modules, 10 edits

LocFT-BF at every k-th layer (`--every`, or `--layers`) with each of the five modules the paper
compares: the entire layer, attention, the MLP, up_proj and down_proj. Reliability,
generalization, Capability and the localities as heat maps. Resumable: each cell is written to
its own file under results/location/<ckpt>-<n>/ as soon as it is done, and a cell whose file
is there is not run again, so a sweep can be spread over several sessions.
Writes results/location.{md,json,png}.
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

NAME = "location"
MODULES = ["layer", "attn", "mlp", "up_proj", "down_proj"]  # the paper's five, coarse to fine
PANELS = ["reliability", "generalization", "Cap", "small", "locality_unchanged"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--ckpt", default=str(ROOT / "weights" / "smollm2-135m"))
    p.add_argument("--edits", required=True, help="an edit file (ZsRE in the LocFT authors' layout, ...)")
    p.add_argument("--n", type=int, default=None, help="edits (default 100; --quick 10)")
    p.add_argument("--seed", type=int, default=None, help="with --n: a random subset of the file")
    p.add_argument("--every", type=int, default=3, help="every k-th layer, from 0")
    p.add_argument("--layers", default=None, help="comma-separated layers instead (--quick: three spread out)")
    p.add_argument("--capability", default="all", help="capability tasks (evaluate.py --capability)")
    p.add_argument("--limit", type=int, default=None, help="capability documents per task (default 10; --quick 3)")
    p.add_argument("--capability-data", default=str(capability.DATA_DIR))
    p.add_argument("--quick", action="store_true", help="a few minutes on a CPU")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    a = p.parse_args(argv)
    n, limit = a.n or (10 if a.quick else 100), a.limit or (3 if a.quick else 10)
    tasks = capability.check(a.capability, limit, a.capability_data)
    model, tok = model_lib.load(a.ckpt)
    N = model.args.n_layers
    layers = [int(x) for x in a.layers.split(",")] if a.layers else \
        ([N // 6, N // 2, 5 * N // 6] if a.quick else list(range(0, N, a.every)))
    edits = data.load_edits(a.edits, n=n, seed=a.seed)
    cells_dir = Path(a.out) / NAME / f"{Path(a.ckpt).name}-{n}"
    cells_dir.mkdir(parents=True, exist_ok=True)
    cells, cache = {}, {}
    for layer in layers:
        for module in MODULES:
            path = cells_dir / f"L{layer}-{module}.json"
            if path.exists():  # a cell finished before: skipped, so the sweep resumes
                cells[layer, module] = json.loads(path.read_text())
                continue
            print(f"== layer {layer} {module}", flush=True)
            trained, log = edit.edit(model, tok, edits, edit.Hparams(layer=layer, module=module))
            report = evaluate.measure(model, tok, edits, None, trained, tasks, limit, a.capability_data, cache)
            cells[layer, module] = {"layer": layer, "module": module, **evaluate.headline(report),
                                    "train_s": log["seconds"], "limit": limit, "tasks": tasks}
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cells[layer, module]))
            tmp.replace(path)

    rows = [cells[k] for k in sorted(cells)]
    base = {k.removesuffix("_base"): v for k, v in rows[0].items() if k.endswith("_base")}
    panels = [c for c in PANELS if c in rows[0]]
    lines = [f"# Where to tune ({Path(a.ckpt).name}, {n} edits of {Path(a.edits).name})", "",
             f"`python experiments/{NAME}.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             f"LocFT-BF defaults otherwise; capability: {', '.join(tasks)} with --limit {limit} (base model: "
             + ", ".join(f"{k} {v:.3f}" for k, v in base.items()) + ")", "",
             "| layer | module | " + " | ".join(panels) + " | train s |", "|---" * (len(panels) + 3) + "|"]
    lines += ["| " + " | ".join([str(r["layer"]), r["module"]] + [f"{r[c]:.3f}" for c in panels]
                               + [f"{r['train_s']:.0f}"]) + " |" for r in rows]
    save(Path(a.out), "\n".join(lines) + "\n", {"args": vars(a), "n": n, "limit": limit, "rows": rows},
         plot(cells, layers, panels, base))
    print("\n".join(lines))


def save(out: Path, table: str, results: dict, fig):
    """NAME.md, NAME.json and NAME.png in `out`, each written under a temporary name first."""
    out.mkdir(parents=True, exist_ok=True)
    for suffix, write in ((".md", lambda p: p.write_text(table)), (".json", lambda p: p.write_text(json.dumps(results, indent=1))),
                          (".png", lambda p: fig.savefig(p, dpi=90, format="png"))):
        tmp = out / f".{NAME}{suffix}.tmp"
        write(tmp)
        tmp.replace(out / f"{NAME}{suffix}")


def plot(cells, layers, panels, base):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels) + 1, 0.25 * len(layers) + 1.8), sharey=True)
    for ax, c in zip(axes, panels):
        grid = [[cells[layer, m][c] for m in MODULES] for layer in layers]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(MODULES)), [m.replace("_proj", "") for m in MODULES], rotation=45, fontsize=7)
        ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
        ax.set_title(c + (f"\n(base {base[c]:.2f})" if c in base else ""), fontsize=8)
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=axes, shrink=0.8)
    return fig


if __name__ == "__main__":
    main()
