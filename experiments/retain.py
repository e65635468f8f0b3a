"""Bleed and the retain objective: do unrelated answers stay as they were?

    # the comparison: every run on the first n records of each set (one cell per model, set, n, run)
    nice -n 10 python experiments/retain.py --layer 22 --n 100 \\
        --sets zsre=zsre_2k.json,counterfact=counterfact_2k.json,wikibigedit=wikibigedit_2k.json
    # the sweep that chose --retain's settings: records 1900..1999 of one set, never evaluated above
    nice -n 10 python experiments/retain.py --layer 22 --n 100 --sweep --start 1900 --epochs 25 --patience 0 --sets counterfact=counterfact_2k.json

Plain LocFT-BF; `--retain` (retain.py) with its recommended settings and with a pool drawn from
another data set; FT++'s regularisers, each and all three (A = 0.1, L1 = L2 = 1, as in
experiments/ftpp.py); the same tensor at a lower layer (--low-layer). For each: reliability,
generalization, locality (output unchanged, EM), bleed (some edit's target / its own, bleed.py),
perplexity and per-token KL(base || edited) on held-out text (the drift), training seconds.
Each finished cell is written to --cells at once and skipped when the script runs again
(resumable); the table and plot are rebuilt from every cell there: results/retain.{md,json,png}.
"""
import argparse
import json
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import data  # noqa: E402
import edit  # noqa: E402
import evaluate  # noqa: E402
import preflight  # noqa: E402
from experiments import common  # noqa: E402

NAME = "retain"
FTPP = {"smooth_alpha": 0.1, "general_kl": 1.0, "local_kl": 1.0}
RUNS = ["plain", "retain", "retain, pool from another set", "FT++ smoothing", "FT++ general KL", "FT++ local KL",
        "FT++ all three", "lower layer"]
SWEEP = "1,1,4;3,1,4;10,1,4;30,1,4"  # weight, pool per edit, tokens; --grid moves one at a time from the best
KEYS = ["layer", "reliability", "generalization", "locality_unchanged", "bleed", "bleed_own", "locality_em",
        "perplexity", "kl_per_token", "train_s", "epochs"]


def base_scores_once():
    """Every run of a set scores the same unedited model on the same prompts: score it once per
    process (greedy decoding of the base model's long answers is most of a cell's time)."""
    score, seen = evaluate.score_weights, {}

    def cached(model, tok, groups, base=None, *args, **kw):
        if base is not None:  # the edited weights: always scored
            return score(model, tok, groups, base, *args, **kw)
        key = tuple((g, p) for g, items in groups.items() for p in items)
        if key not in seen:
            seen[key] = score(model, tok, groups, None, *args, **kw)
        return seen[key]
    evaluate.score_weights = cached


def settings(run: str, hp: edit.Hparams, sets: dict, name: str, low_layer: int) -> edit.Hparams:
    """The hyper-parameters of one named run on set `name`."""
    own = replace(hp, retain=True, retain_from=sets[name])
    if run == "plain":
        return hp
    if run == "retain":
        return own
    if run == "retain, pool from another set":  # the next set in the list: other relations, other prompts
        names = list(sets)
        return replace(own, retain_from=sets[names[(names.index(name) + 1) % len(names)]])
    if run.startswith("FT++"):
        which = {"FT++ smoothing": ["smooth_alpha"], "FT++ general KL": ["general_kl"], "FT++ local KL": ["local_kl"],
                 "FT++ all three": list(FTPP)}[run]
        return replace(hp, **{k: FTPP[k] for k in which})
    if run == "lower layer":
        return replace(hp, layer=low_layer)
    m = re.fullmatch(r"W=(\S+) pool=(\S+)x k=(\d+)( related)?", run)  # a sweep setting
    if m:
        return replace(own, retain_weight=float(m[1]), retain_pool=None, retain_tokens=int(m[3]),
                       retain_related=bool(m[4]))
    raise ValueError(f"unknown run {run!r}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--ckpt", default=str(common.ROOT / "weights" / "smollm2-135m"))
    p.add_argument("--sets", required=True, help="name=edit file, comma-separated")
    p.add_argument("--n", type=int, default=100, help="edits: records start..start+n-1 of each set")
    p.add_argument("--start", type=int, default=0, help="the first record edited")
    p.add_argument("--layer", default=str(edit.Hparams.layer))
    p.add_argument("--low-layer", type=int, default=4, help="the lower layer's index")
    p.add_argument("--runs", default=None, help=f"comma-separated, of: {'; '.join(RUNS)} (default all)")
    p.add_argument("--sweep", action="store_true", help="plain, then the retain settings of --grid, instead of --runs")
    p.add_argument("--grid", default=SWEEP,
                   help=f"with --sweep: weight,pool per edit,tokens[,1 for --retain-related];... (default {SWEEP})")
    p.add_argument("--epochs", type=int, default=edit.Hparams.epochs,
                   help="the epoch cap (the CounterFact sweep's cells: 25 and --patience 0, the defaults of their time)")
    p.add_argument("--patience", type=int, default=edit.Hparams.patience, help="the plateau rule's patience (0: off)")
    p.add_argument("--text", default=str(common.ROOT / "data" / "heldout_text.txt"), help="held-out text for the drift")
    p.add_argument("--cells", default=str(common.ROOT / "experiments" / "results" / "retain_cells"))
    p.add_argument("--out", default=str(common.ROOT / "experiments" / "results"))
    p.add_argument("--table-only", action="store_true", help="rebuild the table and plot from the cells")
    a = p.parse_args(argv)
    sets = dict(s.split("=", 1) for s in a.sets.split(","))
    cells = Path(a.cells)
    if not a.table_only:
        grid = [[float(x) for x in g.split(",")] + [0] for g in a.grid.split(";")]
        runs = (["plain"] + [f"W={w:g} pool={m:g}x k={k:g}" + " related" * bool(r) for w, m, k, r, *_ in grid]
                if a.sweep else (a.runs.split(";") if a.runs else RUNS))
        text = "\n".join(s for s in Path(a.text).read_text(encoding="utf-8").splitlines() if s.strip() and not s.startswith("#"))
        lab = None
        base_scores_once()
        for name, path in sets.items():
            for run in runs:
                cell = cells / Path(a.ckpt).name / f"{name}-{a.start}-{a.n}-{re.sub(r'[^A-Za-z0-9.=]+', '_', run)}.json"
                if cell.exists():
                    continue
                if lab is None:  # the model is read only when a cell is missing
                    lab = common.Lab(*common.model_lib.load(a.ckpt), [], 0, "", text)
                    hp = edit.Hparams(layer=preflight.resolve_layer(a.layer, lab.model.args.n_layers), epochs=a.epochs,
                                      patience=a.patience)
                edits = data.load_edits(path)[a.start:a.start + a.n]
                run_hp = settings(run, hp, sets, name, a.low_layer)
                if a.sweep and run != "plain":  # the pool per edit of a sweep setting
                    run_hp = replace(run_hp, retain_pool=round(float(re.search(r"pool=(\S+)x", run)[1]) * len(edits)))
                t0 = time.time()
                print(f"== {name} {run}", flush=True)
                trained, log = edit.edit(lab.model, lab.tok, edits, run_hp)
                measured = evaluate.measure(lab.model, lab.tok, edits, None, trained, text=lab.text)
                scores = evaluate.headline(measured)
                row = {"model": Path(a.ckpt).name, "set": name, "start": a.start, "n": len(edits), "run": run,
                       "sweep": a.sweep, "layer": run_hp.layer, **scores, "train_s": log["seconds"],
                       "epochs": log["epochs_run"], "final_loss": log["final_loss"], "cell_s": time.time() - t0,
                       "retain": log.get("retain"), "ftpp": log.get("ftpp"),
                       "retain_kl": log["epochs"][-1].get("retain_kl"),
                       "locality": [{k: x[k] for k in ("prompt", "answer", "base", "edited")} | {"target": e["target"]}
                                    for e in measured["edits"] for x in e["locality"]]}
                common.show({k: v for k, v in row.items() if k != "locality"})
                cell.parent.mkdir(parents=True, exist_ok=True)
                common.write_atomic(cell, lambda q: q.write_text(json.dumps(row, indent=1)))
                report(cells, a.out)
    report(cells, a.out)


