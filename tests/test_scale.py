"""Scale: a killed run resumes to the same delta, torchrun's processes add up to one, the prefix
cache's memory is what the plan says, on disk as in memory."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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
    two = preflight.memory_plan(m.args, [10] * 5, hp, torch.float32, ["cuda:0", "cuda:1"], None)["need"]
    assert two["cuda:0"] + two["cuda:1"] == plan["model"] + plan["trained_and_adam"] + 50 * m.args.dim * 4 + \
        preflight.memory_plan(m.args, [10] * 5, hp, torch.float32, ["cpu"], None)["activations"]


def test_lifelong_editing_on_top_of_a_delta_and_cumulative(ckpt, tmp_path):
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
    taught = data.load_edits(tmp_path / "all" / "edits.jsonl")
    assert [e.prompt for e in taught] == [e.prompt for e in data.load_edits(first) + data.load_edits(second)]


def test_layers_over_two_devices_give_the_same_results(ckpt, tmp_path):
    """`--devices cpu,cpu` runs the placement code path (blocks of layers, hidden states moved
    between them); on two CPU devices the moves are no-ops and every result is the same."""
    import evaluate
    import generate

    one, tok = model_lib.load(ckpt)
    two, _ = model_lib.load(ckpt, device=["cpu", "cpu"])
    assert [model_lib.block_of(i, 3, 2) for i in range(3)] == [0, 0, 1]
    prompts = [e.prompt for e in random_edits(6, seed=3)]
    assert generate.greedy(one, tok, prompts, 8, batch_size=2) == generate.greedy(two, tok, prompts, 8, batch_size=2)
    enc = [data.encode_edit(tok, p, "w5 w6") for p in prompts]
    assert evaluate.teacher_forced_argmax(one, enc, tok.pad_id) == evaluate.teacher_forced_argmax(two, enc, tok.pad_id)
    edits = write_edits(tmp_path / "e.jsonl", random_edits(8, seed=4))
    common = ["--ckpt", ckpt, "--edits", edits, "--layer", "1", "--epochs", "2"]
    assert run_cli(*common, "--out", tmp_path / "a").returncode == 0
    r = run_cli(*common, "--out", tmp_path / "b", "--devices", "cpu,cpu")
    assert r.returncode == 0, r.stderr
    a, b = (load_file(str(tmp_path / d / "delta.safetensors")) for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
