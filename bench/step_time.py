"""Training-step time of LocFT-BF on a CPU, and the host syncs a GPU would pay per step.

    python bench/step_time.py                                   # this checkout
    python bench/step_time.py --code /tmp/old . --repeats 3     # two versions, interleaved runs

Each run is a subprocess that imports the project from its `--code` directory, builds the
prefix cache, then trains `--epochs` epochs of LocFT-BF; the time per step is the training
loop's own time (the log's epoch seconds, prefix pass excluded) over its steps, skipped ones
included, measured as the process's CPU time (`time.process_time`), so that other programs on
a shared machine do not count; with one thread that is the work the loop does. Runs of the
versions alternate; the table gives each version's median. Host syncs are counted on one step (batch loss, its value, backward)
with bench/syncs.py. `--moe` times a small random Qwen2-MoE model instead (sparse layers: the
routed experts' loop). A script, not a test: it never asserts timings.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_run(a) -> dict:
    sys.path.insert(0, str(Path(a.only).resolve()))
    import torch

    import data
    import edit
    import model as model_lib
    from syncs import HostSyncs

    torch.set_num_threads(a.threads)
    ckpt = a.ckpt
    if a.moe:
        sys.path.insert(0, str(ROOT / "tests"))
        import transformers
        from tiny import MOE, make_checkpoint

        ckpt = tempfile.mkdtemp()
        cfg = dict(MOE, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                   shared_expert_intermediate_size=256, num_experts=16, num_experts_per_tok=4, num_hidden_layers=6)
        make_checkpoint.__globals__["VARIANTS"]["bench-moe"] = lambda: transformers.Qwen2MoeConfig(**cfg)
        make_checkpoint(Path(ckpt), "bench-moe")
    model, tok = model_lib.load(ckpt)
    if a.moe:
        words = [f"w{i}" for i in range(3, 300)]
        g = torch.Generator().manual_seed(0)
        pick = lambda k: " ".join(words[int(i)] for i in torch.randint(0, len(words), (k,), generator=g))  # noqa: E731
        edits = [data.Edit(pick(10), pick(3)) for _ in range(a.n)]
    else:
        edits = data.load_edits(a.data, n=a.n)
    hp = edit.Hparams(layer=a.layer, batch_size=a.batch_size, epochs=a.epochs, lr=a.lr,
                      module="shared_expert.down_proj" if a.moe else "down_proj")  # every MoE layer is sparse
    import time

    wall = time.time
    time.time = time.process_time  # the log's epoch seconds become this process's CPU seconds
    _, log = edit.edit(model, tok, edits, hp, say=lambda s: None)
    time.time = wall
    steps = sum(e["steps"] + e["skipped"] for e in log["epochs"])
    seconds = sum(e["seconds"] for e in log["epochs"])
    _, cache, reg = edit.prepare(model, tok, edits, hp)[:3]  # (a retain pool follows in newer versions)
    select = getattr(model_lib, "select_params", None) or edit.select_params  # edit.py's before the restructure
    params = select(model, hp.layer, hp.module)
    for p in params.values():
        p.requires_grad_(True)
    with HostSyncs() as syncs:
        loss = edit.batch_loss(model, cache, list(range(hp.batch_size)), hp, reg)
        loss.item()
        loss.backward()
    return {"code": a.only, "step_ms": 1e3 * seconds / steps, "steps": steps, "syncs": syncs.count,
            "sync_ops": dict(syncs.ops), "epochs": [round(e["mean_loss"], 6) for e in log["epochs"]]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--code", nargs="+", default=[str(ROOT)], help="project directories to time (default: this one)")
    p.add_argument("--ckpt", default=str(ROOT / "weights" / "smollm2-135m"))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "zsre_2k.json"))
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--layer", type=int, default=22)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--moe", action="store_true", help="a random Qwen2-MoE model (6 layers, 16 experts, top 4)")
    p.add_argument("--only", help=argparse.SUPPRESS)
    a = p.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    if a.only:
        print("RESULT " + json.dumps(one_run(a)), flush=True)
        return
    if a.moe and "--layer" not in sys.argv:
        a.layer = 2
    runs = {c: [] for c in a.code}
    for r in range(a.repeats):
        for c in a.code:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--only", c, "--layer", str(a.layer)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                sys.exit(f"{c} failed:\n{out.stderr[-3000:]}")
            res = json.loads(lines[-1][len("RESULT "):])
            runs[c].append(res)
            print(f"run {r + 1} {c}: {res['step_ms']:.1f} CPU ms/step over {res['steps']} steps, epoch losses {res['epochs']}",
                  flush=True)
    what = "random Qwen2-MoE (6 layers, 16 experts, top 4)" if a.moe else Path(a.ckpt).name
    print(f"{what}, layer {a.layer}, {a.n} edits, batch {a.batch_size}, {a.epochs} epochs, {a.threads} thread(s)")
    for c, rs in runs.items():
        print(f"{c}: median {statistics.median(r['step_ms'] for r in rs):.1f} CPU ms/step "
              f"(runs {', '.join('%.1f' % r['step_ms'] for r in rs)}); host syncs per step {rs[0]['syncs']} "
              f"{rs[0]['sync_ops']}")


if __name__ == "__main__":
    main()
