"""Every path that differs on CUDA, checked in one run: a PASS, FAIL or INFO line per check.

    bash bench/gpu_check.sh          # one GPU, under 8 minutes; downloads nothing
    bash bench/gpu_check.sh --cpu    # the same checks on a CPU with tiny shapes (a dry run; CI runs it)

The checkpoints are random-weight Qwen2-shaped models this script writes (config.json,
model.safetensors in bf16, a word-level tokenizer.json), the edits random words. Each check
prints what it measured next to its verdict; `--only NAME` runs one check. A script, not a test:
the thresholds are sanity bounds for a first run on new hardware, not speed goals.
"""
import argparse
import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import data  # noqa: E402
import delta  # noqa: E402
import devices  # noqa: E402
import edit  # noqa: E402
import evaluate  # noqa: E402
import generate  # noqa: E402
import model as model_lib  # noqa: E402
import preflight  # noqa: E402
from syncs import HostSyncs  # noqa: E402

# a small Qwen2 (GQA, q/k/v biases) on the GPU; a tiny one for the dry run
SHAPES = {"cuda": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=2, vocab_size=4096, edits=200, layer=4),
          "cpu": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=320, edits=12, layer=2)}
RESULTS = []


def report(verdict: str, name: str, detail: str):
    RESULTS.append(verdict)
    print(f"{verdict} {name}: {detail}", flush=True)


# ----------------------------------------------------------------------------------------------
# Inputs written here: a random checkpoint, random edits


def write_checkpoint(path: Path, shape: dict, stored: str = "bfloat16", std: float = 0.08) -> Path:
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    path.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": "qwen2", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
           "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
           "torch_dtype": stored, **{k: v for k, v in shape.items() if k not in ("edits", "layer")}}
    (path / "config.json").write_text(json.dumps(cfg))
    args = model_lib.ModelArgs.from_config(cfg)
    with torch.device("meta"):
        m = model_lib.Transformer(args)
    m.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for n, p in m.named_parameters():
        t = torch.ones(p.shape) if n.endswith("norm.weight") else torch.randn(p.shape, generator=g) * std
        tensors[n] = t.to(devices.DTYPES[stored]).contiguous()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, args.vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.save(str(path / "tokenizer.json"))
    return path


def random_edits(n: int, vocab: int, seed: int = 0, prompt_words=(3, 8)) -> list[data.Edit]:
    g = torch.Generator().manual_seed(seed)
    words = lambda k: " ".join(f"w{int(i)}" for i in torch.randint(3, vocab, (k,), generator=g))  # noqa: E731
    size = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    return [data.Edit(words(size(*prompt_words)), words(size(1, 3))) for _ in range(n)]


def write_edits(path: Path, edits) -> Path:
    path.write_text("".join(json.dumps(e.to_json()) + "\n" for e in edits))
    return path


# ----------------------------------------------------------------------------------------------
# Helpers


def peak_reset(dev):
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(dev) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")


def cli(c, *args) -> tuple[int, float, float]:
    """edit.py in this process, its progress lines kept back: (exit status, seconds, peak GPU GiB);
    an error line is shown."""
    peak_reset(c.dev)
    t0 = time.time()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        rc = edit.main([str(a) for a in args])
    if rc:
        print(f"  edit.py {' '.join(map(str, args))}: {err.getvalue().strip()}", flush=True)
    return rc, time.time() - t0, peak_gib(c.dev)


def delta_of(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "delta.safetensors"))


def rel_diff(a: dict, b: dict) -> float:
    return max(((a[k].float() - b[k].float()).abs().max() / a[k].float().abs().max()).item() for k in a)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# The checks


