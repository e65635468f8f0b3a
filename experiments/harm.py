"""Does the edit hurt the model? LocFT-BF at edit.py's defaults, scored with the harm preset.

    python experiments/harm.py --edits zsre_2k.json                  # SmolLM2 100, Qwen 100, SmolLM2 1000, Qwen 1000
    python experiments/harm.py --edits zsre_2k.json --runs smol-100  # one of them

Each run is two commands, the ones a user would type, run one after the other:

    python edit.py --ckpt CKPT --layer L --edits FILE --n N --out OUT/RUN
    python evaluate.py --ckpt CKPT --delta OUT/RUN/delta.safetensors --edits FILE --n N \\
        --capability harm --capability-cache OUT/base-cache --out OUT/RUN-harm.json

(the base model's half of the harm figures is computed once per model, in its first run).

With `--reuse DIR` (experiments/budget.py's --work), a run whose edits and settings a budget.py
run has trained to the defaults' stop takes that run's tensor of that epoch as its delta instead
of training again (the same tensor: stopping is truncation).

Resumable: a step whose output exists is skipped (an interrupted edit continues with --resume),
so the script can be killed and started again; runs go smallest first. The table is written
from whatever reports exist, to results/harm.{md,json}.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import delta  # noqa: E402
import edit  # noqa: E402
from experiments.capacity import from_budget  # noqa: E402
from experiments.common import edit_set, write_atomic  # noqa: E402

MODELS = {"smol": ("SmolLM2-135M", ROOT / "weights" / "smollm2-135m", 22),
          "qwen": ("Qwen2.5-Coder-0.5B", ROOT / "weights" / "qwen2.5-coder-0.5b", 17)}
RUNS = ["smol-100", "qwen-100", "smol-1000", "qwen-1000"]


def commands(run: str, edits: str, out: Path) -> list[tuple[Path, list[str]]]:
    """(the output that marks the step done, its command) for each step of `run`."""
    model, n = run.split("-")
    _, ckpt, layer = MODELS[model]
    d = out / run
    train = [sys.executable, "edit.py", "--ckpt", str(ckpt), "--layer", str(layer), "--edits", edits, "--n", n,
            "--out", str(d)]
    partial = out / f"{run}.partial"  # an interrupted edit: continue it, or start it afresh
    if partial.exists():
        train.append("--resume" if (partial / "checkpoint.pt").exists() else "--overwrite")
    evaluate = [sys.executable, "evaluate.py", "--ckpt", str(ckpt), "--delta", str(d / "delta.safetensors"),
                "--edits", edits, "--n", n, "--capability", "harm", "--capability-cache", str(out / "base-cache"),
                "--out", str(out / f"{run}-harm.json")]
    return [(d / "delta.safetensors", train), (out / f"{run}-harm.json", evaluate)]


def reuse(run: str, edits: str, out: Path, budget_work: Path) -> bool:
    """Write what edit.py would have written for `run` (its delta and log) from a budget.py run
    of the same edits and settings; False if there is none."""
    model, n = run.split("-")
    _, ckpt, layer = MODELS[model]
    hp, chosen = edit.Hparams(layer=layer), edit_set(edits, int(n))
    found = next(filter(None, (from_budget(r, chosen, hp) for r in sorted(budget_work.glob(f"{ckpt.name}-*-{n}-*")))),
                 None)
    if found is None:
        return False
    trained, log = found
    d = out / run
    tmp = out / f"{run}.reused"
    tmp.mkdir(parents=True, exist_ok=True)
    delta.save(tmp / "delta.safetensors", ckpt, trained, {"format": "pt", "layer": str(layer), "n_edits": n,
                                                          "reused": log["reused"]})
    tmp.joinpath("train_log.json").write_text(json.dumps(log, indent=1))
    tmp.rename(d)
    print(f"== {run} edit: the tensor of epoch {log['epochs_run']} of {log['reused']}", flush=True)
    return True


def row(run: str, report: dict, seconds: dict) -> dict:
    model, n = run.split("-")
    m, cap = report["metrics"], report["capability"]
    harm, text = cap["averages"]["harm"], cap["tasks"]["lambada_text"]["metrics"]
    out = {"run": run, "model": MODELS[model][0], "edits": int(n),
           "reliability": m["reliability (greedy EM)"]["edited"],
           "generalization": m["generalization (greedy EM)"]["edited"],
           "locality_unchanged": m["locality (output unchanged)"]["edited"],
           "harm": {k: harm[k] for k in ("base", "edited", "change", "ci95", "half_width", "flipped", "verdict")},
           "kl_per_token": text["kl_per_token"], "perplexity": text["perplexity"],
           "tokens": cap["tasks"]["lambada_text"]["tokens"], "tasks": {}, "seconds": seconds}
    tasks = [t for t in cap["tasks"].values() if t.get("kind") != "text"]
    for k in ("base", "edited", "base_cpu", "edited_cpu"):  # one weight set's cost: the tasks, wall and CPU
        seconds[f"capability_{k}"] = sum(t["seconds"][k] for t in tasks)
    seconds["text"], seconds["text_cpu"] = cap["tasks"]["lambada_text"]["seconds"].values()
    for name, t in cap["tasks"].items():
        if t.get("kind") != "text":
            c = t["metrics"][t["primary"]]
            out["tasks"][name] = {"metric": t["primary"], "n": t["n"], "chance": t["chance"],
                                  **{k: c[k] for k in ("base", "edited", "change", "ci95", "flipped", "verdict")},
                                  "seconds": t["seconds"]}
    return out


def table(rows: list[dict], edits: str) -> str:
    ci = lambda c: f"{c['change']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]"  # noqa: E731
    lines = ["# Does the edit hurt the model? (harm preset)", "",
             f"`python experiments/harm.py --edits {Path(edits).name}`; each run is `edit.py` at its defaults "
             "(`--layer` 22 for SmolLM2, 17 for Qwen2.5-Coder) on the first n ZsRE edits, then `evaluate.py "
             "--edits ... --capability harm`.", "",
             "| model, edits | reliability | generalization | locality (unchanged) | harm mean base → edited | "
             "change [95% CI] | ± from item variance | items flipped | LAMBADA KL(base ‖ edited)/token [95% CI] | "
             "perplexity base → edited |",
             "|---" * 10 + "|"]
    for r in rows:
        h, kl, p = r["harm"], r["kl_per_token"], r["perplexity"]
        lines.append(f"| {r['model']}, {r['edits']} | {r['reliability']:.2f} | {r['generalization']:.2f} | "
                     f"{r['locality_unchanged']:.2f} | {h['base']:.3f} → {h['edited']:.3f} | {ci(h)} "
                     f"{'**' + h['verdict'] + '**' if h['verdict'] != 'no measurable change' else ''} | "
                     f"±{h['half_width']:.3f} | {h['flipped']:.1%} | {kl['edited']:.4f} "
                     f"[{kl['ci95'][0]:.4f}, {kl['ci95'][1]:.4f}] | {p['base']:.2f} → {p['edited']:.2f} |")
    lines += ["", "Per task (primary metric; n documents; chance; base → edited; paired change [95% CI]; "
              "share of items whose score changed):", "",
              "| model, edits | task | n | chance | base → edited | change [95% CI] | flipped |", "|---" * 7 + "|"]
    for r in rows:
        for name, t in r["tasks"].items():
            lines.append(f"| {r['model']}, {r['edits']} | {name} ({t['metric']}) | {t['n']} | {t['chance']:.2f} | "
                         f"{t['base']:.3f} → {t['edited']:.3f} | {ci(t)} | {t['flipped']:.1%} |")
    lines += ["", "Seconds on the shared 2-core machine, wall clock and (in brackets) CPU seconds of the process, "
              "which is what a run costs when it has a core to itself (one thread, OMP_NUM_THREADS=1):", "",
              "| model, edits | edit.py training | evaluate.py in all | harm tasks, base weights | harm tasks, edited "
              "weights | LAMBADA text, both weight sets |", "|---" * 6 + "|"]
    for r in rows:
        s = r["seconds"]
        # under a second: read from --capability-cache, computed by an earlier run of the same model
        wall_cpu = lambda k: f"{s[k]:.0f} ({s[k + '_cpu']:.0f})" if s[k] >= 1 else "kept from an earlier run"  # noqa: E731
        secs = lambda k: f"{s[k]:.0f}" if k in s else "–"  # noqa: E731 (not timed: run by hand)
        lines.append(f"| {r['model']}, {r['edits']} | {secs('edit')} | {secs('evaluate')} | "
                     f"{wall_cpu('capability_base')} | "
                     f"{wall_cpu('capability_edited')} | {wall_cpu('text')} |")
    reused = [f"{r['model']}, {r['edits']}: {r['reused']}" for r in rows if r.get("reused")]
    if reused:
        lines += ["", "Deltas taken from an experiments/budget.py run of the same edits and settings (`--reuse`; "
                  "the tensor of the epoch the defaults stop at, its training seconds from that run): "
                  + "; ".join(reused) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--edits", required=True, help="ZsRE edit file (e.g. zsre_2k.json)")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    p.add_argument("--work", default=str(ROOT / "out" / "harm"), help="where deltas and reports go")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    p.add_argument("--reuse", metavar="DIR", help="budget.py's --work: take a run's tensor from there if it has one")
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    times_file = work / "seconds.json"
    times = json.loads(times_file.read_text()) if times_file.exists() else {}
    for run in a.runs.split(","):
        for (done, cmd), step in zip(commands(run, a.edits, work), ("edit", "evaluate")):
            if done.exists() or step == "edit" and a.reuse and reuse(run, a.edits, work, Path(a.reuse)):
                continue
            print(f"== {run} {step}: {' '.join(cmd)}", flush=True)
            t0 = time.time()
            subprocess.run(cmd, cwd=ROOT, check=True)
            times.setdefault(run, {})[step] = round(time.time() - t0, 1)
            write_atomic(times_file, lambda f: f.write_text(json.dumps(times, indent=1)))
    rows = []
    for run in RUNS:
        if (work / f"{run}-harm.json").exists():  # training seconds from edit.py's own log
            log = json.loads((work / run / "train_log.json").read_text())
            seconds = {**times.get(run, {}), "edit": log["seconds"]}
            rows.append({**row(run, json.loads((work / f"{run}-harm.json").read_text()), seconds),
                         "reused": log.get("reused") and f"epoch {log['epochs_run']} of {Path(log['reused']).name}"})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "harm.json", lambda f: f.write_text(json.dumps({"edits": a.edits, "rows": rows}, indent=1)))
    write_atomic(out / "harm.md", lambda f: f.write_text(table(rows, a.edits)))
    print(table(rows, a.edits), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
