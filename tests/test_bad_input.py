"""Bad input to the three command lines: each case exits with status 2 and one line naming the
file, record or flag and what is wrong; no traceback, nothing written, the base untouched.

A case is one row of CASES: which script, how to break the inputs, the arguments, and words the
error line must contain. Adding a case is adding a row.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import edit
import preflight
from tiny import make_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"edit": ROOT / "edit.py", "evaluate": ROOT / "evaluate.py", "convert": ROOT / "weights" / "convert_gguf.py"}
EDITS = [{"prompt": f"w{5 + i} w{40 + i} w{77 + i}", "target": f"w{100 + i}", "subject": f"w{40 + i}",
          "rephrases": [f"w{9 + i} w{77 + i}"], "locality": [[f"w{200 + i} w{201 + i}", f"w{202 + i}"]]}
         for i in range(4)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny checkpoint, an edit file and a real delta for it (made once, copied per case)."""
    d = tmp_path_factory.mktemp("base")
    make_checkpoint(d / "ckpt", "llama")
    (d / "edits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EDITS))
    r = subprocess.run([sys.executable, SCRIPTS["edit"], "--ckpt", d / "ckpt", "--edits", d / "edits.jsonl",
                        "--layer", "1", "--epochs", "1", "--out", d / "run"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return d


def hashes(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


# -- how to break things: each takes the case's directory w (ckpt/, edits.jsonl, run/ copied in) --

def truncate(path, keep=0.5):
    raw = path.read_bytes()
    path.write_bytes(raw[:int(len(raw) * keep)])


def rewrite_header(path, change):
    """Change the JSON header of a safetensors file in place, keeping it self-consistent in size."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    change(header)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(len(hb).to_bytes(8, "little") + hb + raw[8 + n:])


def set_config(w, **kw):
    cfg = json.loads((w / "ckpt" / "config.json").read_text())
    for k, v in kw.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (w / "ckpt" / "config.json").write_text(json.dumps(cfg))


def long_prompt(w, where):
    records = [dict(r) for r in EDITS]
    words = " ".join(f"w{3 + i % 300}" for i in range(300))  # 300 tokens; the context is 256
    if where == "prompt":
        records[2]["prompt"] = words
    else:
        records[2]["locality"] = [[" ".join(words.split()[:240]), "w5"]]  # fits alone, not with 32 new tokens
    (w / "edits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def other_layer_count_delta(w):
    """A delta made for a 5-layer model of the same width: its layer-4 tensor is not in ours."""
    t = load_file(str(w / "run" / "delta.safetensors"))
    from safetensors import safe_open

    with safe_open(str(w / "run" / "delta.safetensors"), framework="pt") as sf:
        meta = sf.metadata()
    name = "model.layers.4.mlp.down_proj.weight"
    save_file({name: next(iter(t.values()))}, str(w / "run" / "delta.safetensors"),
              {**meta, f"sha256.{name}": "0" * 64})


def gguf_file(w, arch):
    import gguf
    import numpy as np

    g = gguf.GGUFWriter(str(w / "model.gguf"), arch=arch)
    g.add_name("made up")
    g.add_block_count(1)
    g.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()


E = ["--ckpt", "{w}/ckpt", "--edits", "{w}/edits.jsonl", "--layer", "1", "--epochs", "1", "--out", "{w}/out"]
V = ["--ckpt", "{w}/ckpt", "--edits", "{w}/edits.jsonl", "--delta", "{w}/run/delta.safetensors", "--out", "{w}/report.json"]
DOWN = "model.layers.1.mlp.down_proj.weight"

CASES = [
    # (id, script, break, args, words in the one error line)
    ("weights-truncated", "edit", lambda w: truncate(w / "ckpt" / "model.safetensors"), E,
     ["model.safetensors", "not a readable safetensors"]),
    ("weights-first-bytes-only", "evaluate", lambda w: truncate(w / "ckpt" / "model.safetensors", 0.001), V,
     ["model.safetensors", "not a readable safetensors"]),
    ("header-lies-dtype", "edit", lambda w: rewrite_header(w / "ckpt" / "model.safetensors",
                                                           lambda h: h[DOWN].update(dtype="I32")), E,
     [DOWN, "I32", "not floating point"]),
    ("header-lies-shape", "edit", lambda w: rewrite_header(w / "ckpt" / "model.safetensors",
                                                           lambda h: h[DOWN].update(shape=h[DOWN]["shape"][::-1])), E,
     [DOWN, "(112, 64)", "config.json implies (64, 112)"]),
    ("config-missing-field", "edit", lambda w: set_config(w, hidden_size=None), E, ["config.json", "'hidden_size'", "missing"]),
    ("config-wrong-type", "evaluate", lambda w: set_config(w, num_hidden_layers="3"), V,
     ["config.json", "'num_hidden_layers'", "whole number", "'3'"]),
    ("config-not-json", "edit", lambda w: (w / "ckpt" / "config.json").write_text("{oops"), E, ["config.json", "not valid JSON"]),
    ("tokenizer-missing", "edit", lambda w: (w / "ckpt" / "tokenizer.json").unlink(), E, ["no tokenizer.json"]),
    ("tokenizer-corrupt", "evaluate", lambda w: (w / "ckpt" / "tokenizer.json").write_text('{"model": 7}'), V,
     ["tokenizer.json", "cannot be read as a tokenizer"]),
    ("target-longer-than-context", "edit", lambda w: long_prompt(w, "prompt"), E,
     ["edits.jsonl", "record 2", "longer than the model's context (256)"]),
    ("eval-prompt-longer-than-context", "evaluate", lambda w: long_prompt(w, "locality"), V,
     ["edits.jsonl", "record 2", "32 to generate", "context (256)"]),
    ("lr-overflows", "edit", None, E + ["--lr", "1e38"], ["--lr", "(0, 1]", "1e+38"]),
    ("lr-nan", "edit", None, E + ["--lr", "nan"], ["--lr", "nan"]),
    ("kl-weight-inf", "edit", None, E + ["--general-kl", "inf"], ["--general-kl", "inf"]),
    ("dtype-unknown", "edit", None, E + ["--dtype", "float8"], ["--dtype", "float8"]),
    ("retain-related-without-records", "edit", lambda w: (w / "pool.txt").write_text("w300 w301\n"),
     E + ["--retain", "--retain-related", "--retain-file", "{w}/pool.txt"], ["--retain-related", "--retain-file"]),
    ("not-a-number", "evaluate", None, V + ["--batch-size", "many"], ["evaluate.py: error", "--batch-size", "'many'"]),
    ("unknown-module", "edit", None, E + ["--module", "ffn"], ["edit.py: error", "--module", "'ffn'"]),
    ("cache-device-unknown", "edit", None, E + ["--cache-device", "floppy"], ["--cache-device", "'floppy'"]),
    ("devices-not-here", "edit", None, E + ["--devices", "cuda:0,cuda:7"], ["--devices", "cuda:", "does not exist here"]),
    ("resume-nothing", "edit", None, E + ["--resume"], ["--resume", "nothing to resume", "out.partial"]),
    ("base-delta-truncated", "edit", lambda w: truncate(w / "run" / "delta.safetensors"),
     E + ["--base-delta", "{w}/run/delta.safetensors"], ["delta", "not a readable safetensors"]),
    ("cumulative-not-a-run", "edit", None, E + ["--cumulative", "{w}/ckpt"], ["--cumulative", "no edits.jsonl"]),
    ("out-equals-export", "edit", None, E + ["--export", "{w}/out"], ["--out", "--export", "overlap"]),
    ("out-inside-export", "edit", None, E[:-1] + ["{w}/x/out", "--export", "{w}/x"], ["--out", "--export", "overlap"]),
    ("export-inside-out", "edit", None, E + ["--export", "{w}/out/x"], ["--out", "--export", "overlap"]),
    ("edits-utf16", "edit", lambda w: (w / "edits.jsonl").write_text(json.dumps(EDITS[0]), encoding="utf-16"), E,
     ["edits.jsonl", "not UTF-8"]),
    ("jsonl-broken-line", "evaluate", lambda w: (w / "edits.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in EDITS[:2]) + "{broken\n" + json.dumps(EDITS[3]) + "\n"), V,
     ["edits.jsonl", "line 3", "not valid JSON"]),
    ("delta-truncated", "evaluate", lambda w: truncate(w / "run" / "delta.safetensors"), V,
     ["delta", "not a readable safetensors"]),
    ("delta-other-layer-count", "evaluate", other_layer_count_delta, V,
     ["model.layers.4.mlp.down_proj.weight", "does not exist in this model", "layers 0..2"]),
    ("gguf-unsupported-architecture", "convert", lambda w: gguf_file(w, "gpt2"),
     ["mine", "--gguf", "{w}/model.gguf", "--out", "{w}/out"], ["model.gguf", "'gpt2'", "not supported"]),
    ("gguf-not-a-gguf", "convert", lambda w: (w / "model.gguf").write_bytes(b"not a gguf file at all " * 4),
     ["mine", "--gguf", "{w}/model.gguf", "--out", "{w}/out"], ["model.gguf", "not a readable GGUF file"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line(base, tmp_path, case):
    _, script, breaks, args, words = case
    w = tmp_path
    shutil.copytree(base / "ckpt", w / "ckpt")
    shutil.copytree(base / "run", w / "run")
    shutil.copyfile(base / "edits.jsonl", w / "edits.jsonl")
    if breaks:
        breaks(w)
    before = hashes(w)
    r = subprocess.run([sys.executable, SCRIPTS[script], *[a.format(w=w) for a in args]], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = r.stderr.strip().splitlines()
    print(f"{case[0]}: {r.stderr.strip()}")  # pytest -s shows what each case printed
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for word in words:
        assert word.format(w=w) in lines[0], lines[0]
    assert hashes(w) == before  # nothing written, nothing changed (the base checkpoint included)


def test_a_run_that_cannot_fit_is_refused_before_loading(base, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(preflight, "free_bytes", lambda device: 10_000)  # 10 KB free
    monkeypatch.setattr(edit.model_lib, "load", lambda *a, **k: pytest.fail("the weights were loaded"))
    rc = edit.main([a.format(w=base) for a in E[:-1]] + [str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "needs about" in err and "is free" in err
    assert not (tmp_path / "out").exists()


def test_the_plan_is_printed_before_training(base, tmp_path, capsys):
    rc = edit.main([a.format(w=base) for a in E[:-1]] + [str(tmp_path / "out")])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out[0].startswith("memory: model ") and "prefix cache" in out[0] and "trained tensors + Adam" in out[0]
    assert out[2].startswith("4 training sequences (") and "tokens), batch 1" in out[2]


def interrupt(script, args, started, tmp_path):
    """Start `script`, send SIGINT once a line starting with `started` is out; (rc, stderr)."""
    p = subprocess.Popen([sys.executable, SCRIPTS[script], *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         # a shell's background job starts with SIGINT ignored, and Python then keeps it so
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # progress lines are flushed at once, so they arrive through the pipe while the work goes on
    for line in p.stdout:
        if line.startswith(started):
            break
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert len(err.strip().splitlines()) == 1 and "interrupted" in err and "Traceback" not in err, err
    return p.returncode, err


@pytest.fixture(scope="module")
def many(base, tmp_path_factory):
    """400 edits: an epoch at batch 1, or an evaluation at batch 1, takes a few seconds."""
    path = tmp_path_factory.mktemp("many") / "many.jsonl"
    rows = [{**EDITS[i % 4], "prompt": f"w{5 + i % 200} w{40 + i % 250} w{77 + i % 190}"} for i in range(400)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_ctrl_c_before_the_first_epoch_ends_leaves_nothing(base, many, tmp_path):
    args = ["--ckpt", base / "ckpt", "--edits", many, "--layer", "1", "--epochs", "500", "--batch-size", "1",
            "--out", tmp_path / "out"]
    rc, err = interrupt("edit", args, "400 training sequences", tmp_path)
    assert rc == 130 and "no half-written output" in err
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_after_an_epoch_keeps_only_the_whole_checkpoint(base, many, tmp_path):
    args = ["--ckpt", base / "ckpt", "--edits", many, "--layer", "1", "--epochs", "500", "--batch-size", "1",
            "--out", tmp_path / "out"]
    rc, err = interrupt("edit", args, "epoch 2/", tmp_path)
    assert rc == 130 and "--resume" in err
    assert [p.name for p in tmp_path.iterdir()] == ["out.partial"]
    assert sorted(p.name for p in (tmp_path / "out.partial").iterdir()) == ["checkpoint.pt", "fingerprint.json"]


def test_ctrl_c_during_evaluation_writes_no_report(base, many, tmp_path):
    args = ["--ckpt", base / "ckpt", "--edits", many, "--delta", base / "run" / "delta.safetensors",
            "--batch-size", "1", "--out", tmp_path / "report.json"]
    rc, err = interrupt("evaluate", args, "evaluating the base model", tmp_path)
    assert rc == 130 and list(tmp_path.iterdir()) == []


def test_more_processes_than_the_batch_is_refused(base, tmp_path, capsys, monkeypatch):
    """Checked from torchrun's environment before any process group is formed."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    rc = edit.main([a.format(w=base) for a in E[:-1]] + [str(tmp_path / "out"), "--batch-size", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "4 processes exceed the batch of 2" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def torchrun_env(monkeypatch, processes_here: int, gpus: int, local_rank: int = 0):
    """This process as torchrun starts it, on a machine with `gpus` CUDA devices (faked)."""
    for k, v in dict(WORLD_SIZE=processes_here, RANK=local_rank, LOCAL_RANK=local_rank,
                     LOCAL_WORLD_SIZE=processes_here, MASTER_ADDR="localhost", MASTER_PORT="29500").items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)


@pytest.mark.parametrize("processes,gpus,flags,words", [
    (2, 1, [], ["torchrun started 2 processes on this machine, which has 1 CUDA devices", "--nproc-per-node 1"]),
    (2, 2, ["--device", "cuda:0"], ["--device cuda:0 under torchrun", "give --device cuda"]),
    (2, 2, ["--devices", "cuda:0"], ["--devices runs LocFT-BF in one process"]),
    (1, 0, ["--device", "cuda"], ["--device cuda: this machine has 0 CUDA devices"])])
def test_torchrun_and_gpu_devices_are_checked_in_one_line(base, tmp_path, capsys, monkeypatch, processes, gpus,
                                                          flags, words):
    torchrun_env(monkeypatch, processes, gpus)
    monkeypatch.setattr(edit.model_lib, "load", lambda *a, **k: pytest.fail("the weights were loaded"))
    rc = edit.main([a.format(w=base) for a in E[:-1]] + [str(tmp_path / "out"), "--batch-size", "2", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert all(w in err for w in words), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_each_torchrun_process_takes_its_own_gpu(monkeypatch):
    """Process 1 of 2 on a 2-GPU machine: cuda:1, set as the current device before NCCL starts,
    and given to init_process_group, so the communicator need not guess."""
    import distributed

    torchrun_env(monkeypatch, 2, 2, local_rank=1)
    device = preflight.process_device(None)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setattr(distributed.dist, "barrier", lambda: None)
    distributed.init(device)
    assert device == "cuda:1"
    assert calls == [("set_device", torch.device("cuda:1")), ("nccl", {"device_id": torch.device("cuda:1")})]