def check_attention(c):
    """Masked attention backward at a length with T % 128 == 64 and very negative row
    log-sum-exps (the pattern of pytorch#196678): the kernels model.attend picks give finite
    gradients equal to fp32 math; torch's own choice is reported beside it."""
    T, D, dtype = (704, 64, torch.bfloat16) if c.dev == "cuda" else (192, 16, torch.float32)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, T, D, generator=g) * 0.1, torch.randn(1, 4, T, D, generator=g) * 0.1
    v = torch.randn(1, 4, T, D, generator=g)  # as many k/v heads as queries: torch would pick cuDNN here
    q[..., 0], k[..., 0] = 1.0, -120 * math.sqrt(D)  # every logit about -120: log-sum-exps below -88.7
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    grad_out = torch.randn(1, 4, T, D, generator=g)

    def grads(choose, device, dt):
        x = [t.detach().to(device, dt, copy=True).requires_grad_() for t in (q, k, v)]
        y = model_lib.attend(*x, mask.to(device), choose_kernel=choose)
        y.backward(grad_out.to(device, dt))
        return [t.grad.detach().to("cpu", torch.float32, copy=True) for t in x]

    ours, ref = grads(None, c.dev, dtype), grads(True, "cpu", torch.float32)
    finite = all(torch.isfinite(t).all() for t in ours)
    err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, ref))
    theirs = grads(False, c.dev, dtype)
    report("PASS" if finite and err < 5e-2 else "FAIL", "attention",
           f"masked backward at T={T} ({str(dtype)[6:]}): finite {finite}, max rel. difference to fp32 math {err:.1e}; "
           f"torch's own kernel choice: finite {all(torch.isfinite(t).all() for t in theirs)}")


def check_load(c):
    """Loading a bf16 checkpoint peaks at the bf16 model (the plan's figure), not an fp32 copy."""
    hp = edit.Hparams(layer=c.layer)
    if c.dev == "cuda":
        peak_reset("cuda")
        m, _ = model_lib.load(c.ckpt, device="cuda")
        peak = torch.cuda.max_memory_allocated()
    else:  # the profiler's CPU allocations, safetensors' mapping of the file left out (see tests/test_scale.py)
        from itertools import accumulate

        from torch.profiler import ProfilerActivity, profile

        mapped = {f.stat().st_size for f in model_lib.checkpoint_files(c.ckpt)}
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            m, _ = model_lib.load(c.ckpt, dtype=torch.bfloat16)
        ev = sorted((e for e in prof.events() if e.self_cpu_memory_usage and
                     not (e.name == "[memory]" and abs(e.self_cpu_memory_usage) in mapped)), key=lambda e: e.time_range.start)
        peak = max(accumulate(e.self_cpu_memory_usage for e in ev))
    plan = preflight.memory_plan(m.args, [16] * 8, hp, next(m.parameters()).dtype, [c.dev], None)
    slack = 2**21 if c.dev == "cuda" else 4096  # the CUDA allocator's rounding; RoPE's table
    ok = next(m.parameters()).dtype == torch.bfloat16 and peak <= 1.01 * plan["model"] + slack
    report("PASS" if ok else "FAIL", "load", f"peak {peak / 2**20:.1f} MiB while loading, the plan's bf16 model "
           f"{plan['model'] / 2**20:.1f} MiB (an fp32 copy first would be {2 * plan['model'] / 2**20:.1f})")


def check_fp16(c):
    """A float16 checkpoint trains in bf16 on a GPU unless --dtype says otherwise."""
    args = model_lib.read_args(c.fp16)
    rule = model_lib.resolve_dtype(None, args, "cuda")
    rc, sec, _ = cli(c, "--ckpt", c.fp16, "--edits", c.edits, "--layer", c.layer, "--epochs", 2, "--lr", "1e-2",
                     "--out", c.tmp / "fp16", "--device", c.dev)
    log = json.loads((c.tmp / "fp16" / "train_log.json").read_text()) if rc == 0 else {}
    report("PASS" if rule == torch.bfloat16 and rc == 0 else "FAIL", "fp16",
           f"a float16 checkpoint's frozen dtype on CUDA: {str(rule)[6:]}; edit.py exit {rc}, "
           f"epoch losses {[round(e['mean_loss'], 3) for e in log.get('epochs', [])]}")


