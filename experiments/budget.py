"""The step budget: one long run per setting, every stopping rule read off it.

    python experiments/budget.py --edits zsre_2k.json --n 1000 --cap 100              # SmolLM2-135M, layer 22
    python experiments/budget.py --edits zsre_2k.json,wikibigedit_2k.json --n 3000 --cap 100
    python experiments/budget.py --ckpt weights/qwen2.5-coder-0.5b --layer 17 --edits zsre_2k.json --n 1000

LocFT-BF trains up to `--cap` epochs with the paper's early stop (mean loss below 1e-2) and no
other stop, and keeps the trained tensor of every epoch: stopping is truncation, so a rule that
stops after epoch E yields exactly the epoch-E tensor. The training log holds each epoch's mean
loss and the edits learnt during it (teacher-forced argmax, read off the training forward).
Then, at every `--every`-th epoch and wherever a candidate rule (budget.py's plateau, for each
patience and gain) stops: greedy reliability, generalization and locality (output unchanged),
and the end-of-training learnt check of every edit, with its agreement with greedy reliability.
Resumable at every stage: the run's state and tensors live in `--work`; a killed run continues.
Writes results/budget/TAG.{md,json,png} (TAG from the model, the edits, n and the flags).
"""
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import budget  # noqa: E402
import checkpoint as ckpt_lib  # noqa: E402
import data  # noqa: E402
import edit  # noqa: E402
import learnt  # noqa: E402
import model as model_lib  # noqa: E402
import preflight  # noqa: E402
from evaluate import exact_match  # noqa: E402
from generate import cut_at_stop, greedy  # noqa: E402
from experiments import common  # noqa: E402

RULES = [(p, g) for p in (3, 5, 10) for g in (0.05, 0.1, 0.2)]  # candidate (patience, min_gain)


class Snapshots(ckpt_lib.Checkpoint):
    """The run's resumable state (checkpoint.Checkpoint), plus the trained tensor of every epoch."""

    def save(self, state, params, log):
        snap = self.path.parent / "snaps" / f"e{state['epoch']:03d}.pt"
        snap.parent.mkdir(exist_ok=True)
        common.write_atomic(snap, lambda p: torch.save({n: t.detach().cpu() for n, t in params.items()}, p))
        super().save(state, params, log)


def tag_of(a, hp) -> str:
    files = "+".join(Path(f).stem.split("_")[0] for f in a.edits.split(","))
    extra = "".join(f"-{k}{v:g}" for k, v in (("b", a.batch_size), ("lr", a.lr)) if v is not None)
    return f"{Path(a.ckpt).name}-{files}-{a.n}{extra}"


def train(lab, edits, hp, work: Path) -> dict:
    """The long run (resumed from `work` if it was killed), its log written last."""
    done = work / "train_log.json"
    if done.exists():
        return json.loads(done.read_text())
    work.mkdir(parents=True, exist_ok=True)
    common.write_atomic(work / "edits.json", lambda p: p.write_text(json.dumps([e.to_json() for e in edits])))
    snaps = Snapshots(work / "checkpoint.pt", {}, edit.STOP_LOSS)
    t0 = time.time()
    _, log = edit.edit(lab.model, lab.tok, edits, hp, checkpoint=snaps)
    log["wall_seconds"] = time.time() - t0
    common.write_atomic(done, lambda p: p.write_text(json.dumps(log, indent=1)))
    return log


def rule_stops(epochs: list[dict], cap: int) -> dict[str, int]:
    """The epoch each candidate rule stops at, read off the long run's log."""
    out = {}
    for p, g in [(0, 0.0)] + RULES:
        hp = SimpleNamespace(patience=p, min_gain=g, epochs=cap)
        out[f"P{p}-G{g:g}" if p else "cap only"] = next(
            e["epoch"] for i, e in enumerate(epochs) if budget.stop(epochs[:i + 1], hp, edit.STOP_LOSS) or i + 1 == len(epochs))
    return out


