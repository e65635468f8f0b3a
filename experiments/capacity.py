"""Claim 4 (paper Figure 6) and the capacity of one tensor: LocFT-BF at edit.py's defaults on
growing edit sets, until reliability breaks or the data runs out.

    python experiments/capacity.py --edits zsre_2k.json,wikibigedit_2k.json,counterfact_2k.json \\
        --ns 100,300,1000,2000,3000,6000                                           # SmolLM2-135M, layer 22
    python experiments/capacity.py --ckpt weights/qwen2.5-coder-0.5b --layer 17 --edits zsre_2k.json,wikibigedit_2k.json --ns 100,300,1000,3000
    python experiments/capacity.py --edits zsre_2k.json --quick                   # 20 and 50 edits

The first n records of the files in turn (2,000 ZsRE questions, then WikiBigEdit questions, then
CounterFact statements). Each (model, n) cell is trained with edit.py's defaults and nothing
else, then scored: reliability, generalization and locality (output unchanged) by greedy exact
match, the learnt check, the drift on held-out text (perplexity and KL(base || edited) per
token), the training time (per edit, per epoch) and the peak memory of the process, and the
edits per trained parameter beside the paper's scale. A cell is stored when done and skipped
when found, so a killed run continues; every stored cell of every model makes the table.
`--reuse` takes a cell's tensor from a budget.py run of the same setting instead of training
again (stopping is truncation: the rule is applied to that run's log, and its tensor of that
epoch is the one the defaults would have trained). `--sample K` scores the greedy metrics of a
larger cell on a seeded random K of its edits, with a 95% interval (greedy decoding of
thousands of prompts takes hours on a CPU); the learnt check and the drift still cover every
edit. Writes results/capacity.{md,json,png}.
"""
import json
import math
import random
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import budget  # noqa: E402
import data  # noqa: E402
import edit  # noqa: E402
import evaluate  # noqa: E402
import learnt  # noqa: E402
import model as model_lib  # noqa: E402
import preflight  # noqa: E402
from experiments import common  # noqa: E402
from experiments.budget import score  # noqa: E402
from generate import cut_at_stop, greedy  # noqa: E402

NAME = "capacity"
PAPER = {"edits": 100_000, "params": 3584 * 18944}  # 100K edits in one down_proj of Qwen2.5-7B


def read_text(path) -> str:
    return "\n".join(s for s in Path(path).read_text(encoding="utf-8").splitlines() if s.strip() and not s.startswith("#"))


def from_budget(run: Path, edits, hp) -> tuple[dict, dict] | None:
    """The defaults' tensor and log out of a budget.py run of the same edits and setting, or None."""
    done, ckpt, taught = run / "train_log.json", run / "checkpoint.pt", run / "edits.json"
    if not taught.exists() or json.loads(taught.read_text()) != [e.to_json() for e in edits]:
        return None
    log = json.loads(done.read_text()) if done.exists() else \
        torch.load(ckpt, weights_only=True)["log"] if ckpt.exists() else None
    if log is None or "hparams" not in log:  # a run still training: its settings are in its log only at the end
        return None
    # the budget run trains past the stop rules (read off its log here); FT++'s text is unused at weight 0
    # (an option newer than the log was not there: the run had it at its default, off)
    same = {**vars(hp), **log["hparams"], "epochs": hp.epochs, "patience": hp.patience, "min_gain": hp.min_gain,
            "general_text": hp.general_text}
    if same != {**vars(hp), "batch_size": log["batch_size"]} or hp.general_kl:
        return None
    epochs = log["epochs"]
    stop = next((i + 1 for i in range(len(epochs)) if budget.stop(epochs[:i + 1], hp, edit.STOP_LOSS)), None)
    if stop is None:  # the budget run ended before the defaults would have stopped
        return None
    kept = epochs[:stop]
    scored = run / "scores" / f"e{stop:03d}.json"  # budget.py scored that tensor already (the same `score`)
    # the run's end-of-training learnt check is of that tensor if the defaults stop at its last epoch
    end = {"learnt": log["learnt"]} if done.exists() and stop == len(epochs) and "learnt" in log else {}
    return torch.load(run / "snaps" / f"e{stop:03d}.pt"), {
        "scores": json.loads(scored.read_text()) if scored.exists() else None,
        "batch_size": log["batch_size"], "epochs": kept, "epochs_run": stop, "final_loss": kept[-1]["mean_loss"],
        "stop": budget.stop(kept, hp, edit.STOP_LOSS), "prefix_seconds": log["prefix_seconds"],
        "seconds": log["prefix_seconds"] + sum(e["seconds"] for e in kept), "reused": str(run), **end}


def sample_of(n: int, k: int | None) -> list[int]:
    """The edits whose greedy answers are scored: all n, or a seeded random k of them."""
    return list(range(n)) if not k or n <= k else sorted(random.Random(0).sample(range(n), k))