def check_packed(c):
    """Packed training rows (one of 704 tokens: T % 128 == 64) against the plain full forward
    over a right-padded batch: the same loss and gradient, fp32 tightly and bf16 loosely."""
    m32, tok = model_lib.load(c.ckpt, device=c.dev, dtype=torch.float32)
    edits = random_edits(44, c.vocab, seed=5, prompt_words=(12, 12))  # 12 + 3 target words + EOS = 16 tokens
    edits = [data.Edit(e.prompt, " ".join((e.target.split() * 3)[:3])) for e in edits]
    lines = []
    for dtype in (torch.float32, torch.bfloat16):
        m = m32 if dtype == torch.float32 else model_lib.load(c.ckpt, device=c.dev, dtype=dtype)[0]
        encoded = [data.encode_edit(tok, e.prompt, e.target) for e in edits]
        cache = data.PrefixCache(m, encoded, tok.pad_id, c.layer)
        name = f"model.layers.{c.layer}.mlp.down_proj.weight"
        hp = edit.Hparams(layer=c.layer)
        with edit.trainable_copies(m, [name]) as params:
            idx = list(range(len(edits)))
            T = cache.batch(idx)[1].ids.shape[1]
            loss_p = edit.batch_loss(m, cache, idx, hp)
            (g_p,) = torch.autograd.grad(loss_p, list(params.values()))
            padded = data.collate([encoded[i] for i in idx], tok.pad_id).to(c.dev)  # no padding: 16 tokens each
            with torch.autocast(c.dev, dtype=dtype, enabled=dtype != torch.float32):
                logits = m(padded.ids, logits_at=padded.predict_at)  # plain causal attention, torch's kernel
            ce = torch.nn.functional.cross_entropy(logits.float(), padded.labels, reduction="none")
            loss_f = padded.per_sample_mean(ce)[0].mean()
            (g_f,) = torch.autograd.grad(loss_f, list(params.values()))
        err = ((g_p - g_f).norm() / g_f.norm()).item()
        dl = abs(loss_p.item() - loss_f.item()) / loss_f.item()
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        lines.append((torch.isfinite(g_p).all().item() and err < tol and dl < tol, f"{str(dtype)[6:]}: loss "
                      f"{loss_p.item():.5f} vs {loss_f.item():.5f}, gradient rel. difference {err:.1e}"))
    report("PASS" if all(ok for ok, _ in lines) else "FAIL", "packed",
           f"one packed row of T={T} tokens (masked) vs 44 causal rows; " + "; ".join(s for _, s in lines))


def check_greedy(c):
    """greedy (the fast scheduler) against greedy_reference on the device: the same tokens in
    fp32; in bf16 the count of prompts that differ, at two batch sizes (docs/gpu.md says why)."""
    prompts = [e.prompt for e in random_edits(42, c.vocab, seed=6)]
    verdicts = []
    for dtype in (torch.float32, torch.bfloat16):
        m, tok = model_lib.load(c.ckpt, device=c.dev, dtype=dtype)
        ref = generate.greedy_reference(m, tok, prompts, 16)
        diffs = [sum(a != b for a, b in zip(generate.greedy(m, tok, prompts, 16, batch_size=bs), ref)) for bs in (64, 3)]
        verdicts.append((dtype, diffs))
    fp32 = verdicts[0][1]
    report("PASS" if fp32 == [0, 0] else "FAIL", "greedy",
           f"prompts where greedy differs from greedy_reference, batch 64 / 3: fp32 {fp32[0]} / {fp32[1]} of 42")
    report("INFO", "greedy-bf16", f"bf16 {verdicts[1][1][0]} / {verdicts[1][1][1]} of 42 (near ties flip with "
           f"the batch's padding in bf16; evaluation runs in fp32 where it fits)")