def score(lab, edits, cache, hp, tensors, base_loc) -> dict:
    """Greedy reliability, generalization, locality (unchanged) and the learnt check, per edit."""
    model, tok = lab.model, lab.tok
    originals = model.load_tensors(tensors, keep_originals=True)
    try:
        groups = {"rel": [e.prompt for e in edits], "gen": [e.rephrases[0] for e in edits],
                  "loc": [e.locality[0][0] for e in edits]}
        answers = {g: [cut_at_stop(tok.decode(x)) for x in greedy(model, tok, ps)] for g, ps in groups.items()}
        marks = learnt.predictions(model, cache, list(range(len(edits))), hp.layer)
    finally:
        model.load_tensors(originals)
    return {"reliable": [exact_match(x, e.target) for x, e in zip(answers["rel"], edits)],
            "general": [exact_match(x, e.target) for x, e in zip(answers["gen"], edits)],
            "local": [x == b for x, b in zip(answers["loc"], base_loc)],
            "learnt": [ok for ok, _ in marks]}


def summary(epoch: int, log: dict, s: dict) -> dict:
    n = len(s["reliable"])
    both = sum(a and b for a, b in zip(s["learnt"], s["reliable"]))
    agree = sum(a == b for a, b in zip(s["learnt"], s["reliable"]))
    e = log["epochs"][epoch - 1]
    steps = sum(x["steps"] for x in log["epochs"][:epoch])
    return {"epoch": epoch, "steps": steps, "mean_loss": e["mean_loss"], "learnt_in_epoch": e["learnt"] / n,
            "learnt": sum(s["learnt"]) / n, "reliability": sum(s["reliable"]) / n, "agreement": agree / n,
            "learnt_not_reliable": sum(s["learnt"]) - both, "reliable_not_learnt": sum(s["reliable"]) - both,
            "generalization": sum(s["general"]) / n, "locality_unchanged": sum(s["local"]) / n}


def main(argv=None):
    p = common.parser(__doc__, edits="edit files, comma-separated: the first --n records of them in turn")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--cap", type=int, default=100, help="epochs at most")
    p.add_argument("--batch-size", type=int, default=None, help="default: edit.py's")
    p.add_argument("--lr", type=float, default=None, help="default: edit.py's")
    p.add_argument("--every", type=int, default=10, help="score every this many epochs (and the rules' stops)")
    p.add_argument("--work", default=str(common.ROOT / "out" / "budget"), help="the runs' state and tensors")
    p.add_argument("--score-now", action="store_true",
                   help="score the epochs saved so far while another process trains (no table)")
    a, _, _ = common.parse(p, argv, n=None, capability_flags=False)
    model, tok = model_lib.load(a.ckpt)
    lab = common.Lab(model, tok, [], 0, None)
    edits = common.edit_set(a.edits, a.n)
    hp = edit.Hparams(layer=preflight.resolve_layer(a.layer, lab.model.args.n_layers), epochs=a.cap,
                      patience=0, **{k: v for k, v in (("batch_size", a.batch_size), ("lr", a.lr)) if v is not None})
    tag = tag_of(a, hp)
    work = Path(a.work) / tag
    if a.score_now:  # the log so far, from the training process's last checkpoint
        log = torch.load(work / "checkpoint.pt", weights_only=True)["log"]
        log["n_edits"] = len(edits)
    else:
        log = train(lab, edits, hp, work)
    epochs = log["epochs"]
    stops = {} if a.score_now else rule_stops(epochs, a.cap)
    wanted = sorted({e for e in range(a.every, len(epochs) + 1, a.every)} | set(stops.values()) | {len(epochs)})
    encoded = [data.encode_edit(lab.tok, e.prompt, e.target) for e in edits]
    cache = data.PrefixCache(lab.model, encoded, lab.tok.pad_id, hp.layer)
    scores = work / "scores"
    scores.mkdir(exist_ok=True)
    base_file = scores / "base.json"
    if not base_file.exists():
        base = [cut_at_stop(lab.tok.decode(x)) for x in greedy(lab.model, lab.tok, [e.locality[0][0] for e in edits])]
        common.write_atomic(base_file, lambda p: p.write_text(json.dumps(base)))
    base_loc = json.loads(base_file.read_text())
    rows = []
    for e in wanted:
        f = scores / f"e{e:03d}.json"
        if not f.exists():
            t0 = time.time()
            s = score(lab, edits, cache, hp, torch.load(work / "snaps" / f"e{e:03d}.pt"), base_loc)
            common.write_atomic(f, lambda p: p.write_text(json.dumps(s)))
            print(f"scored epoch {e} in {time.time() - t0:.0f}s", flush=True)
        rows.append(common.show(summary(e, log, json.loads(f.read_text()))))
    if not a.score_now:
        write(a, argv, tag, hp, log, stops, rows)