def wilson(hits: int, n: int) -> list[float]:
    """95% Wilson interval of a proportion measured on a sample."""
    p, z = hits / n, 1.96
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [mid - half, mid + half]


def cell(lab, a, edits, hp, work: Path, base_loc: list[str], text: str) -> dict:
    """Train (or reuse) and score one edit set (the greedy metrics on `base_loc`'s edits: all, or --sample's)."""
    runs = sorted(Path(a.reuse).glob(f"{Path(a.ckpt).name}-*-{len(edits)}*")) if a.reuse else []
    reused = next(filter(None, (from_budget(r, edits, hp) for r in runs)), None)
    if reused:
        trained, log = reused
        print(f"== {len(edits)} edits: the tensor of epoch {log['epochs_run']} of {log['reused']}", flush=True)
    else:
        print(f"== {len(edits)} edits", flush=True)
        trained, log = edit.edit(lab.model, lab.tok, edits, hp)
    # GB, the process so far; a reused tensor was trained by another process, whose peak is not known here
    peak = None if reused else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    def prefix(es):  # the frozen layers below the edited one, run once for these edits
        return data.PrefixCache(lab.model, [data.encode_edit(lab.tok, e.prompt, e.target) for e in es], lab.tok.pad_id,
                                hp.layer)
    if "learnt" not in log:  # a reused tensor: the end-of-training check, made here
        lab.model.load_tensors(trained)
        log["learnt"] = learnt.report(lab.model, lab.tok, prefix(edits), edits, 1, hp.layer, say=print)
        lab.model.load_tensors(lab.originals)
    marks = log["learnt"]
    idx = sample_of(len(edits), a.sample)
    picked = [edits[i] for i in idx]
    s = (len(idx) == len(edits) and log.get("scores")) or score(lab, picked, prefix(picked), hp, trained, base_loc[:len(idx)])
    drift = evaluate.text_metrics(lab.model, lab.tok, text, lab.originals, trained)
    lab.model.load_tensors(lab.originals)
    n, params = len(edits), sum(t.numel() for t in trained.values())
    epochs = log["epochs"]
    train_epochs = sum(e["seconds"] for e in epochs)
    return {"model": Path(a.ckpt).name, "n": n, "edits_per_param": n / params, "params": params,
            "batch_size": log["batch_size"], "epochs": len(epochs), "steps": sum(e["steps"] for e in epochs),
            "stop": log.get("stop"), "learnt": marks["learnt"] / n,
            "reliability": sum(s["reliable"]) / len(idx), "generalization": sum(s["general"]) / len(idx),
            "locality_unchanged": sum(s["local"]) / len(idx), "scored": len(idx),
            "reliability_ci95": wilson(sum(s["reliable"]), len(idx)) if len(idx) < n else None,
            "perplexity_base": drift["perplexity"]["base"],
            "perplexity": drift["perplexity"]["edited"], "kl_per_token": drift["kl_base_edited_per_token"],
            "train_s": log["seconds"], "s_per_edit": log["seconds"] / n, "prefix_s": log["prefix_seconds"],
            "epoch_s": train_epochs / len(epochs), "ms_per_edit_epoch": train_epochs / len(epochs) / n * 1e3,
            "peak_rss_gb": peak, "reused": log.get("reused"), "not_learnt": marks["not_learnt"][:20]}


def main(argv=None):
    p = common.parser(__doc__, edits="edit files, comma-separated: the first n records of them in turn")
    p.add_argument("--ns", default=None, help="comma-separated edit counts (default 100,300,1000,2000; --quick 20,50)")
    p.add_argument("--text", default=str(common.ROOT / "data" / "heldout_text.txt"), help="held-out text for the drift")
    p.add_argument("--work", default=str(common.ROOT / "out" / "capacity"), help="finished cells")
    p.add_argument("--reuse", default=None, metavar="DIR", help="budget.py's --work: take the tensor from its runs")
    p.add_argument("--sample", type=int, default=None, metavar="K",
                   help="greedy metrics of a cell larger than K on a seeded random K of its edits")
    a, _, _ = common.parse(p, argv, n=None, capability_flags=False)
    ns = [int(x) for x in (a.ns or ("20,50" if a.quick else "100,300,1000,2000")).split(",")]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    text = read_text(a.text)
    lab = None
    for n in ns:
        done = work / f"{Path(a.ckpt).name}-{n}.json"
        if done.exists():
            continue
        if lab is None:
            model, tok = model_lib.load(a.ckpt)
            lab = common.Lab(model, tok, [], 0, None)
            hp = edit.Hparams(layer=preflight.resolve_layer(a.layer, model.args.n_layers))
            names = model_lib.select_params(model, hp.layer, hp.module)
            lab.originals = {k: v.detach().clone() for k, v in names.items()}
            everything = common.edit_set(a.edits, max(ns))
        idx = sample_of(n, a.sample)
        if len(idx) == n:  # the base answers of the largest cell scored whole, computed once and kept
            base_loc = base_answers(lab, everything[:max(m for m in ns if len(sample_of(m, a.sample)) == m)],
                                    work / f"{Path(a.ckpt).name}-base.json")
        else:
            base_loc = base_answers(lab, [everything[i] for i in idx], work / f"{Path(a.ckpt).name}-{n}-sample{len(idx)}-base.json")
        t0 = time.time()
        row = cell(lab, a, everything[:n], hp, work, base_loc, text)
        row["wall_s"] = time.time() - t0
        row["files"] = a.edits
        common.write_atomic(done, lambda q: q.write_text(json.dumps(row, indent=1)))
        print(json.dumps({k: v for k, v in row.items() if k != "not_learnt"}), flush=True)
    rows = [json.loads(f.read_text()) for f in sorted(work.glob("*.json")) if not f.name.endswith("-base.json")]
    for r in rows:
        r.setdefault("scored", r["n"])  # cells stored before --sample scored every edit
    rows.sort(key=lambda r: (r["model"], r["n"]))
    write(a, argv, rows)


