"""What the six experiment scripts share, so that each shows only its own claim: the flags they
all take, the model loaded once and every configuration trained from the base weights and
scored, the results table, the plots, and NAME.{md,json,png} written atomically.

A script reads top to bottom:

    p = common.parser(__doc__)                      # --ckpt, --edits
    p.add_argument(...)                             # the script's own flags
    a, n, limit = common.parse(p, argv, n=(100, 20))  # + --n, --seed, --layer, --capability, ..., --out
    lab, edits, hp = common.setup(a, n, limit)      # tasks checked, model read, edits loaded, --layer resolved
    scores, log = lab.run("name", edits, hp)        # one configuration trained and scored
    table = common.table(f"Title ({common.about(a, n)})", NAME, argv, setting, lab, rows, keys)
    common.save(a.out, NAME, table, results, fig)
"""
import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import capability  # noqa: E402
import data  # noqa: E402
import edit  # noqa: E402
import evaluate  # noqa: E402
import model as model_lib  # noqa: E402
import preflight  # noqa: E402

ZSRE = "an edit file (ZsRE in the LocFT authors' layout, ...)"
# What most tables show, edited model first; a figure the run did not measure is left out.
COLUMNS = ["reliability", "generalization", "Cap", "small", "locality_unchanged", "locality_teacher_forced"]


def parser(doc: str, edits: str = ZSRE) -> argparse.ArgumentParser:
    """--ckpt and --edits; the script adds its own flags after them, then calls `parse`."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0], allow_abbrev=False)
    p.add_argument("--ckpt", default=str(ROOT / "weights" / "smollm2-135m"))
    p.add_argument("--edits", required=True, help=edits)
    return p


def parse(p: argparse.ArgumentParser, argv, n=(100, 20), limit=(20, 5), layer=True):
    """Adds the shared flags and parses. `n` and `limit` are the defaults of --n and --limit
    without and with --quick (n=None: the script has no --n); `layer`: whether it has --layer.
    Returns the arguments as given (they go into NAME.json), then the --n and --limit in force."""
    if n:
        p.add_argument("--n", type=int, default=None, help=f"edits (default {n[0]}; --quick {n[1]})")
        p.add_argument("--seed", type=int, default=None, help="with --n: a random subset of the file")
    if layer:
        p.add_argument("--layer", default=str(edit.Hparams.layer))
    p.add_argument("--capability", default="all", help="capability tasks (evaluate.py --capability)")
    p.add_argument("--limit", type=int, default=None,
                   help=f"capability documents per task (default {limit[0]}; --quick {limit[1]})")
    p.add_argument("--capability-data", default=str(capability.DATA_DIR))
    p.add_argument("--quick", action="store_true", help="a few minutes on a CPU")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    a = p.parse_args(argv)
    pick = lambda given, defaults: given or (defaults[1] if a.quick else defaults[0])  # noqa: E731
    return a, (pick(a.n, n) if n else None), pick(a.limit, limit)


@dataclass
class Lab:
    """One model in memory and what scoring it needs. Every `run` starts from the base weights
    (edit.edit returns the trained tensors and leaves the model as it found it); the base
    model's capability is scored once and kept in `cache`."""
    model: object
    tok: object
    tasks: list
    limit: int
    data_dir: str
    text: str | None = None  # held-out text for the perplexity drift
    cache: dict = field(default_factory=dict)

    def run(self, title: str, edits, hp: edit.Hparams):
        """Train `hp` on `edits`, score base and edited: (evaluate.headline's figures, the training log)."""
        print(f"== {title}", flush=True)
        trained, log = edit.edit(self.model, self.tok, edits, hp)
        report = evaluate.measure(self.model, self.tok, edits, None, trained, self.tasks, self.limit,
                                  self.data_dir, self.cache, self.text)
        return evaluate.headline(report), log


def load(a, limit: int, text: str | None = None) -> Lab:
    """The capability tasks are checked (and refused, naming what is wrong) before any weight is read."""
    tasks = capability.check(a.capability, limit, a.capability_data)
    model, tok = model_lib.load(a.ckpt)
    return Lab(model, tok, tasks, limit, a.capability_data, text)