def report(cells: Path, out):
    """retain.{md,json,png} from every cell in `cells`: one table per model, edits and records."""
    rows = [json.loads(f.read_text()) for f in sorted(cells.glob("*/*.json"))]
    order = {r: i for i, r in enumerate(RUNS)}
    rows.sort(key=lambda r: (r["sweep"], r["model"], r["n"], r["start"], r["set"], order.get(r["run"], 99), r["run"]))
    lines = ["# Bleed and the retain objective", "",
             "`nice -n 10 python experiments/retain.py --ckpt CKPT --layer L --n N --sets zsre=zsre_2k.json,"
             "counterfact=counterfact_2k.json,wikibigedit=wikibigedit_2k.json` (the sweep: `--sweep --start 1900 "
             "--epochs 25 --patience 0 --sets counterfact=counterfact_2k.json`)", "",
             "Edit metrics by greedy exact match on the edited records (bleed: share of unrelated prompts answered "
             "with some edit's target, neither their unedited nor their true answer; own: with their own edit's). "
             "Drift: perplexity and KL(base || edited) per token on data/heldout_text.txt. FT++: A = 0.1, L1 = L2 = 1. "
             "Train s: training alone (prefix caches and the pool's base answers included), on a shared 2-core CPU."]
    groups = {}
    for r in rows:
        groups.setdefault((r["sweep"], r["model"], r["n"], r["start"]), []).append(r)
    for (sweep, model, n, start), rs in groups.items():
        base = {k.removesuffix("_base"): v for k, v in rs[0].items() if k.endswith("_base")}
        lines += ["", f"## {'Sweep: ' if sweep else ''}{model}, {n} edits (records {start}..{start + n - 1})", "",
                  f"Unedited: held-out perplexity {base.get('perplexity', float('nan')):.2f}.", "",
                  "| set | run | " + " | ".join(common.LABELS.get(k, k) for k in KEYS) + " |", "|---" * (len(KEYS) + 2) + "|"]
        for r in rs:
            cells_ = [str(r[k]) if isinstance(r[k], int) else common.FORMATS.get(k, "{:.3f}").format(r[k]) for k in KEYS]
            lines.append(f"| {r['set']} | {r['run']} | " + " | ".join(cells_) + " |")
    table = "\n".join(lines) + "\n"
    common.save(out, NAME, table, {"rows": rows}, plot(rows))


def plot(rows):
    main = [r for r in rows if not r["sweep"]] or rows
    panels = sorted({(r["model"], r["n"], r["set"]) for r in main})
    plt = common.pyplot()
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 3.8), squeeze=False)
    cols = ["reliability", "generalization", "locality_unchanged", "bleed"]
    for ax, (model, n, name) in zip(axes[0], panels):
        rs = [r for r in main if (r["model"], r["n"], r["set"]) == (model, n, name)]
        common.bars(ax, rs, cols, f"{model}, {n} edits, {name}")
        ax.legend(fontsize=5)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
