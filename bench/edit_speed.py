"""Edit speed: edit.py's LocFT-BF loop against a plain transformers loop doing the same algorithm.

    python bench/edit_speed.py                      # CPU: SmolLM2-135M, first 100 ZsRE edits
    python bench/edit_speed.py --gpu-synthetic      # GPU: random Qwen2.5-7B-shaped model, bf16, 3,000 edits
    python bench/edit_speed.py --gpu-synthetic --n-synthetic 100000 --cache-device cpu --epochs 1
    python bench/edit_speed.py --gpu-synthetic --shape 72b --devices cuda:0,cuda:1 --cache-device cpu
    python bench/edit_speed.py --gpu-synthetic --shape tiny --device cpu   # the same code path, tiny

Both loops train the same tensor on the same token ids with the same seed, lr, batch size,
per-epoch shuffle (torch.Generator), per-sample averaged target CE, step skip below 1e-2 and
early stop on the size-weighted epoch mean. The difference is the forward: transformers runs
every layer over prompt + target and the LM head at every position; edit.py runs layers
0..L-1 once (the prefix cache), packs each mini-batch without padding, and applies the head
only where a target token is predicted. Each loop runs in its own subprocess so peak RSS (or
peak GPU memory) is its own. Reliability = greedy exact match on the edit prompts, computed
the same way for both (our model holding the trained tensor). A script, not a test: it never
asserts timings.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import edit  # noqa: E402
import evaluate  # noqa: E402
import generate  # noqa: E402
import model as model_lib  # noqa: E402
import preflight  # noqa: E402

SHAPES = {  # Qwen2.5-7B's and Qwen2.5-72B's configs, and a tiny one to test the code path on a CPU
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1e6,
               rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
               pad_token_id=151643),
    "72b": dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1e6,
                rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
                pad_token_id=151643),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, rope_theta=1e6, rms_norm_eps=1e-6,
                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------------------------
# The plain transformers loop: the authors' algorithm, full forward


def hf_loss(hf, batch):
    """Full forward over prompt + target, logits at every position, CE on targets, per-sample mean."""
    logits = hf(input_ids=batch.ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
    logits, labels, mask = logits[:, :-1].float(), batch.ids[:, 1:], batch.target_mask[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none").view(labels.shape)
    per_sample = (ce * mask).sum(1) / mask.sum(1)
    return per_sample.mean()


def train_hf(hf, encoded, pad_id, name, hp: edit.Hparams, say=print):
    dev = next(hf.parameters()).device
    hf.requires_grad_(False)
    frozen_dtype = next(hf.parameters()).dtype
    orig = hf.get_parameter(name)
    p = torch.nn.Parameter(orig.detach().float().clone())  # fp32 master copy, as edit.py
    owner, attr = name.rsplit(".", 1)
    setattr(hf.get_submodule(owner), attr, p)
    opt = torch.optim.Adam([p], lr=hp.lr, weight_decay=hp.weight_decay)
    autocast = torch.autocast(dev.type, dtype=frozen_dtype, enabled=frozen_dtype != torch.float32)
    g = torch.Generator().manual_seed(hp.seed)
    n, bs = len(encoded), hp.batch_size
    epochs = []
    for epoch in range(1, hp.epochs + 1):
        t0 = time.time()
        perm = torch.randperm(n, generator=g).tolist()
        total, steps = 0.0, 0
        for s in range(0, n, bs):
            idx = perm[s:s + bs]
            batch = data.collate([encoded[i] for i in idx], pad_id).to(dev)
            with autocast:
                loss = hf_loss(hf, batch)
            total += loss.item() * len(idx)
            if loss.item() < edit.STOP_LOSS:
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        mean = total / n
        epochs.append(mean)
        say(f"  hf epoch {epoch}: loss {mean:.4f}, steps {steps}, {time.time() - t0:.1f}s")
        if mean < edit.STOP_LOSS:
            break
    setattr(hf.get_submodule(owner), attr, orig)
    return {name: p.detach()}, epochs


# ----------------------------------------------------------------------------------------------
# Reliability: greedy exact match on the edit prompts, the authors' stop rules


def reliability(m, tok, edits) -> float:
    ids = generate.greedy(m, tok, [e.prompt for e in edits])
    return sum(evaluate.exact_match(generate.cut_at_stop(tok.decode(x)), e.target) for x, e in zip(ids, edits)) / len(edits)


# ----------------------------------------------------------------------------------------------
# One run (in a subprocess)


def run_one(a) -> dict:
    torch.manual_seed(0)
    ckpt = Path(a.ckpt)
    edits = data.load_edits(a.data, n=a.n)
    hp = edit.Hparams(layer=a.layer, module="down_proj", lr=a.lr, batch_size=a.batch_size, epochs=a.epochs,
                      seed=a.seed, patience=0)  # the transformers loop has no plateau stop
    name = f"model.layers.{a.layer}.mlp.down_proj.weight"
    quiet = (lambda s: print(s, file=sys.stderr, flush=True)) if a.verbose else (lambda s: None)
    if a.only == "ours":
        m, tok = model_lib.load(ckpt)
        t0 = time.time()
        trained, log = edit.edit(m, tok, edits, hp, say=quiet)
        sec, epochs = time.time() - t0, log["epochs_run"]
    else:
        import transformers

        tok = model_lib.Tokenizer(ckpt, model_lib.read_args(ckpt))  # the same token ids for both loops
        hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        encoded = [data.encode_edit(tok, e.prompt, e.target) for e in edits]
        t0 = time.time()
        trained, losses = train_hf(hf, encoded, tok.pad_id, name, hp, say=quiet)
        sec, epochs = time.time() - t0, len(losses)
        del hf
    rss = peak_rss_mb()  # before evaluation loads anything more
    m, tok = model_lib.load(ckpt)
    m.load_tensors(trained)
    return {"loop": a.only, "seconds": sec, "peak_rss_mb": rss, "epochs": epochs,
            "reliability": reliability(m, tok, edits)}


class IdTokenizer:
    """Synthetic edits are written as token ids ("812 77 4051"); this reads them back."""

    def __init__(self, eos_id, pad_id):
        self.eos_id, self.pad_id = eos_id, pad_id

    def encode(self, text, add_special_tokens=True):
        return [int(t) for t in text.split()]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def run_synthetic(a) -> dict:
    """A random Qwen2.5-shaped model (bf16 on CUDA), synthetic edits of ZsRE-like length."""
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    devices = a.devices.split(",") if a.devices else [str(dev)]
    dtype = torch.bfloat16 if dev.type == "cuda" and a.dtype != "float32" else torch.float32
    cfg_d = SHAPES[a.shape]
    L = a.layer
    V, eos, pad = cfg_d["vocab_size"], cfg_d["eos_token_id"], cfg_d["pad_token_id"]
    g = torch.Generator().manual_seed(0)
    rand = lambda k: " ".join(str(t) for t in torch.randint(3, min(V, 150000), (k,), generator=g).tolist())
    # ZsRE-like: prompts of 8-16 tokens, answers of 2-6 tokens (+ EOS)
    edits = [data.Edit(rand(int(torch.randint(8, 17, (1,), generator=g))), rand(int(torch.randint(2, 7, (1,), generator=g))))
             for _ in range(a.n_synthetic)]
    tok = IdTokenizer(eos, pad)
    hp = edit.Hparams(layer=L, lr=a.lr, batch_size=a.batch_size, epochs=a.epochs, seed=a.seed, patience=0)
    name = f"model.layers.{L}.mlp.down_proj.weight"
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    torch.manual_seed(0)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the peak includes building the model, as loading it would
    if a.only == "ours":
        args = model_lib.ModelArgs.from_config({"model_type": "qwen2", **cfg_d})
        with torch.device("meta"):
            m = model_lib.Transformer(args)
        m.to(dtype).place(devices)  # cast on "meta", then allocated in bf16 on CUDA: never an fp32 copy
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.fill_(1.0) if n.endswith("norm.weight") else p.normal_(0, 0.02)
        m.requires_grad_(False).eval()
        load_peak = _peak(dev)
        _sync(dev)
        t0 = time.time()  # the prefix cache is part of our run's time
        _, log = edit.edit(m, tok, edits, hp, cache_device=a.cache_device, say=say)
        _sync(dev)
        sec, epochs = time.time() - t0, log["epochs_run"]
    else:
        import transformers

        torch.set_default_dtype(dtype)  # built directly in bf16: no fp32 7B copy on the GPU
        with torch.device(dev):
            hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg_d)).eval()
        torch.set_default_dtype(torch.float32)
        encoded = [data.encode_edit(tok, e.prompt, e.target) for e in edits]
        load_peak = _peak(dev)
        _sync(dev)
        t0 = time.time()
        _, losses = train_hf(hf, encoded, pad, name, hp, say=say)
        _sync(dev)
        sec, epochs = time.time() - t0, len(losses)
    plan = preflight.memory_plan(model_lib.ModelArgs.from_config({"model_type": "qwen2", **cfg_d}),
                                 [len(data.encode_edit(tok, e.prompt, e.target)[0]) for e in edits], hp, dtype,
                                 devices, a.cache_device)
    return {"loop": a.only, "seconds": sec, "peak_gpu_gib": _peak(dev), "load_peak_gpu_gib": load_peak,
            "plan_gpu_gib": sum(v for k, v in plan["need"].items() if k.startswith("cuda")) / 2**30,
            "peak_rss_mb": peak_rss_mb(), "epochs": epochs, "edits": a.n_synthetic}


def _peak(dev) -> float:
    """The peak GPU memory so far (GiB, every GPU together); NaN on a CPU."""
    if dev.type != "cuda":
        return float("nan")
    return sum(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())) / 2**30


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "zsre_2k.json"))
    p.add_argument("--ckpt", default=str(ROOT / "weights" / "smollm2-135m"))
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--layer", type=int, default=22)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu-synthetic", action="store_true", help="random Qwen2.5-7B-shaped model, bf16, synthetic edits")
    p.add_argument("--shape", choices=list(SHAPES), default="7b", help="--gpu-synthetic model shape")
    p.add_argument("--n-synthetic", type=int, default=3000)
    p.add_argument("--device", default=None, help="--gpu-synthetic: default cuda when available")
    p.add_argument("--devices", default=None, help="--gpu-synthetic: spread our model's layers over these devices")
    p.add_argument("--cache-device", default=None, help="--gpu-synthetic: where our prefix cache lives (cpu, disk)")
    p.add_argument("--dtype", default=None, help="--gpu-synthetic: float32 trains the frozen model in fp32 on CUDA "
                                                 "too, as the authors do (default: bf16 there)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default: torch's); 1 avoids OpenMP thrashing on a shared, busy CPU")
    p.add_argument("--only", choices=["ours", "hf"], help=argparse.SUPPRESS)  # one run, in the subprocess
    p.add_argument("--verbose", action="store_true", help="print each epoch of both loops to stderr")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.gpu_synthetic and "--layer" not in sys.argv:  # LocFT-BF's location for Qwen2.5-7B, the same depth for 72B
        a.layer = {"7b": 6, "72b": 19, "tiny": 1}[a.shape]
    if a.gpu_synthetic and a.batch_size == 10 and "--batch-size" not in sys.argv:
        a.batch_size = 100  # the authors' batch for 3,000 edits
    if a.only:
        res = run_synthetic(a) if a.gpu_synthetic else run_one(a)
        print("RESULT " + json.dumps(res), flush=True)
        return
    results = {}
    # the plain loop cannot place a 72B model over devices, nor hold 100K edits' batches: ours alone then
    alone = a.gpu_synthetic and (a.shape == "72b" or a.devices or a.n_synthetic > 10000)
    for loop in ("ours",) if alone else ("ours", "hf"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--only", loop, "--layer", str(a.layer),
               "--batch-size", str(a.batch_size)]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        if r.returncode != 0 or not lines:
            sys.exit(f"{loop} run failed:\n{r.stderr[-3000:]}")
        results[loop] = json.loads(lines[-1][len("RESULT "):])
    what = (f"synthetic {a.shape} ({a.n_synthetic} edits)" if a.gpu_synthetic
            else f"{Path(a.ckpt).name}, first {a.n} edits of {Path(a.data).name}")
    print(f"{what}, layer {a.layer} down_proj, batch {a.batch_size}, lr {a.lr:g}, up to {a.epochs} epochs, "
          f"{torch.get_num_threads()} threads")
    names = {"ours": "edit.py (prefix cache)", "hf": "transformers loop"}
    for loop, r in results.items():
        extra = (f", peak GPU {r['peak_gpu_gib']:.2f} GiB (loading {r['load_peak_gpu_gib']:.2f}; "
                 f"plan {r['plan_gpu_gib']:.2f})" if a.gpu_synthetic else
                 f", reliability {r['reliability']:.2f}")
        print(f"{names[loop]:24s} {r['seconds']:8.1f} s, {r['epochs']} epochs, peak RSS {r['peak_rss_mb']:.0f} MB{extra}")
    if "hf" in results:
        print(f"speed-up: {results['hf']['seconds'] / results['ours']['seconds']:.2f}x")
    else:
        print(f"per edit and epoch: {results['ours']['seconds'] / results['ours']['epochs'] / results['ours']['edits'] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
