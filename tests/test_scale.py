"""Scale: a killed run resumes to the same delta, torchrun's processes add up to one, the prefix
cache's memory is what the plan says, on disk as in memory."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import data
import edit
import preflight
import model as model_lib
from test_edit import random_edits, write_edits
from tiny import make_checkpoint

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    make_checkpoint(d, "llama")
    return d


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, str(ROOT / "edit.py"), *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=300, **kw)


def saved_epoch(path: Path) -> int:
    try:
        return torch.load(path, weights_only=True)["epoch"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return 0


def test_a_killed_run_resumes_to_the_same_delta_bit_for_bit(ckpt, tmp_path):
    edits = write_edits(tmp_path / "e.jsonl", random_edits(300, seed=7))
    common = ["--ckpt", ckpt, "--edits", edits, "--layer", "2", "--epochs", "5", "--batch-size", "2", "--lr", "1e-3"]
    r = run_cli(*common, "--out", tmp_path / "full")
    assert r.returncode == 0, r.stderr
    killed = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, str(ROOT / "edit.py"), *map(str, common), "--out", killed],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    checkpoint = tmp_path / "killed.partial" / "checkpoint.pt"
    while saved_epoch(checkpoint) < 2 and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)  # somewhere in epoch 3 (or 4): no chance to clean up
    p.wait()
    assert not killed.exists() and checkpoint.exists()
    done = saved_epoch(checkpoint)
    assert 2 <= done < 5  # it was killed before the end, and loses at most the epoch it was in
    # another learning rate, or other edits: refused, the checkpoint kept
    r = run_cli(*common[:-2], "--lr", "2e-3", "--out", killed, "--resume")
    assert r.returncode == 2 and "--resume" in r.stderr and "lr=0.001" in r.stderr and "0.002" in r.stderr
    other = write_edits(tmp_path / "other.jsonl", random_edits(300, seed=8))
    r = run_cli(*[other if a == edits else a for a in common], "--out", killed, "--resume")
    assert r.returncode == 2 and "other edits" in r.stderr and checkpoint.exists()
    # without --resume the unfinished run is not silently replaced
    r = run_cli(*common, "--out", killed)
    assert r.returncode == 2 and "--resume continues it" in r.stderr
    r = run_cli(*common, "--out", killed, "--resume")
    assert r.returncode == 0, r.stderr
    assert f"resuming from {checkpoint} after epoch {done}" in r.stdout
    assert not checkpoint.parent.exists()
    a, b = load_file(str(tmp_path / "full" / "delta.safetensors")), load_file(str(killed / "delta.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = (json.loads((d / "train_log.json").read_text())["epochs"] for d in (tmp_path / "full", killed))
    assert [e["mean_loss"] for e in la] == [e["mean_loss"] for e in lb]


def test_loading_peaks_at_the_model_in_its_dtype_which_the_plan_bounds(ckpt):
    """Every CPU allocation while loading in bf16, as the profiler records them: the peak is the
    bf16 model the plan counts, not an fp32 copy first (on CUDA the same code allocates the
    same way). safetensors maps each file it reads (the page cache, gone with the file): those
    allocations, of exactly a file's size, are left out."""
    from itertools import accumulate

    from torch.profiler import ProfilerActivity, profile

    mapped = {f.stat().st_size for f in model_lib.checkpoint_files(ckpt)}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        m, _ = model_lib.load(ckpt, dtype=torch.bfloat16)
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage and
                     not (e.name == "[memory]" and abs(e.self_cpu_memory_usage) in mapped)), key=lambda e: e.time_range.start)
    peak = max(accumulate(e.self_cpu_memory_usage for e in events))
    plan = preflight.memory_plan(m.args, [8] * 4, edit.Hparams(layer=2), torch.bfloat16, ["cpu"], None)
    print(f"load peak {peak} bytes, the bf16 model {plan['model']}, fp32 {2 * plan['model']}")
    assert plan["model"] == sum(p.nbytes for p in m.parameters())
    assert peak <= plan["need"]["cpu"] and peak < 1.01 * plan["model"]


def test_resume_reads_the_fingerprint_alone(tmp_path):
    """--resume compares the run's fingerprint.json, written before any checkpoint, and never
    reads the checkpoint's tensors to do it (here they are not even readable)."""
    import checkpoint as ckpt_lib

    fingerprint = {"hparams": {"lr": 0.002, "layer": 2}, "edits": "ab12", "base": {"w": "cd34"}, "base_delta": None}
    c = ckpt_lib.start(tmp_path / "out", fingerprint, resume=False, stop_loss=1e-2)
    c.path.write_bytes(b"not a checkpoint")
    preflight.check_resume(c.path, json.loads(json.dumps(fingerprint)))
    with pytest.raises(preflight.EditError, match="lr=0.002, this one 0.001"):
        preflight.check_resume(c.path, {**fingerprint, "hparams": {"lr": 0.001, "layer": 2}})


