"""Against other editors: LocFT-BF and MEMIT, AlphaEdit, RECT, UltraEdit, FT-L in one harness.

    python experiments/vs_rivals.py --edits zsre_2k.json            # SmolLM2-135M, 1,000 edits in batches of 100
    python experiments/vs_rivals.py --edits zsre_2k.json --quick    # 20 edits in batches of 10

Every rival edits sequentially in batches (baselines/run.py, the paper's lifelong protocol), once
with its papers' targets and once with the EOS LocFT-BF trains (--eos); LocFT-BF runs edit.py's
defaults on the same edits. Each cell is scored by evaluate.py's code: greedy exact match (the
paper's protocol) and the teacher-forced figures (the rivals' own) side by side, with seconds
per edit (the whole editing run, covariance and templates included), and harm: KL(base || edited)
per token on held-out text (the harm preset's continuous measure, `--harm lambada_text`, the
default) and, with `--harm harm`, the preset's change in mean accuracy (docs/capability.md).

Cells run one at a time and are resumable: an editing run killed half-way is continued with
--resume; a scored cell is kept in WORK/<cell>.json and never redone. The table, data and plot
(results/vs_rivals-<model>-<edits>-<n>.{md,json,png}) are rewritten after every cell.
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import capability  # noqa: E402
import data  # noqa: E402
import delta  # noqa: E402
import edit  # noqa: E402
import evaluate  # noqa: E402
import model as model_lib  # noqa: E402
from baselines import run  # noqa: E402
from experiments import common  # noqa: E402

ROOT = common.ROOT

RIVALS = ["ft_l", "ultraedit", "memit", "rect", "alphaedit"]  # cheapest first
LABELS = {"locft_bf": "LocFT-BF", "ft_l": "FT-L", "ultraedit": "UltraEdit", "memit": "MEMIT", "rect": "RECT",
          "alphaedit": "AlphaEdit"}
FIGURES = {  # row key -> evaluate.py's metric
    "reliability": "reliability (greedy EM)", "generalization": "generalization (greedy EM)",
    "locality_unchanged": "locality (output unchanged)",
    "reliability_tf": "reliability (teacher-forced token acc)",
    "generalization_tf": "generalization (teacher-forced token acc)",
    "locality_tf": "locality (teacher-forced, base predictions kept)"}
KEYS = ["run", "EOS", *FIGURES, "kl_per_token", "harm", "s_per_edit"]


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--n", type=int, default=None, help="edits (default 1000; --quick 20)")
    p.add_argument("--batch", type=int, default=None, help="edits per sequential batch (default 100; --quick 10)")
    p.add_argument("--methods", default=",".join(["locft_bf"] + RIVALS), help="comma-separated cells to run")
    p.add_argument("--work", default=None, help="where the editing runs go (default out/vs_rivals/<model>-<edits>-<n>)")
    p.add_argument("--cov-text", default=None, help="baselines/run.py --cov-text (default BoolQ's Wikipedia passages)")
    p.add_argument("--cov-cache", default=None, help="baselines/run.py --cov-cache")
    p.add_argument("--harm", default="lambada_text",
                   help="capability tasks for the harm columns (default lambada_text: KL(base || edited) per token "
                        "on held-out text; harm: the whole preset; none)")
    p.add_argument("--quick", action="store_true", help="a few minutes on a CPU")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    a = p.parse_args(argv)
    n, batch = a.n or (20 if a.quick else 1000), a.batch or (10 if a.quick else 100)
    tag = f"{Path(a.ckpt).name}-{Path(a.edits).stem}-{n}"
    work = Path(a.work or ROOT / "out" / "vs_rivals" / tag)
    work.mkdir(parents=True, exist_ok=True)
    cells = [(m, eos) for m in a.methods.split(",") for eos in ((True,) if m == "locft_bf" else (False, True))]
    for m, _ in cells:
        if m not in LABELS:
            p.error(f"--methods: unknown method {m!r} (known: {', '.join(LABELS)})")

    try:
        harm_tasks = [] if a.harm == "none" else capability.check(a.harm, None)
    except capability.CapabilityError as e:
        p.error(f"--harm: {e}")
    model, tok = model_lib.load(a.ckpt)
    edits = data.load_edits(a.edits, n=n)
    groups = evaluate.probes(edits)
    base_file = work / "base.json"
    if base_file.is_file():
        base = json.loads(base_file.read_text())
    else:
        print(f"== scoring the unedited model on {sum(map(len, groups.values()))} prompts", flush=True)
        base = evaluate.score_weights(model, tok, groups)
        common.write_atomic(base_file, lambda f: f.write_text(json.dumps(base)))
    rows, base_cache = [], {}
    for method, eos in cells:
        name = method + ("" if method == "locft_bf" or not eos else "-eos")
        result = work / f"{name}.json"
        if not result.is_file():
            run_dir = work / name
            if not (run_dir / "delta.safetensors").is_file():
                edit_cell(a, method, eos, n, batch, run_dir)
            print(f"== scoring {name}", flush=True)
            originals = delta.apply(model, run_dir / "delta.safetensors")
            try:
                scores = evaluate.score_weights(model, tok, groups, base)["scores"]
                harm = harm_of(model, tok, harm_tasks, originals, base_cache) if harm_tasks else {}
            finally:
                model.load_tensors(originals)
            log = json.loads((run_dir / "train_log.json").read_text())
            row = {"run": LABELS[method], "EOS": "yes" if eos else "no", "kl_per_token": harm.get("kl_per_token"),
                   "harm": harm.get("harm"),
                   "s_per_edit": log.get("seconds_per_edit", log["seconds"] / len(edits)),
                   **{k: mean(scores[v]) for k, v in FIGURES.items()}}
            common.write_atomic(result, lambda f: f.write_text(json.dumps(row)))
        rows.append(common.show(json.loads(result.read_text())))
        write_results(a, argv, tag, n, batch, base["scores"], rows)


def harm_of(model, tok, tasks: list[str], originals: dict, base_cache: dict) -> dict:
    """The harm columns of the model as it is (edited; `originals` the base tensors): KL(base ||
    edited) per token on held-out text, and the harm preset's change in mean accuracy, each None
    when `tasks` lacks it. The base model's task results are kept in `base_cache` between cells."""
    params = dict(model.named_parameters())
    edited = {n: params[n].detach().clone() for n in originals}
    rep = capability.before_after(model, tok, tasks, originals, edited, say=lambda *_: None, base_cache=base_cache)
    text = rep["tasks"].get("lambada_text")
    return {"kl_per_token": text["metrics"]["kl_per_token"]["edited"] if text else None,
            "harm": rep["averages"].get("harm", {}).get("change")}