def check_syncs(c):
    """One training step waits for the device once (the loss's value): counted by CUDA's sync
    debug mode on a GPU, by bench/syncs.py on a CPU."""
    m, tok = model_lib.load(c.ckpt, device=c.dev)
    hp = edit.Hparams(layer=c.layer)
    _, cache, _, _ = edit.prepare(m, tok, random_edits(20, c.vocab, seed=7), hp)
    with edit.trainable_copies(m, model_lib.select_params(m, c.layer, hp.module)):
        edit.batch_loss(m, cache, list(range(10)), hp).backward()  # warm-up
        if c.dev == "cuda":
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    loss = edit.batch_loss(m, cache, list(range(10)), hp)
                    loss.item()
                    loss.backward()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            waits = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
            n = len(waits)
        else:
            with HostSyncs() as s:
                loss = edit.batch_loss(m, cache, list(range(10)), hp)
                loss.item()
                loss.backward()
            n, waits = s.count, dict(s.ops)
    report("PASS" if n == 1 else "FAIL", "syncs", f"{n} host waits in one step (batch loss, its value, backward): {waits}")


def reliability(c, run: Path) -> float:
    """Greedy exact match on the edit prompts, the delta applied to an fp32 model (the same for every run)."""
    m, tok = model_lib.load(c.ckpt, device=c.dev, dtype=torch.float32)
    delta.apply(m, run / "delta.safetensors")
    edits = data.load_edits(c.edits)
    out = generate.greedy(m, tok, [e.prompt for e in edits])
    return sum(evaluate.exact_match(generate.cut_at_stop(tok.decode(x)), e.target) for x, e in zip(out, edits)) / len(edits)


def check_dtype(c):
    """The same edits with the GPU default (bf16 frozen model, bf16 autocast) and with --dtype
    float32: loss curves, reliability, training time and peak memory."""
    runs = {}
    for label, flags in (("bf16", [] if c.dev == "cuda" else ["--dtype", "bfloat16"]), ("fp32", ["--dtype", "float32"])):
        out = c.tmp / f"dtype-{label}"
        rc, sec, peak = cli(c, "--ckpt", c.ckpt, "--edits", c.edits, "--layer", c.layer, "--lr", "2e-2", "--epochs", c.epochs,
                            "--out", out, "--device", c.dev, *flags)
        if rc != 0:
            report("FAIL", "dtype", f"edit.py {label} exited {rc}")
            return
        log = json.loads((out / "train_log.json").read_text())
        runs[label] = dict(curve=[round(e["mean_loss"], 3) for e in log["epochs"]], seconds=log["seconds"], peak=peak,
                           rel=reliability(c, out))
    b, f = runs["bf16"], runs["fp32"]
    first = abs(b["curve"][0] - f["curve"][0]) / f["curve"][0]  # before the two trajectories can part
    ok = abs(b["rel"] - f["rel"]) <= 0.1 and first < 0.05 and all(r["curve"][-1] < r["curve"][0] / 2 for r in (b, f))
    if c.dev == "cuda":
        ok = ok and b["peak"] < f["peak"]
    for label, r in runs.items():
        report("INFO", f"dtype-{label}", f"loss by epoch {r['curve']}, reliability {r['rel']:.3f}, "
               f"train {r['seconds']:.1f}s, peak GPU {r['peak']:.2f} GiB")
    report("PASS" if ok else "FAIL", "dtype", f"reliability bf16 {b['rel']:.3f} vs fp32 {f['rel']:.3f}, first epoch's "
           f"loss {first:.1%} apart, final loss {b['curve'][-1]} vs {f['curve'][-1]}, peak GPU {b['peak']:.2f} vs "
           f"{f['peak']:.2f} GiB, time {b['seconds']:.1f} vs {f['seconds']:.1f}s")


def check_eval_dtype(c):
    """edit.py --eval with the default dtype scores in fp32 where the fp32 model fits (the bf16
    training model is cast after training)."""
    out = c.tmp / "eval"
    rc, _, _ = cli(c, "--ckpt", c.ckpt, "--edits", c.edits, "--layer", c.layer, "--epochs", 1, "--out", out, "--eval",
                   "--device", c.dev)
    got = json.loads((out / "eval.json").read_text())["settings"]["dtype"] if rc == 0 else f"exit {rc}"
    report("PASS" if got == "float32" else "FAIL", "eval-dtype", f"edit.py --eval scored in {got}")


