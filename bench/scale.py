"""Large edit sets on a CPU: time per edit, peak memory and prefix-cache bytes, and the
projection to 100K edits.

    python bench/scale.py --edits zsre_2k.json --n 10000          # SmolLM2-135M, 2 epochs

ZsRE-shaped edits: the records of `--edits` in turn, as many times as it takes (10,000 from a
2,000-record file: each five times; repeats cost what new edits of the same length cost).
Training runs `--epochs` epochs of edit.py's defaults (batch 100 from 1,000 edits on); the
prefix pass and each epoch are timed apart, since both grow linearly with the tokens, and the
100K projection scales them by the token count. A script, not a test.
"""
import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import edit  # noqa: E402
import preflight  # noqa: E402
import model as model_lib  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=str(ROOT / "weights" / "smollm2-135m"))
    p.add_argument("--edits", required=True)
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--layer", default="22")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--cache-device", default=None, help="cpu or disk (default: the model's)")
    p.add_argument("--project", type=int, default=100000)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"))
    a = p.parse_args()
    records = data.load_edits(a.edits)
    edits = [records[i % len(records)] for i in range(a.n)]
    model, tok = model_lib.load(a.ckpt)
    hp = edit.Hparams(layer=preflight.resolve_layer(a.layer, model.args.n_layers), epochs=a.epochs)
    lines = []
    t0 = time.time()
    _, log = edit.edit(model, tok, edits, hp, a.cache_device, say=lambda s: (lines.append(s), print(s, flush=True)))
    total = time.time() - t0
    tokens = sum(len(data.encode_edit(tok, e.prompt, e.target)[0]) for e in edits)
    epoch_s = sum(e["seconds"] for e in log["epochs"]) / len(log["epochs"])
    cache_bytes = tokens * model.args.dim * 4
    res = {"edits": a.n, "tokens": tokens, "batch_size": log["batch_size"], "prefix_seconds": log["prefix_seconds"],
           "epoch_seconds": epoch_s, "ms_per_edit_epoch": epoch_s / a.n * 1e3, "seconds": total,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cache_bytes": cache_bytes,
           "projected": {"edits": a.project, "cache_gb": cache_bytes * a.project / a.n / 2**30,
                         "prefix_seconds": log["prefix_seconds"] * a.project / a.n,
                         "epoch_seconds": epoch_s * a.project / a.n}}
    print(json.dumps(res, indent=1))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".tmp").write_text(json.dumps({"args": vars(a), **res}, indent=1))
    out.with_suffix(".tmp").replace(out)


if __name__ == "__main__":
    main()
