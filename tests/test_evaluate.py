"""Greedy decoding, the stop rule, answer normalisation, the metrics, the report and the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import delta
import evaluate as ev
import model as M
from data import Edit
from tiny import make_checkpoint

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Answers


@pytest.mark.parametrize("raw, norm", [
    ("Paris", "paris"),
    ("  The  Eiffel   Tower ", "eiffel tower"),
    ("The The", ""),  # both are articles
    ("Theatre", "theatre"),  # articles only as whole words
    ("anthem of the nation", "anthem of nation"),
    ("A", ""),
    ("an apple a day", "apple day"),
    ("", ""),
    ("   ", ""),
    ("U.S.A.", "usa"),
    ("Rock 'n' Roll!", "rock n roll"),
    ("São Paulo", "são paulo"),  # accents are kept
    ("Café", "café"),
    ("“Paris”", "“paris”"),  # SQuAD strips ASCII punctuation only
    ("Paris — France", "paris — france"),
    ("THE\tEnd\n", "end"),
    ("3.5", "35"),
])
def test_squad_normalisation(raw, norm):
    assert ev.normalize_answer(raw) == norm


@pytest.mark.parametrize("pred, target, same", [
    ("the Rome", "Rome", True),
    ("Rome!", "rome", True),
    (" rome ", "Rome", True),
    ("Romeo", "Rome", False),
    ("Cafe", "Café", False),
    ("", "", True),
    ("", "Rome", False),
    ("New York City", "New York", False),
])
def test_exact_match(pred, target, same):
    assert ev.exact_match(pred, target) is same


# ---------------------------------------------------------------------------------------------
# Decoding


# ---------------------------------------------------------------------------------------------
# Metrics


def test_metrics_on_hand_made_outputs(monkeypatch):
    """Fake model outputs: the metric arithmetic only."""
    class StandIn(torch.nn.Linear):  # outputs are faked; only the weight swap is real
        load_tensors = M.Transformer.load_tensors

    model = StandIn(1, 1, bias=False)
    outputs = {  # prompt -> (base answer, edited answer)
        "p1": ("Paris", "Rome"), "p2": ("London", "the Berlin"), "p3": ("Oslo", "Oslo"),
        "r1": ("Paris", "Rome."), "r2": ("x", "y"), "r3": ("x", "Madrid"), "r4": ("Oslo", "Lima"),
        "l1": ("Tokyo", "Tokyo"), "l2": ("seven", "the Lima"), "l3": ("blue", "blue"),
    }

    class WordTok:  # a token "id" is (prompt, edited?); decoding gives the faked output
        pad_id = 0

        def decode(self, ids):
            return outputs[ids[0]][int(ids[1])]

        def encode(self, s, add_special_tokens=True):
            return [1]

    def fake_greedy(model_, tok, prompts, *a):
        return [[p, model_.weight.item() == 2.0] for p in prompts]

    def fake_argmax(model_, seqs, pad_id, bs):  # edited predictions differ at every second probe
        edited = model_.weight.item() == 2.0
        return [[7] * (len(ids) - n) if not (edited and i % 2) else [8] * (len(ids) - n)
                for i, (ids, n) in enumerate(seqs)]

    monkeypatch.setattr(ev, "greedy", fake_greedy)
    monkeypatch.setattr(ev, "teacher_forced_argmax", fake_argmax)
    monkeypatch.setattr(ev, "encode_edit", lambda tok, p, a: ([1, 7, 2], 1))
    edits = [Edit("p1", "Rome", rephrases=["r1"], locality=[("l1", "Tokyo")]),
             Edit("p2", "Berlin", rephrases=["r2", "r3"], locality=[("l2", "seven"), ("l3", "")]),
             Edit("p3", "Lima", rephrases=["r4"])]
    report = ev.before_after(model, WordTok(), edits, base={"weight": torch.ones(1, 1)},
                             edited={"weight": torch.full((1, 1), 2.0)})
    m = report["metrics"]
    assert m["reliability (greedy EM)"] == {"base": 0.0, "edited": 2 / 3, "n": 3}
    assert m["generalization (greedy EM)"] == {"base": 0.0, "edited": 0.5, "n": 4}
    assert m["locality (output unchanged)"] == {"base": 1.0, "edited": 2 / 3, "n": 3}
    assert m["locality (EM vs given answer)"] == {"base": 1.0, "edited": 0.5, "n": 2}  # l3 has no answer
    assert m["locality bleed (some edit's target)"] == {"base": 0.0, "edited": 1 / 3, "n": 3}  # l2: edit 3's "Lima"
    assert m["locality bleed (its own edit's target)"] == {"base": 0.0, "edited": 0.0, "n": 3}
    assert m["reliability (teacher-forced token acc)"] == {"base": 1.0, "edited": 2 / 3, "n": 3}
    assert m["locality (teacher-forced, base predictions kept)"] == {"base": 1.0, "edited": 1 / 3, "n": 3}
    assert model.weight.item() == 2.0
    e2 = report["edits"][1]
    assert e2["base"] == "London" and e2["edited"] == "the Berlin"
    assert [r["edited"] for r in e2["rephrases"]] == ["y", "Madrid"]
    assert [(x["prompt"], x["answer"], x["base"], x["edited"]) for x in e2["locality"]] == [
        ("l2", "seven", "seven", "the Lima"), ("l3", "", "blue", "blue")]
    assert report["edits"][0]["rephrases"][0]["edited"] == "Rome"  # cut at the "."


def test_bleed_counts_an_edit_target_that_is_neither_the_old_output_nor_the_true_answer():
    """Hand-made locality answers: which of them bleed, to some edit's target and to their own."""
    targets = ["Islam", "Asia", "mahalle"]
    cases = [  # (its edit, given answer, unedited answer, edited answer, bleeds to some, to its own)
        (0, "Buddhism", "Buddhism", "Islam", True, True),  # its own edit's new object
        (0, "Buddhism", "Buddhism", "the Asia.", True, False),  # another edit's, after normalisation
        (1, "", "?", "mahalle", True, False),  # no given answer: only the unedited one is excluded
        (1, "Asia", "Europe", "Asia", False, False),  # an edit's target, but also the true answer
        (2, "village", "mahalle", "Mahalle", False, False),  # an edit's target, but it answered so before
        (2, "village", "village", "town", False, False),  # changed, to no edit's target
        (2, "village", "village", "village", False, False),  # unchanged
        (1, "", "", "", False, False),  # empty answers never bleed
    ]
    probes = [ev.Probe(i, f"l{j}", given) for j, (i, given, *_) in enumerate(cases)]
    some, own = ev.bleed(probes, targets, [c[3] for c in cases], [c[2] for c in cases], ev.normalize_answer)
    assert some == [c[4] for c in cases] and own == [c[5] for c in cases]