def setup(a, n: int, limit: int, text: str | None = None):
    """The lab, the first n edits of --edits (a random n with --seed), edit.py's defaults at --layer."""
    lab = load(a, limit, text)
    edits = data.load_edits(a.edits, n=n, seed=a.seed)
    return lab, edits, edit.Hparams(layer=preflight.resolve_layer(a.layer, lab.model.args.n_layers))


def show(row: dict) -> dict:
    """Print one finished run as a JSON line (the table comes at the end), and return it."""
    print(json.dumps(row), flush=True)
    return row


def columns(rows: list[dict], wanted: list[str]):
    """The unedited model's figures (every row carries them as `<name>_base`), and those of
    `wanted` that the runs measured."""
    base = {k.removesuffix("_base"): v for k, v in rows[0].items() if k.endswith("_base")}
    return base, [c for c in wanted if c in rows[0]]


LABELS = {"batch_size": "batch", "n": "edits", "train_s": "train s", "s_per_edit": "s per edit",
          "perplexity": "held-out ppl", "kl_per_token": "KL/token"}
AS_IS = {"run", "module", "layer", "n", "batch_size", "steps", "epochs", "sequences"}  # names and counts
FORMATS = {"train_s": "{:.0f}", "perplexity": "{:.2f}", "kl_per_token": "{:.4f}"}  # any other figure: 3 places


def table(title: str, name: str, argv, setting: str, lab: Lab, rows: list[dict], keys: list[str], note="") -> str:
    """The markdown results file: the title, the command that made it, the setting followed by
    the capability tasks and the unedited model's figures (after `note`), and one table whose
    columns are `keys` of `rows`."""
    command = " ".join(sys.argv[1:] if argv is None else argv)
    base, _ = columns(rows, [])
    described = ", ".join(f"{k} {v:.3f}" for k, v in base.items() if k != "perplexity")
    if "perplexity" in base:
        described += f", held-out perplexity {base['perplexity']:.2f}"
    setting += f"; capability: {', '.join(lab.tasks)} with --limit {lab.limit} ({note}base model: {described})"
    cell = lambda k, v: str(v) if k in AS_IS else FORMATS.get(k, "{:.3f}").format(v)  # noqa: E731
    lines = [f"# {title}", "", f"`python experiments/{name}.py {command}`", "", setting, "",
             "| " + " | ".join(LABELS.get(k, k) for k in keys) + " |", "|---" * len(keys) + "|"]
    lines += ["| " + " | ".join(cell(k, r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def about(a, n=None) -> str:
    """A title's parenthesis: the model, and how many edits of which file."""
    return f"{Path(a.ckpt).name}, " + (f"{n} edits of " if n else "") + Path(a.edits).name


def save(out, name: str, table: str, results: dict, fig):
    """NAME.md, NAME.json and NAME.png in `out`, each written under a temporary name first."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"{name}.md", lambda p: p.write_text(table))
    write_atomic(out / f"{name}.json", lambda p: p.write_text(json.dumps(results, indent=1)))
    write_atomic(out / f"{name}.png", lambda p: fig.savefig(p, dpi=90, format="png"))


def write_atomic(path: Path, write):
    """`write(tmp)`, then rename: a run killed half-way leaves the old file or none, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)


def pyplot():
    """matplotlib without a display (an experiments-only dependency, imported only to plot)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def bars(ax, rows, cols, title, base=None):
    """One group of bars per column, one bar per run; with `base`, the unedited model's value
    as a dotted line over its group."""
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar([j + i * width for j in range(len(cols))], [r[c] for c in cols], width, label=r["run"])
    for j, c in enumerate(cols):
        if base and c in base:
            ax.hlines(base[c], j - width / 2, j + 0.8 - width / 2, colors="black", linestyles="dotted")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))], [c.replace("_", "\n") for c in cols], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def bar_figure(rows, cols, title, base):
    """`bars` alone in a figure: the runs side by side, the unedited capability dotted."""
    fig, ax = pyplot().subplots(figsize=(8, 3.6))
    bars(ax, rows, cols, title, base)
    fig.tight_layout()
    return fig


def curves(ax, x, rows, cols, title, base):
    """One line per column against `x`; the unedited model's value dotted in the same colour."""
    for c in cols:
        line, = ax.plot(x, [r[c] for r in rows], marker="o", label=c)
        if c in base:
            ax.axhline(base[c], color=line.get_color(), linestyle="dotted", linewidth=1)
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