def edit_cell(a, method: str, eos: bool, n: int, batch: int, run_dir: Path):
    """One editing run through its command line, continued if a killed one left its state."""
    if method == "locft_bf":
        cli, args = edit.main, ["--ckpt", a.ckpt, "--edits", a.edits, "--n", str(n), "--out", str(run_dir)]
    else:
        cli = run.main
        args = ["--method", method, "--ckpt", a.ckpt, "--edits", a.edits, "--n", str(n), "--batch", str(batch),
                "--out", str(run_dir)] + (["--eos"] if eos else [])
        if method in ("memit", "rect", "alphaedit"):
            args += (["--cov-text", a.cov_text] if a.cov_text else []) + (["--cov-cache", a.cov_cache] if a.cov_cache else [])
    if (run_dir.parent / (run_dir.name + ".partial") / "checkpoint.pt").is_file():
        args.append("--resume")
    print(f"== {'edit.py' if method == 'locft_bf' else 'baselines/run.py'} {' '.join(args)}", flush=True)
    t0 = time.time()
    code = cli(args)
    if code:
        sys.exit(code)
    print(f"== {run_dir.name}: {time.time() - t0:.0f}s", flush=True)


def mean(xs):
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def write_results(a, argv, tag, n, batch, base_scores, rows):
    base = {k: mean(base_scores[v]) for k, v in FIGURES.items()}
    cell = lambda k, v: ("–" if v is None else v if isinstance(v, str) else f"{v:.2f}" if k == "s_per_edit"  # noqa: E731
                         else f"{v:.4f}" if k == "kl_per_token" else f"{v:+.3f}" if k == "harm" else f"{v:.3f}")
    heads = ["method", "EOS", "rel (EM)", "gen (EM)", "loc unchanged", "rel (TF)", "gen (TF)", "loc (TF)",
             "KL/token", "harm (acc change)", "s per edit"]
    command = " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"# Against other editors ({Path(a.ckpt).name}, {n} edits of {Path(a.edits).name})", "",
             f"`python experiments/vs_rivals.py {command}`", "",
             f"Rivals: baselines/run.py, sequential batches of {batch}, official hyper-parameters by the stated rule "
             f"(docs/baselines.md); LocFT-BF: edit.py's defaults on all {n} edits at once. EM: greedy exact match "
             f"(the paper's protocol); TF: teacher-forced token accuracy; loc unchanged: the share of unrelated "
             f"prompts whose greedy answer is the unedited model's; KL/token: KL(base || edited) per token "
             f"on held-out text; harm: the harm preset's change in mean accuracy (when run). Unedited model: rel {base['reliability']:.3f}, "
             f"gen {base['generalization']:.3f}, rel (TF) {base['reliability_tf']:.3f}, "
             f"gen (TF) {base['generalization_tf']:.3f}.", "",
             "| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
    lines += ["| " + " | ".join(cell(k, r[k]) for k in KEYS) + " |" for r in rows]
    table = "\n".join(lines) + "\n"
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    shown = [{**{k: float("nan") if v is None else v for k, v in r.items()},  # a figure with no prompts: no bar
              "run": r["run"] + (" +EOS" if r["EOS"] == "yes" and r["run"] != "LocFT-BF" else "")} for r in rows]
    common.bars(axes[0], shown, ["reliability", "generalization", "locality_unchanged"], "greedy exact match")
    common.bars(axes[1], shown, ["reliability_tf", "generalization_tf", "locality_tf"], "teacher-forced")
    fig.tight_layout()
    common.save(a.out, f"vs_rivals-{tag}", table, {"args": vars(a), "n": n, "batch": batch, "base": base, "rows": rows},
                fig)
    plt.close(fig)


if __name__ == "__main__":
    main()