DOWN = "model.layers.1.mlp.down_proj.weight"


def tiny_edits(n=4):
    return [Edit(f"w{10 + i} w{20 + i} w{30 + i}", f"w{40 + i}", rephrases=[f"w{50 + i} w{30 + i}"],
                 locality=[(f"w{60 + i} w{70 + i}", f"w{80 + i}")]) for i in range(n)]


def test_before_after_leaves_the_model_holding_edited(tiny):
    _, model, tok = tiny
    params = dict(model.named_parameters())
    base = {DOWN: params[DOWN].detach().clone()}
    torch.manual_seed(3)
    edited = {DOWN: base[DOWN] + torch.randn_like(base[DOWN]) * 3}
    try:
        report = ev.before_after(model, tok, tiny_edits(), base, edited, text="w5 w6 w7 w8 w9 " * 30, batch_size=3)
        assert torch.equal(params[DOWN], edited[DOWN])
    finally:
        model.load_tensors(base)
    m = report["metrics"]
    assert m["locality (output unchanged)"]["base"] == 1.0
    assert m["locality (teacher-forced, base predictions kept)"]["base"] == 1.0
    assert m["locality (teacher-forced, base predictions kept)"]["edited"] < 1.0
    assert any(e["base"] != e["edited"] for e in report["edits"])
    t = report["text"]
    assert t["kl_base_edited_per_token"] > 0 and t["perplexity"]["base"] != t["perplexity"]["edited"]
    assert t["tokens"] == 149
    json.dumps(report)  # serialisable


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unedited_model_scores_exactly_one_on_both_localities(tiny, dtype):
    """Base weights evaluated as 'edited': every metric equals the base's, both localities are
    1.0 exactly, in bf16 too (greedy and teacher-forced figures come from the same weights)."""
    _, model, tok = tiny
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(dtype)
    try:
        w = {DOWN: dict(model.named_parameters())[DOWN].detach().clone()}
        report = ev.before_after(model, tok, tiny_edits(), w, w, text="w5 w6 w7 w8 w9 " * 30)
    finally:
        model.to(torch.float32).load_state_dict(saved)
    m = report["metrics"]
    for row in m.values():
        assert row["base"] == row["edited"]
    assert m["locality (output unchanged)"]["edited"] == 1.0
    assert m["locality (teacher-forced, base predictions kept)"]["edited"] == 1.0
    assert abs(report["text"]["kl_base_edited_per_token"]) < 1e-5