def test_torchrun_two_processes_match_one(ckpt, tmp_path):
    """gloo, two CPU processes, each taking half of every mini-batch: the same per-epoch losses
    and the same delta as one process, up to the order of fp32 sums."""
    edits = write_edits(tmp_path / "e.jsonl", random_edits(30, seed=9))
    common = ["--ckpt", ckpt, "--edits", edits, "--layer", "1", "--epochs", "3", "--batch-size", "4", "--lr", "1e-2"]
    r = run_cli(*common, "--out", tmp_path / "one")
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(ROOT / "edit.py"), *map(str, common), "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("epoch 1/3") == 1 and "2 processes" in r.stdout  # process 0 alone speaks
    one, two = (load_file(str(tmp_path / d / "delta.safetensors")) for d in ("one", "two"))
    for k in one:
        diff = ((one[k] - two[k]).abs().max() / one[k].abs().max()).item()
        print(f"torchrun 2 processes vs 1: max |delta difference| / max |delta| = {diff:.1e}")
        assert diff < 1e-5
    la, lb = (json.loads((tmp_path / d / "train_log.json").read_text())["epochs"] for d in ("one", "two"))
    assert [e["steps"] for e in la] == [e["steps"] for e in lb]  # the same order, the same skips
    for x, y in zip(la, lb):
        assert x["mean_loss"] == pytest.approx(y["mean_loss"], rel=1e-5)


def test_prefix_cache_on_disk_equals_in_memory_and_the_plan_is_exact(ckpt):
    m, tok = model_lib.load(ckpt)
    encoded = [data.encode_edit(tok, e.prompt, e.target) for e in random_edits(12, seed=2)]
    mem, disk = (data.PrefixCache(m, encoded, tok.pad_id, 2, device) for device in (None, "disk"))
    assert torch.equal(mem.h, disk.h)
    for packed in (True, False):
        (h1, b1), (h2, b2) = mem.batch([3, 0, 7], packed), disk.batch([3, 0, 7], packed)
        assert torch.equal(h1, h2) and torch.equal(b1.ids, b2.ids)
    hp = edit.Hparams(layer=2)
    plan = preflight.memory_plan(m.args, [len(ids) for ids, _ in encoded], hp, torch.float32, ["cpu"], None)
    assert plan["prefix_cache"] == mem.h.nbytes == sum(len(ids) for ids, _ in encoded) * m.args.dim * 4
    assert plan["model"] == sum(p.nbytes for p in m.parameters())
    assert plan["trained_and_adam"] == 4 * m.get_parameter("model.layers.2.mlp.down_proj.weight").nbytes
    assert preflight.memory_plan(m.args, [10] * 5, hp, torch.float32, ["cpu"], "disk")["need"]["disk"] == 50 * m.args.dim * 4
    # "cuda" and "cuda:0" are one device: the model and a cache named either way add up there
    one = preflight.memory_plan(m.args, [10] * 5, hp, torch.float32, ["cuda"], "cuda:0")["need"]
    assert list(one) == ["cuda:0"]
    # a cache in host memory for a GPU run: the cache, pageable, and one batch's pinned buffer
    # (5 sequences of 10 tokens, batch 1: 10 x dim x 4 bytes, in the power of two the pinned allocator takes)
    host = preflight.memory_plan(m.args, [10] * 5, hp, torch.float32, ["cuda:0"], "cpu")["need"]["cpu"]
    assert host == 50 * m.args.dim * 4 + 4096 == 50 * m.args.dim * 4 + 2 ** math.ceil(math.log2(10 * m.args.dim * 4))
    two = preflight.memory_plan(m.args, [10] * 5, hp, torch.float32, ["cuda:0", "cuda:1"], None)["need"]
    assert two["cuda:0"] + two["cuda:1"] == plan["model"] + plan["trained_and_adam"] + 50 * m.args.dim * 4 + \
        preflight.memory_plan(m.args, [10] * 5, hp, torch.float32, ["cpu"], None)["activations"]