def write(a, argv, tag, hp, log, stops, rows):
    by_epoch = {r["epoch"]: r for r in rows}
    n = log["n_edits"]
    lines = [f"# Step budget: {tag}", "", f"`python experiments/budget.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             f"{n} edits, layer {hp.layer} `{hp.module}`, lr {hp.lr:g}, batch {log['batch_size']} "
             f"({log['epochs'][0]['steps'] + log['epochs'][0]['skipped']} steps per epoch), up to {a.cap} epochs; "
             f"{log['epochs_run']} run, {log['prefix_seconds']:.0f} s prefix pass, "
             f"{sum(e['seconds'] for e in log['epochs']) / log['epochs_run']:.1f} s per epoch on this CPU.", "",
             "| epoch | steps | mean loss | learnt in epoch | learnt | reliability | learnt = reliable | "
             "learnt, not reliable | reliable, not learnt | generalization | locality unchanged |",
             "|---" * 11 + "|"]
    for r in rows:
        lines.append(f"| {r['epoch']} | {r['steps']} | {r['mean_loss']:.4f} | {r['learnt_in_epoch']:.3f} | {r['learnt']:.3f} | "
                     f"{r['reliability']:.3f} | {r['agreement']:.3f} | {r['learnt_not_reliable']} | {r['reliable_not_learnt']} | "
                     f"{r['generalization']:.3f} | {r['locality_unchanged']:.3f} |")
    lines += ["", "Where each stopping rule stops (budget.py; P patience, G min gain):", "",
              "| rule | stops after epoch | reliability | generalization | locality unchanged |", "|---|---|---|---|---|"]
    for name, e in stops.items():
        r = by_epoch[e]
        lines.append(f"| {name} | {e} | {r['reliability']:.3f} | {r['generalization']:.3f} | {r['locality_unchanged']:.3f} |")
    out = Path(a.out) / "budget"
    fig = plot(log, rows, tag)
    common.save(out, tag, "\n".join(lines) + "\n",
                {"args": vars(a), "tag": tag, "batch_size": log["batch_size"], "epochs": log["epochs"],
                 "prefix_seconds": log["prefix_seconds"], "rows": rows, "stops": stops}, fig)
    print("\n".join(lines))


def plot(log, rows, tag):
    fig, (ax, ax2) = common.pyplot().subplots(1, 2, figsize=(10, 3.6))
    ep = [e["epoch"] for e in log["epochs"]]
    n = log["n_edits"]
    ax.plot(ep, [e["mean_loss"] for e in log["epochs"]], color="black")
    ax.set_yscale("log")
    ax.axhline(edit.STOP_LOSS, color="grey", linestyle="dotted")
    ax.set_xlabel("epoch")
    ax.set_title("epoch mean loss (dotted: the stop loss)", fontsize=9)
    ax2.plot(ep, [e["learnt"] / n for e in log["epochs"]], label="learnt during the epoch", color="grey")
    for k in ("learnt", "reliability", "generalization", "locality_unchanged"):
        ax2.plot([r["epoch"] for r in rows], [r[k] for r in rows], marker="o", markersize=3, label=k)
    ax2.set_ylim(0, 1.05)
    ax2.set_xlabel("epoch")
    ax2.set_title(tag, fontsize=9)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