def test_perplexity_is_exp_mean_nll(tiny):
    _, model, tok = tiny
    text = "w5 w9 w13 w100 w7 " * 5
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0, :-1], -1)
    nll = -logp.gather(1, ids[0, 1:, None]).mean().item()
    out = ev.text_metrics(model, tok, text, None, None, window=7)  # windows of 7 tokens: a different split
    assert out["windows"] == 4 and "edited" not in out["perplexity"]
    full = ev.text_metrics(model, tok, text, None, None, window=256)
    assert full["perplexity"]["base"] == pytest.approx(torch.tensor(nll).exp().item(), rel=1e-4)


def test_base_only_report_has_no_edited_column(tiny, capsys, tmp_path):
    _, model, tok = tiny
    report = ev.before_after(model, tok, tiny_edits(2), None, None)
    assert all("edited" not in row for row in report["metrics"].values())
    ev.print_report(report)
    out = capsys.readouterr().out
    assert "edited" not in out and "reliability (greedy EM)" in out
    path = tmp_path / "sub" / "report.json"
    ev.write_report(report, path)
    assert json.loads(path.read_text())["metrics"] == report["metrics"]
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temp file left


def test_print_report_table():
    import io

    report = {"metrics": {"reliability (greedy EM)": {"base": 0.03, "edited": 0.97, "n": 30},
                          "locality (EM vs given answer)": {"base": None, "edited": None, "n": 0}}, "text": None}
    buf = io.StringIO()
    ev.print_report(report, file=buf)
    lines = buf.getvalue().splitlines()
    assert lines[0].split() == ["metric", "base", "edited", "n"]
    assert lines[1].split() == ["reliability", "(greedy", "EM)", "0.030", "0.970", "30"]
    assert lines[2].split()[-3:] == ["-", "-", "0"]


def test_print_report_shows_a_few_edits_as_a_person_reads_them():
    import io

    edits = [{"prompt": f"p{i}", "target": f"t{i}", "base": f"b{i}", "edited": f"t{i}"} for i in range(8)]
    report = {"metrics": {"reliability (greedy EM)": {"base": 0.0, "edited": 1.0, "n": 8}}, "text": None,
              "edits": edits}
    buf = io.StringIO()
    ev.print_report(report, file=buf, examples=3)
    out = buf.getvalue()
    assert "'p0': 'b0' -> 't0' (target 't0')" in out and "'p2'" in out and "'p3'" not in out


# ---------------------------------------------------------------------------------------------
# CLI


def write_delta(ckpt, path, tensors):
    delta.save(path, ckpt, tensors, {})


def run_cli(*args):
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny model: threads only cost time
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=120, env=env)


