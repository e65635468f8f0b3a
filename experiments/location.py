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
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import data  # noqa: E402
import edit  # noqa: E402
from experiments import common  # noqa: E402

NAME = "location"
MODULES = ["layer", "attn", "mlp", "up_proj", "down_proj"]  # the paper's five, coarse to fine
PANELS = ["reliability", "generalization", "Cap", "small", "locality_unchanged"]


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--every", type=int, default=3, help="every k-th layer, from 0")
    p.add_argument("--layers", default=None, help="comma-separated layers instead (--quick: three spread out)")
    a, n, limit = common.parse(p, argv, n=(100, 10), limit=(10, 3), layer=False)
    lab = common.load(a, limit)
    N = lab.model.args.n_layers
    layers = [int(x) for x in a.layers.split(",")] if a.layers else \
        ([N // 6, N // 2, 5 * N // 6] if a.quick else list(range(0, N, a.every)))
    edits = data.load_edits(a.edits, n=n, seed=a.seed)
    cells_dir = Path(a.out) / NAME / f"{Path(a.ckpt).name}-{n}"
    cells_dir.mkdir(parents=True, exist_ok=True)
    cells = {}
    for layer in layers:
        for module in MODULES:
            path = cells_dir / f"L{layer}-{module}.json"
            if path.exists():  # a cell finished before: skipped, so the sweep resumes
                cells[layer, module] = json.loads(path.read_text())
                continue
            scores, log = lab.run(f"layer {layer} {module}", edits, edit.Hparams(layer=layer, module=module))
            cells[layer, module] = {"layer": layer, "module": module, **scores,
                                    "train_s": log["seconds"], "limit": limit, "tasks": lab.tasks}
            common.write_atomic(path, lambda tmp: tmp.write_text(json.dumps(cells[layer, module])))

    rows = [cells[k] for k in sorted(cells)]
    base, panels = common.columns(rows, PANELS)
    table = common.table(f"Where to tune ({common.about(a, n)})", NAME, argv, "LocFT-BF defaults otherwise", lab, rows,
                         ["layer", "module", *panels, "train_s"])
    common.save(a.out, NAME, table, {"args": vars(a), "n": n, "limit": limit, "rows": rows},
                plot(cells, layers, panels, base))
    print(table, end="")


def plot(cells, layers, panels, base):
    fig, axes = common.pyplot().subplots(1, len(panels), figsize=(2.3 * len(panels) + 1, 0.25 * len(layers) + 1.8),
                                         sharey=True)
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