def base_answers(lab, edits, path: Path) -> list[str]:
    """The unedited model's greedy answers to the locality prompts (computed once, kept)."""
    if path.exists() and len(saved := json.loads(path.read_text())) >= len(edits):
        return saved
    answers = [cut_at_stop(lab.tok.decode(x)) for x in greedy(lab.model, lab.tok, [e.locality[0][0] for e in edits])]
    common.write_atomic(path, lambda q: q.write_text(json.dumps(answers)))
    return answers


KEYS = ["model", "n", "edits_per_param", "batch_size", "epochs", "steps", "learnt", "scored", "reliability",
        "generalization", "locality_unchanged", "kl_per_token", "perplexity", "train_s", "s_per_edit", "ms_per_edit_epoch", "peak_rss_gb"]


def write(a, argv, rows):
    fmt = {"edits_per_param": "{:.2e}", "train_s": "{:.0f}", "s_per_edit": "{:.2f}", "ms_per_edit_epoch": "{:.0f}",
           "peak_rss_gb": "{:.1f}", "perplexity": "{:.2f}", "kl_per_token": "{:.4f}"}
    cell_ = lambda k, v: "–" if v is None else str(v) if isinstance(v, (int, str)) else fmt.get(k, "{:.3f}").format(v)  # noqa: E731
    paper = PAPER["edits"] / PAPER["params"]
    lines = ["# Capacity of one tensor", "", f"`python experiments/{NAME}.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
             "", f"edit.py's defaults, nothing else (SmolLM2-135M: layer 22 `down_proj`, 576x1536; Qwen2.5-Coder-0.5B: layer 17 "
             f"`down_proj`, 896x4864). The paper's largest run: 100K edits in one 3584x18944 `down_proj` of Qwen2.5-7B, "
             f"{paper:.2e} edits per trained parameter. Up to 2,000: ZsRE; 3,000: 2,000 ZsRE + 1,000 WikiBigEdit; "
             "6,000: + 1,000 WikiBigEdit + 2,000 CounterFact. Held-out text drift: perplexity of data/heldout_text.txt "
             "and KL(base || edited) per token; training time on this 2-core CPU, shared.", "",
             "| " + " | ".join(common.LABELS.get(k, k) for k in KEYS) + " |", "|---" * len(KEYS) + "|"]
    lines += ["| " + " | ".join(cell_(k, r[k]) for k in KEYS) + " |" for r in rows]
    common.save(a.out, NAME, "\n".join(lines) + "\n", {"paper": PAPER, "rows": rows}, plot(rows))
    print("\n".join(lines))


def plot(rows):
    fig, (ax, ax2) = common.pyplot().subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [2, 1]})
    for m in sorted({r["model"] for r in rows}):
        rs = [r for r in rows if r["model"] == m]
        x = [r["edits_per_param"] for r in rs]
        for k, style in (("reliability", "-"), ("generalization", "--"), ("locality_unchanged", ":")):
            ax.plot(x, [r[k] for r in rs], style, marker="o", markersize=3, label=f"{m} {k}")
        ax2.plot([r["n"] for r in rs], [r["s_per_edit"] for r in rs], marker="o", label=m)
    ax.axvline(PAPER["edits"] / PAPER["params"], color="grey", linewidth=1)
    ax.text(PAPER["edits"] / PAPER["params"], 0.02, " paper: 100K edits, 7B", fontsize=7, color="grey")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("edits per trained parameter")
    ax.set_title("LocFT-BF at the defaults, one down_proj", fontsize=9)
    ax.legend(fontsize=6)
    ax2.set_xscale("log")
    ax2.set_xlabel("edits")
    ax2.set_ylim(bottom=0)
    ax2.set_title("training seconds per edit (this CPU)", fontsize=9)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