def test_cli_before_after_writes_report(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    make_checkpoint(ckpt, "llama")
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        w = f.get_tensor(DOWN)
    torch.manual_seed(0)
    write_delta(ckpt, tmp_path / "delta.safetensors", {DOWN: w + torch.randn_like(w)})
    edits = tmp_path / "edits.jsonl"
    edits.write_text("".join(json.dumps(e.to_json()) + "\n" for e in tiny_edits(6)))
    text = tmp_path / "text.txt"
    text.write_text("w5 w6 w7 w8 " * 20)
    r = run_cli("--ckpt", ckpt, "--delta", tmp_path / "delta.safetensors", "--edits", edits, "--n", 4, "--seed", 1,
                "--out", tmp_path / "out" / "report.json", "--text", text, "--batch-size", 2)
    assert r.returncode == 0, r.stderr
    assert "reliability (greedy EM)" in r.stdout and "KL(base || edited)" in r.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["edits"] == 4 and report["settings"]["seed"] == 1
    assert report["metrics"]["reliability (greedy EM)"]["n"] == 4
    assert "edited" in report["metrics"]["locality (output unchanged)"]

    r = run_cli("--ckpt", ckpt, "--edits", edits, "--out", tmp_path / "base.json")  # base only
    assert r.returncode == 0, r.stderr
    assert "edited" not in json.loads((tmp_path / "base.json").read_text())["metrics"]["reliability (greedy EM)"]


@pytest.mark.parametrize("how, names, words", [("no-edits", "{t}/nope.json", "does not exist"),
                                               ("bad-ckpt", "{t}/ckpt/config.json", "hidden_size"),
                                               ("bad-delta", "{t}/d.safetensors", "delta")],
                         ids=["no-edits", "bad-ckpt", "bad-delta"])
def test_cli_bad_input_gives_one_line(tmp_path, how, names, words):
    """Exit status 2, exactly one line on stderr (ending in a newline) naming the file and the
    problem, and nothing written: no report, every input as it was."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama"}) if how == "bad-ckpt" else "{}")
    edits = tmp_path / "e.json"
    edits.write_text(json.dumps([{"prompt": "w5", "target": "w6"}]))
    if how != "bad-ckpt":
        make_checkpoint(ckpt, "llama")
    args = ["--ckpt", ckpt, "--edits", edits if how != "no-edits" else tmp_path / "nope.json",
            "--out", tmp_path / "report.json"]
    if how == "bad-delta":
        (tmp_path / "d.safetensors").write_bytes(b"not a safetensors file")
        args += ["--delta", tmp_path / "d.safetensors"]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.endswith("\n"), r.stderr
    assert r.stderr.startswith("evaluate.py: error:") and words in r.stderr, r.stderr
    assert names.format(t=tmp_path) in r.stderr, r.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # no report.json either


def bf16_checkpoint(d):
    """A tiny llama stored in bfloat16, as the default checkpoints are."""
    from safetensors.torch import load_file, save_file

    make_checkpoint(d, "llama")
    t = load_file(str(d / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in t.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
    (d / "config.json").write_text(json.dumps(cfg))


def test_eval_flag_and_evaluate_py_score_one_delta_alike(tmp_path):
    """On a bf16 checkpoint: the delta keeps the trained fp32 tensor, and edit.py --eval and
    evaluate.py (both float32 on a CPU) report the same figures for it."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    bf16_checkpoint(ckpt)
    edits = tmp_path / "edits.jsonl"
    edits.write_text("".join(json.dumps(e.to_json()) + "\n" for e in tiny_edits(6)))
    r = subprocess.run([sys.executable, str(ROOT / "edit.py"), "--ckpt", ckpt, "--edits", edits, "--layer", "1",
                        "--epochs", "3", "--lr", "0.05", "--out", tmp_path / "run", "--eval"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    d = load_file(str(tmp_path / "run" / "delta.safetensors"))
    assert d[DOWN].dtype == torch.float32 and not torch.equal(d[DOWN], d[DOWN].to(torch.bfloat16).float())
    r = run_cli("--ckpt", ckpt, "--delta", tmp_path / "run" / "delta.safetensors", "--edits", edits,
                "--out", tmp_path / "report.json")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["dtype"] == "float32"
    assert report["metrics"] == json.loads((tmp_path / "run" / "eval.json").read_text())["metrics"]
