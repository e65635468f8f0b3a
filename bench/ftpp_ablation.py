"""FT++ ablation: what each regulariser buys on top of plain LocFT-BF (a script, not a test).

    python bench/ftpp_ablation.py            # 200 CounterFact edits, SmolLM2-135M, layer 22

Rows: plain / +smoothing / +general KL / +local KL / all three. Columns: reliability,
generalization, locality (output unchanged, and exact match with the given answer), perplexity
of data/heldout_text.txt before -> after with the per-token KL(base || edited), and seconds of
training. One model in memory; each row starts from the base weights.
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import data  # noqa: E402
import edit  # noqa: E402
import evaluate  # noqa: E402
import model as model_lib  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(ROOT / "weights" / "smollm2-135m"))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "counterfact_2k.json"))
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--layer", default="22")
    p.add_argument("--lr", type=float, default=None, help="default: edit.py's")
    p.add_argument("--alpha", type=float, default=0.1, help="--smooth-alpha for the smoothing rows")
    p.add_argument("--l1", type=float, default=1.0, help="--general-kl for the general-KL rows")
    p.add_argument("--l2", type=float, default=1.0, help="--local-kl for the local-KL rows")
    p.add_argument("--text", default=str(ROOT / "data" / "heldout_text.txt"), help="held-out text for drift")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "ftpp_ablation.json"))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = model_lib.load(args.ckpt)
    edits = data.load_edits(args.data, n=args.n)
    text = "\n".join(l for l in Path(args.text).read_text().splitlines() if l.strip() and not l.startswith("#"))
    rows = [
        ("plain LocFT-BF", {}),
        (f"+ smoothing (A={args.alpha:g})", {"smooth_alpha": args.alpha}),
        (f"+ general KL (L1={args.l1:g})", {"general_kl": args.l1}),
        (f"+ local KL (L2={args.l2:g})", {"local_kl": args.l2}),
        ("all three", {"smooth_alpha": args.alpha, "general_kl": args.l1, "local_kl": args.l2}),
    ]
    results, base_row = [], None
    for name, kw in rows:
        hp = edit.Hparams(layer=edit.resolve_layer(args.layer, model.args.n_layers),
                          **({"lr": args.lr} if args.lr else {}), **kw)
        print(f"== {name}", flush=True)
        t0 = time.time()
        trained, log = edit.edit(model, tok, edits, hp)
        seconds = time.time() - t0
        params = dict(model.named_parameters())
        base = {n: params[n].detach().clone() for n in trained}
        report = evaluate.before_after(model, tok, edits, base, trained, text=text)
        model.load_tensors(base)  # the next row starts from the base model again
        m = report["metrics"]
        pick = lambda key, col="edited": m[key][col]  # noqa: E731
        row = {"name": name, "reliability": pick("reliability (greedy EM)"),
               "generalization": pick("generalization (greedy EM)"),
               "locality_unchanged": pick("locality (output unchanged)"),
               "locality_em": pick("locality (EM vs given answer)"),
               "ppl_base": report["text"]["perplexity"]["base"], "ppl_edited": report["text"]["perplexity"]["edited"],
               "kl": report["text"]["kl_base_edited_per_token"], "seconds": seconds,
               "epochs": log["epochs_run"], "final_loss": log["final_loss"], "ftpp": log.get("ftpp")}
        if base_row is None:
            base_row = {"reliability": pick("reliability (greedy EM)", "base"),
                        "generalization": pick("generalization (greedy EM)", "base"),
                        "locality_em": pick("locality (EM vs given answer)", "base")}
        results.append(row)
        print(json.dumps(row), flush=True)

    print(f"\n{len(edits)} edits from {Path(args.data).name}, {Path(args.ckpt).name}, layer {args.layer}, "
          f"down_proj; held-out text {Path(args.text).name}\n")
    print("| run | reliability | generalization | locality (unchanged) | locality (EM) | held-out ppl | KL/token | train s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| unedited model | {base_row['reliability']:.3f} | {base_row['generalization']:.3f} | 1.000 | "
          f"{base_row['locality_em']:.3f} | {results[0]['ppl_base']:.2f} | 0 | - |")
    for r in results:
        print(f"| {r['name']} | {r['reliability']:.3f} | {r['generalization']:.3f} | {r['locality_unchanged']:.3f} | "
              f"{r['locality_em']:.3f} | {r['ppl_edited']:.2f} | {r['kl']:.4f} | {r['seconds']:.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"args": vars(args), "base": base_row, "rows": results}, indent=1))
    tmp.replace(out)


if __name__ == "__main__":
    main()