def test_lifelong_editing_on_top_of_a_delta_and_cumulative(ckpt, tmp_path, one_thread):
    first = write_edits(tmp_path / "a.jsonl", random_edits(6, seed=11))
    second = write_edits(tmp_path / "b.jsonl", random_edits(5, seed=12))
    common = ["--ckpt", ckpt, "--layer", "2", "--epochs", "2"]
    assert run_cli(*common, "--edits", first, "--out", tmp_path / "one").returncode == 0
    d1 = tmp_path / "one" / "delta.safetensors"
    # on top: train up_proj after the first run's down_proj; the new delta holds both
    r = run_cli(*common, "--edits", second, "--module", "up_proj", "--base-delta", d1, "--out", tmp_path / "two")
    assert r.returncode == 0, r.stderr
    from safetensors import safe_open

    with safe_open(str(tmp_path / "two" / "delta.safetensors"), framework="pt") as sf:
        meta, names = sf.metadata(), sorted(sf.keys())
    assert names == ["model.layers.2.mlp.down_proj.weight", "model.layers.2.mlp.up_proj.weight"]
    assert meta["parent"] == str(d1.resolve()) and meta["parent_n_edits"] == "6"
    import delta

    m, _ = model_lib.load(ckpt)
    delta.apply(m, tmp_path / "two" / "delta.safetensors")  # applies to the original base, on its own
    assert torch.equal(m.get_parameter("model.layers.2.mlp.down_proj.weight"),
                       load_file(str(d1))["model.layers.2.mlp.down_proj.weight"])
    # cumulative: the first run's edits and the new ones, re-fitted from the base
    r = run_cli(*common, "--edits", second, "--cumulative", tmp_path / "one", "--out", tmp_path / "all")
    assert r.returncode == 0, r.stderr
    assert "editing 11 edits" in r.stdout
    both = data.load_edits(first) + data.load_edits(second)
    taught = data.load_edits(tmp_path / "all" / "edits.jsonl")
    assert [e.prompt for e in taught] == [e.prompt for e in both]
    # what training the untouched base on both sets in one run gives (not what continuing from
    # the first delta would: that differs by the first run's whole change)
    m, tok = model_lib.load(ckpt)
    refit, _ = edit.edit(m, tok, both, edit.Hparams(layer=2, epochs=2), say=lambda s: None)
    got = load_file(str(tmp_path / "all" / "delta.safetensors"))
    assert got.keys() == refit.keys()
    for k in got:
        torch.testing.assert_close(got[k], refit[k], rtol=0, atol=1e-6)


SECOND = torch.device("cpu", 1)  # a second device for the test below: CPU memory that says it is elsewhere


def where(t: torch.Tensor) -> torch.device:
    return getattr(t, "_on", None) or torch.device("cpu")