def check_placement(c):
    """--cache-device cpu and disk (pageable host memory, one pinned buffer per batch) and
    --devices DEV,DEV: the same delta as the plain run (fp32)."""
    common = ["--ckpt", c.ckpt, "--edits", c.edits, "--layer", c.layer, "--lr", "1e-2", "--epochs", 3, "--dtype", "float32"]
    rc, _, _ = cli(c, *common, "--device", c.dev, "--out", c.tmp / "plain")
    if rc != 0:
        report("FAIL", "placement", f"the plain run exited {rc}")
        return
    base = delta_of(c.tmp / "plain")
    for name, flags in (("cache-cpu", ["--device", c.dev, "--cache-device", "cpu"]),
                        ("cache-disk", ["--device", c.dev, "--cache-device", "disk"]),
                        ("devices", ["--devices", f"{c.dev}:0,{c.dev}:0" if c.dev == "cuda" else "cpu,cpu"])):
        rc, _, _ = cli(c, *common, *flags, "--out", c.tmp / name)
        if rc != 0:
            report("FAIL", name, f"edit.py {' '.join(flags)} exited {rc}")
            continue
        d = delta_of(c.tmp / name)
        diff = rel_diff(base, d)
        report("PASS" if diff < 1e-4 else "FAIL", name, f"{' '.join(flags)}: delta vs the plain run, max rel. "
               f"difference {diff:.1e} (bit-identical: {same(base, d)})")


def check_determinism(c):
    """Two identical fp32 runs on the device: bit for bit on a CPU; on a GPU atomics
    (index_add, attention's backward) may reorder sums (docs/gpu.md)."""
    m, tok = model_lib.load(c.ckpt, device=c.dev, dtype=torch.float32)
    edits = data.load_edits(c.edits)
    hp = edit.Hparams(layer=c.layer, lr=1e-2, epochs=3)
    a, b = (edit.edit(m, tok, edits, hp, say=lambda s: None)[0] for _ in range(2))
    diff, bits = rel_diff(a, b), same(a, b)
    report("PASS" if diff < 1e-4 and (bits or c.dev == "cuda") else "FAIL", "determinism",
           f"two identical fp32 runs: max rel. difference {diff:.1e}, bit-identical {bits}")


def check_torchrun(c):
    """torchrun: on one GPU, one NCCL process (set_device, device_id) gives the one-process delta
    and two processes are refused in one line; on a CPU, two gloo processes give it."""
    common = ["--ckpt", c.ckpt, "--edits", c.edits, "--layer", c.layer, "--lr", "1e-2", "--epochs", 2, "--dtype", "float32",
              "--batch-size", 4]
    rc, _, _ = cli(c, *common, "--device", c.dev, "--out", c.tmp / "one")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]

    def torchrun(n, out):
        return subprocess.run([*launch, "--nproc-per-node", str(n), str(ROOT / "edit.py"), *map(str, common),
                               "--device", "cuda" if c.dev == "cuda" else "cpu", "--out", str(out)],
                              capture_output=True, text=True, env=env, timeout=300)

    r = torchrun(1 if c.dev == "cuda" else 2, c.tmp / "many")
    if rc != 0 or r.returncode != 0:
        report("FAIL", "torchrun", f"exit {rc} / {r.returncode}: {r.stderr.strip()[-500:]}")
        return
    diff = rel_diff(delta_of(c.tmp / "one"), delta_of(c.tmp / "many"))
    n = 1 if c.dev == "cuda" else 2
    report("PASS" if diff < 1e-4 else "FAIL", "torchrun", f"{n} process(es), {'NCCL' if c.dev == 'cuda' else 'gloo'}: "
           f"delta vs one plain process, max rel. difference {diff:.1e}")
    if c.dev == "cuda" and torch.cuda.device_count() == 1:
        r = torchrun(2, c.tmp / "two")
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("edit.py: error")]
        ok = r.returncode != 0 and any("torchrun started 2 processes" in ln for ln in lines)
        report("PASS" if ok else "FAIL", "torchrun-refused", f"2 processes on 1 GPU: {lines[:1] or r.stderr[-300:]}")


