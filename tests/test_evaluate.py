"""Greedy decoding, the stop rule, answer normalisation, the metrics, the report and the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.mark.parametrize("text, answer", [
    (" Paris. It is the capital", "Paris"),
    (" Paris\nQuestion: next", "Paris"),
    (" Paris", "Paris"),
    (".", ""),
    ("\n Paris", ""),
    (" 3.5 km", "3"),  # the authors' rule: "." stops, even inside a number
    (" Rome, Italy\n.", "Rome, Italy"),
    ("", ""),
])
def test_cut_at_stop(text, answer):
    assert ev.cut_at_stop(text) == answer


# ---------------------------------------------------------------------------------------------
# Decoding


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama whose weights are scaled up so greedy outputs vary from token to token."""
    d = tmp_path_factory.mktemp("tiny")
    make_checkpoint(d, "llama")
    model, tok = M.load(d, dtype="float32")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 3-layer model gains nothing from threads, and loses when cores are busy
    yield d, model, tok
    torch.set_num_threads(threads)


PROMPTS = [" ".join(f"w{3 + (i * 7 + j * 13) % 300}" for j in range(1 + i % 6)) for i in range(12)]


def naive_greedy(model, tok, prompt, max_new, stop):
    """One row, no cache, no padding: the reference."""
    x = torch.tensor([tok.encode(prompt)])
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            t = model(x, logits_at="last").argmax(-1).item()
            out.append(t)
            if stop(t):
                break
            x = torch.cat([x, torch.tensor([[t]])], 1)
    return out


@pytest.mark.parametrize("batch_size", [64, 3])
def test_generate_matches_one_row_greedy_without_cache(tiny, batch_size):
    _, model, tok = tiny
    got = ev.generate_ids(model, tok, PROMPTS, max_new_tokens=12, batch_size=batch_size)
    for p, g in zip(PROMPTS, got):
        assert g == naive_greedy(model, tok, p, 12, lambda t: t in tok.eos_ids)


def test_rows_stop_at_eos_independently(tiny, monkeypatch):
    """Make common tokens EOS: rows finish at different steps and leave the batch early."""
    _, model, tok = tiny
    free = ev.generate_ids(model, tok, PROMPTS, max_new_tokens=12)
    counts = torch.bincount(torch.tensor([t for g in free for t in g[1:]]))
    eos = counts.topk(3).indices.tolist()
    monkeypatch.setattr(tok, "eos_ids", eos)
    got = ev.generate_ids(model, tok, PROMPTS, max_new_tokens=12, batch_size=8)
    lengths = {len(g) for g in got}
    assert len(lengths) > 2  # rows really stopped at different steps
    for p, g in zip(PROMPTS, got):
        assert g == naive_greedy(model, tok, p, 12, lambda t: t in eos)
        assert all(t not in eos for t in g[:-1])


