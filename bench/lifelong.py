"""Lifelong editing: which keeps earlier edits better, edits on top of edits or re-fitting them all?

    python bench/lifelong.py --edits zsre_2k.json          # SmolLM2-135M, 10 batches of 100 edits

Sequential (`edit.py --base-delta`): batch k is trained starting from the tensor batch k-1 left.
Cumulative (`edit.py --cumulative`): batches 1..k are re-fitted together from the base model.
After each batch (sequential) and after batches 1, 2, 5 and 10 (cumulative, which costs k times
as much), the greedy reliability of batch 1, of the newest batch, and of everything taught so
far. One model in memory; edit.py's defaults otherwise. A script, not a test.
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import edit  # noqa: E402
import preflight  # noqa: E402
import evaluate  # noqa: E402
import generate  # noqa: E402
import model as model_lib  # noqa: E402


def reliability(model, tok, edits) -> float:
    ids = generate.greedy(model, tok, [e.prompt for e in edits])
    return sum(evaluate.exact_match(generate.cut_at_stop(tok.decode(x)), e.target) for x, e in zip(ids, edits)) / len(edits)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=str(ROOT / "weights" / "smollm2-135m"))
    p.add_argument("--edits", required=True, help="a ZsRE file (any layout edit.py reads)")
    p.add_argument("--layer", default="22")
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--batch-edits", type=int, default=100)
    p.add_argument("--cumulative-at", default="1,2,5,10", help="after which batches to re-fit cumulatively")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "lifelong.json"))
    a = p.parse_args()
    model, tok = model_lib.load(a.ckpt)
    hp = edit.Hparams(layer=preflight.resolve_layer(a.layer, model.args.n_layers))
    edits = data.load_edits(a.edits, n=a.batches * a.batch_edits)
    batches = [edits[i * a.batch_edits:(i + 1) * a.batch_edits] for i in range(a.batches)]
    quiet = lambda s: None  # noqa: E731
    base = {n: p.detach().clone() for n, p in model_lib.select_params(model, hp.layer, hp.module).items()}
    rows = []
    trained = base
    for k, batch in enumerate(batches, 1):  # sequential: each batch on top of the last
        model.load_tensors(trained)
        t0 = time.time()
        trained, _ = edit.edit(model, tok, batch, hp, say=quiet)
        sec = time.time() - t0
        model.load_tensors(trained)
        seen = [e for b in batches[:k] for e in b]
        rows.append({"how": "sequential", "after": k, "batch1": reliability(model, tok, batches[0]),
                     "newest": reliability(model, tok, batch), "all": reliability(model, tok, seen), "train_s": sec})
        print(json.dumps(rows[-1]), flush=True)
    for k in (int(x) for x in a.cumulative_at.split(",")):  # cumulative: everything so far, from the base
        model.load_tensors(base)
        seen = [e for b in batches[:k] for e in b]
        t0 = time.time()
        trained, _ = edit.edit(model, tok, seen, hp, say=quiet)
        sec = time.time() - t0
        model.load_tensors(trained)
        rows.append({"how": "cumulative", "after": k, "batch1": reliability(model, tok, batches[0]),
                     "newest": reliability(model, tok, batches[k - 1]), "all": reliability(model, tok, seen),
                     "train_s": sec})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{Path(a.ckpt).name}, layer {hp.layer} {hp.module}, {a.batches} batches of {a.batch_edits} edits "
          f"from {Path(a.edits).name}; greedy reliability\n")
    print("| pipeline | after batch | batch 1 | newest batch | all so far | train s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['how']} | {r['after']} | {r['batch1']:.2f} | {r['newest']:.2f} | {r['all']:.2f} | {r['train_s']:.0f} |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".tmp").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    out.with_suffix(".tmp").replace(out)


if __name__ == "__main__":
    main()