def check_speed(c):
    """bench/edit_speed.py --gpu-synthetic at the Qwen2.5-7B shape (tiny on a CPU): it runs, and
    the peak GPU memory, loading included, stays within the memory plan."""
    cmd = [sys.executable, str(ROOT / "bench" / "edit_speed.py"), "--gpu-synthetic"]
    cmd += (["--shape", "7b", "--n-synthetic", "500", "--epochs", "2"] if c.dev == "cuda" else
            ["--shape", "tiny", "--device", "cpu", "--devices", "cpu", "--n-synthetic", "30", "--epochs", "1", "--threads", "1"])
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=420)
    ours = next((ln for ln in r.stdout.splitlines() if ln.startswith("edit.py (prefix cache)")), "")
    if r.returncode != 0 or not ours:
        report("FAIL", "edit-speed", f"exit {r.returncode}: {(r.stdout + r.stderr).strip()[-800:]}")
        return
    for ln in r.stdout.splitlines():
        report("INFO", "edit-speed", ln)
    ok, detail = True, ""
    if c.dev == "cuda":
        from edit_speed import SHAPES as SPEED

        peak, load, plan = (float(x) for x in re.search(r"peak GPU ([\d.]+) GiB \(loading ([\d.]+); plan ([\d.]+)\)", ours).groups())
        model = preflight.memory_plan(model_lib.ModelArgs.from_config({"model_type": "qwen2", **SPEED["7b"]}), [20],
                                      edit.Hparams(layer=6), torch.bfloat16, ["cuda"], None)["model"] / 2**30
        ok = peak <= plan and load <= 1.01 * model
        detail = f" (the bf16 model: {model:.2f} GiB; peak <= plan and loading <= the model: {ok})"
    report("PASS" if ok else "FAIL", "edit-speed", ours + detail)


CHECKS = {"attention": check_attention, "load": check_load, "fp16": check_fp16, "packed": check_packed,
          "greedy": check_greedy, "syncs": check_syncs, "dtype": check_dtype, "eval-dtype": check_eval_dtype,
          "placement": check_placement,
          "determinism": check_determinism, "torchrun": check_torchrun, "speed": check_speed}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="a dry run on the CPU with tiny shapes")
    p.add_argument("--only", choices=list(CHECKS), nargs="+", help="run these checks only")
    p.add_argument("--keep", help="write the checkpoints and runs here and keep them")
    a = p.parse_args()
    dev = "cpu" if a.cpu else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; --cpu runs the dry run")
    t0 = time.time()
    torch.set_num_threads(1 if a.cpu else min(8, torch.get_num_threads()))  # tiny shapes: threads only wait
    shape = SHAPES[dev]
    tmp = Path(a.keep or tempfile.mkdtemp(prefix="gpu-check-"))
    where = torch.cuda.get_device_name() if dev == "cuda" else "CPU (dry run)"
    print(f"gpu_check on {where}, torch {torch.__version__}, Python {sys.version.split()[0]}", flush=True)
    c = argparse.Namespace(dev=dev, tmp=tmp, layer=shape["layer"], vocab=shape["vocab_size"],
                           epochs=30 if dev == "cuda" else 15,
                           ckpt=write_checkpoint(tmp / "ckpt", shape), fp16=write_checkpoint(tmp / "ckpt-fp16", shape, "float16"),
                           edits=write_edits(tmp / "edits.jsonl", random_edits(shape["edits"], shape["vocab_size"])))
    try:
        for name in a.only or CHECKS:
            t = time.time()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    CHECKS[name](c)
            except Exception as e:  # a crash is a FAIL of that check; the others still run
                report("FAIL", name, f"{type(e).__name__}: {e} | {traceback.format_exc().splitlines()[-3].strip()}")
            print(f"  ({name}: {time.time() - t:.1f}s)", flush=True)
    finally:
        if not a.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    fails = RESULTS.count("FAIL")
    print(f"gpu_check: {RESULTS.count('PASS')} PASS, {fails} FAIL in {time.time() - t0:.0f}s", flush=True)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