def test_rows_stop_at_a_token_whose_text_has_a_period_or_newline(tiny, tmp_path):
    """A tokenizer in which some tokens decode to "." or "x\\ny": generation stops right there,
    and the answer is the text before it."""
    d, model, tok = tiny
    free = ev.generate_ids(model, tok, PROMPTS[:6], max_new_tokens=8)
    dot, newline = free[0][2], free[1][3]  # tokens these rows produce mid-way
    assert dot != newline and dot not in free[0][:2] and newline not in free[1][:3]
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 320)}}
    inv = {i: w for w, i in vocab.items()}
    inv[dot], inv[newline] = ".", "x\ny"
    t = Tokenizer(models.WordLevel({w: i for i, w in inv.items()}, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.save(str(tmp_path / "tokenizer.json"))
    for f in ("config.json", "generation_config.json"):
        if (d / f).exists():
            (tmp_path / f).write_text((d / f).read_text())
    tok2 = M.Tokenizer(tmp_path, model.args)
    assert tok2.decode([dot]) == "."
    got = ev.generate_ids(model, tok2, PROMPTS[:6], max_new_tokens=8)
    assert got[0] == free[0][:3] and got[1] == free[1][:4]
    answers = ev.generate(model, tok2, PROMPTS[:6], max_new_tokens=8)
    assert answers[0] == tok2.decode(free[0][:2])
    assert answers[1] == tok2.decode(free[1][:3]) + " x"  # cut inside the token, before "\n"


def test_token_accuracy_of_own_greedy_output_is_one(tiny):
    _, model, tok = tiny
    outs = ev.generate_ids(model, tok, PROMPTS[:5], max_new_tokens=6)
    enc = [(tok.encode(p) + o, len(tok.encode(p))) for p, o in zip(PROMPTS[:5], outs)]
    assert ev.token_accuracy(model, enc, tok.pad_id, batch_size=2) == [1.0] * 5
    wrong = [(ids[:n] + [o[0]] + [(o[0] + 1) % 300 + 3] * 3, n) for (ids, n), o in zip(enc, outs)]
    acc = ev.token_accuracy(model, wrong, tok.pad_id)
    assert all(a < 1.0 for a in acc) and all(a >= 0.25 for a in acc)
    assert ev.token_accuracy(model, [([1, 5], 2)], tok.pad_id) == [None]


# ---------------------------------------------------------------------------------------------
# Metrics


class WordTok:
    """decode() joins words; ids index WORDS. EOS is 0."""
    eos_id, eos_ids, pad_id = 0, [0], 0


def test_metrics_on_hand_made_outputs(monkeypatch):
    """Fake model outputs: the metric arithmetic only."""
    class StandIn(torch.nn.Linear):  # outputs are faked; only the weight swap is real
        load_tensors = M.Transformer.load_tensors

    model = StandIn(1, 1, bias=False)
    outputs = {  # prompt -> (base answer, edited answer)
        "p1": ("Paris", "Rome"), "p2": ("London", "the Berlin"), "p3": ("Oslo", "Oslo"),
        "r1": ("Paris", "Rome."), "r2": ("x", "y"), "r3": ("x", "Madrid"), "r4": ("Oslo", "Lima"),
        "l1": ("Tokyo", "Tokyo"), "l2": ("seven", "eight"), "l3": ("blue", "blue"),
    }

    def fake_generate_ids(model_, tok, prompts, max_new_tokens, batch_size):
        edited = model_.weight.item() == 2.0
        return [[prompt, edited] for prompt in prompts]

    def fake_answer_text(tok, ids):
        return ev.cut_at_stop(outputs[ids[0]][int(ids[1])])

    monkeypatch.setattr(ev, "generate_ids", fake_generate_ids)
    monkeypatch.setattr(ev, "answer_text", fake_answer_text)
    monkeypatch.setattr(ev, "token_accuracy", lambda model_, enc, pad, bs: [0.5] * len(enc))
    monkeypatch.setattr(ev, "encode_answer", lambda tok, p, a: ([1], 0))
    monkeypatch.setattr(WordTok, "encode", lambda self, s: [1], raising=False)
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
    assert m["reliability (teacher-forced token acc)"]["edited"] == 0.5
    assert model.weight.item() == 2.0
    e2 = report["edits"][1]
    assert e2["base"] == "London" and e2["edited"] == "the Berlin"
    assert [r["edited"] for r in e2["rephrases"]] == ["y", "Madrid"]
    assert [(x["prompt"], x["answer"], x["base"], x["edited"]) for x in e2["locality"]] == [
        ("l2", "seven", "seven", "eight"), ("l3", "", "blue", "blue")]
    assert report["edits"][0]["rephrases"][0]["edited"] == "Rome"  # cut at the "."


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
    assert m["locality (teacher-forced, base tokens kept)"]["base"] == 1.0
    assert m["locality (teacher-forced, base tokens kept)"]["edited"] < 1.0
    assert any(e["base"] != e["edited"] for e in report["edits"])
    t = report["text"]
    assert t["kl_base_edited_per_token"] > 0 and t["perplexity"]["base"] != t["perplexity"]["edited"]
    assert t["tokens"] == 149
    json.dumps(report)  # serialisable


def test_same_weights_give_same_outputs_and_zero_kl(tiny):
    _, model, tok = tiny
    w = {DOWN: dict(model.named_parameters())[DOWN].detach().clone()}
    report = ev.before_after(model, tok, tiny_edits(), w, w, text="w5 w6 w7 w8 w9 " * 30)
    for row in report["metrics"].values():
        assert row["base"] == row["edited"]
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
    try:
        from edit import save_delta
    except ImportError:
        save_delta = None
    if save_delta is not None:
        save_delta(path, ckpt, tensors, {})
        return
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        meta = {f"sha256.{n}": hashlib.sha256(f.get_tensor(n).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
                for n in tensors}
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path), metadata=meta)


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


@pytest.mark.parametrize("how, words", [("no-edits", "does not exist"), ("bad-ckpt", "hidden_size"),
                                        ("bad-delta", "delta")])
def test_cli_bad_input_gives_one_line(tmp_path, how, words):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama"}) if how == "bad-ckpt" else "{}")
    edits = tmp_path / "e.json"
    edits.write_text(json.dumps([{"prompt": "w5", "target": "w6"}]))
    if how != "bad-ckpt":
        make_checkpoint(ckpt, "llama")
    args = ["--ckpt", ckpt, "--edits", edits if how != "no-edits" else tmp_path / "nope.json"]
    if how == "bad-delta":
        (tmp_path / "d.safetensors").write_bytes(b"not a safetensors file")
        args += ["--delta", tmp_path / "d.safetensors"]
    r = run_cli(*args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate.py: error:") and words in lines[0], r.stderr