class TwoDevices(TorchFunctionMode):
    """Two devices on a CPU-only machine, as strict as two GPUs: the plain CPU is the first, and
    a tensor tagged with SECOND reports `.device == cpu:1`; `.to(cpu:1)` and factories given
    device=cpu:1 tag their results (`.to("cpu")` untags); any other op takes its inputs' device,
    and one whose inputs are on both raises, as a CUDA kernel does (0-dim tensors excepted, as
    CPU scalars are)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__self__", None) is torch.Tensor.device:  # t.device
            return where(args[0])
        target = None
        if func is torch.Tensor.to:
            for a in (*args[1:], kwargs.get("device")):  # .to(device), .to(tensor), .to(device=...)
                if isinstance(a, (str, torch.device, torch.Tensor)):
                    target = where(a) if isinstance(a, torch.Tensor) else torch.device(a)
                    break
        elif func is torch.Tensor.cpu:
            target = torch.device("cpu")
        elif kwargs.get("device") is not None:
            target = torch.device(kwargs["device"])
        if target is None:
            on = {where(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim()}
            if len(on) > 1:
                raise RuntimeError(f"{getattr(func, '__name__', func)}: expected all tensors on one device, got {on}")
            target = on.pop() if on else None
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and target is not None:
                if target == SECOND:
                    t._on = SECOND
                elif hasattr(t, "_on"):
                    del t._on
        return out


def load_emulated(ckpt, devices, monkeypatch):
    """model.load over `devices`, SECOND among them: the model, and where place() sent each
    module (those sent to SECOND get its tag, for TwoDevices)."""
    sent, to_empty = {}, torch.nn.Module.to_empty

    def record(module, *, device, **kw):
        out = to_empty(module, device=device, **kw)
        sent[id(module)] = torch.device(device)
        if torch.device(device) == SECOND:
            for t in [*module.parameters(), *module.buffers()]:
                t._on = SECOND
        return out

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.Module, "to_empty", record)
        model, _ = model_lib.load(ckpt, device=devices)
    return model, sent


@pytest.mark.usefixtures("one_thread")
def test_layers_over_two_devices_give_the_same_results(ckpt, tmp_path, monkeypatch):
    """`--devices A,B`: place() puts layers 0-1 and the embedding on A, layer 2, the norm and
    the LM head on B, and generation, teacher forcing and the training loss from layer 2 (its
    prefix cache on B, built by layers on A) give what one device gives. B is emulated
    (TwoDevices): a hidden state, mask, position or label that is not moved across, or a
    tensor made on the wrong side, raises. The CLI run with `cpu,cpu` trains the same delta."""
    import evaluate
    import generate

    one, tok = model_lib.load(ckpt)
    two, sent = load_emulated(ckpt, ["cpu", SECOND], monkeypatch)
    on_b = {name for name, m in two.named_modules() if sent.get(id(m)) == SECOND}
    assert on_b == {"model.layers.2", "model.norm", "lm_head"}
    assert {name for name, m in two.named_modules() if sent.get(id(m)) == torch.device("cpu")} == \
        {"model.layers.0", "model.layers.1", "model.embed_tokens"}

    prompts = [e.prompt for e in random_edits(6, seed=3)]
    enc = [data.encode_edit(tok, p, "w5 w6") for p in prompts]
    idx = [0, 3, 5]
    expected = (generate.greedy(one, tok, prompts, 8, batch_size=2), evaluate.teacher_forced_argmax(one, enc, tok.pad_id),
                edit.batch_loss(one, data.PrefixCache(one, enc, tok.pad_id, 2), idx, edit.Hparams(layer=2)))
    with TwoDevices():
        assert two.device_of(1) == torch.device("cpu") and two.device_of(2) == SECOND
        cache = data.PrefixCache(two, enc, tok.pad_id, 2)
        assert cache.h.device == SECOND
        got = (generate.greedy(two, tok, prompts, 8, batch_size=2), evaluate.teacher_forced_argmax(two, enc, tok.pad_id),
               edit.batch_loss(two, cache, idx, edit.Hparams(layer=2)))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])

    edits = write_edits(tmp_path / "e.jsonl", random_edits(8, seed=4))
    common = ["--ckpt", ckpt, "--edits", edits, "--layer", "1", "--epochs", "2"]
    assert run_cli(*common, "--out", tmp_path / "a").returncode == 0
    r = run_cli(*common, "--out", tmp_path / "b", "--devices", "cpu,cpu")
    assert r.returncode == 0, r.stderr
    a, b = (load_file(str(tmp_path / d / "delta.safetensors")) for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.usefixtures("one_thread")
def test_prefix_cache_in_host_memory_gives_the_on_device_results(ckpt, tmp_path, capsys, monkeypatch):
    """--cache-device cpu with the model on another device (B, emulated by TwoDevices): the
    cache stays in host memory, each mini-batch is copied to B, and the loss is the one an
    on-device cache gives, bit for bit; on this CPU, training with it gives the same delta."""
    made = []
    real = data.PrefixCache
    monkeypatch.setattr(data, "PrefixCache", lambda *a, **kw: made.append(a[4]) or real(*a, **kw))
    edits = write_edits(tmp_path / "e.jsonl", random_edits(8, seed=5))
    assert edit.main(["--ckpt", str(ckpt), "--edits", str(edits), "--layer", "2", "--epochs", "1",
                      "--cache-device", "cpu", "--out", str(tmp_path / "out")]) == 0
    assert made == ["cpu"]  # the flag reaches the cache
    monkeypatch.undo()
    capsys.readouterr()

    m, tok = model_lib.load(ckpt)
    enc = [data.encode_edit(tok, e.prompt, e.target) for e in random_edits(12, seed=2)]
    idx, hp = [3, 0, 7, 11], edit.Hparams(layer=2)
    on_b, _ = load_emulated(ckpt, [SECOND], monkeypatch)
    with TwoDevices():
        host, device = (data.PrefixCache(on_b, enc, tok.pad_id, 2, d) for d in ("cpu", None))
        assert host.h.device == torch.device("cpu") and device.h.device == SECOND
        for packed in (True, False):
            (h1, b1), (h2, b2) = host.batch(idx, packed), device.batch(idx, packed)
            assert h1.device == h2.device == b1.ids.device == b2.ids.device == SECOND
        losses = [edit.batch_loss(on_b, c, idx, hp) for c in (host, device)]
    assert torch.equal(host.h, device.h) and torch.equal(*losses)
    assert torch.equal(losses[0], edit.batch_loss(m, data.PrefixCache(m, enc, tok.pad_id, 2), idx, hp))
    hp = edit.Hparams(layer=2, epochs=3, batch_size=4)
    a, _ = edit.edit(m, tok, random_edits(12, seed=2), hp, cache_device="cpu", say=lambda s: None)
    b, _ = edit.edit(m, tok, random_edits(12, seed=2), hp, say=lambda s: None)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
