"""experiments/: each script runs end to end on a tiny random model and writes its table, its
data and its plot. The figures are checked against what the library gives when asked directly:
the unedited model's capability, and one configuration of each script trained again here and
scored by a plain greedy loop; the table shows what the JSON holds."""
import importlib.util
import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import capability as C
import data
import edit
import model as model_lib
from evaluate import exact_match
from generate import EDIT_STOP, MAX_NEW_TOKENS, cut_at_stop
from test_capability import DOCS
from tiny import make_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TASKS = "sst2,mmlu,arc_easy,piqa"  # two of the paper's set and two of the small set: both averages
AVERAGES = {"Cap": ["sst2", "mmlu"], "small": ["arc_easy", "piqa"]}
LIMIT = 2


def tiny_vocab_docs(rng) -> dict:
    """ARC-Easy and PIQA documents in the tiny model's words, so its answers depend on its weights
    (the English documents of test_capability tokenise to one unknown id; SST-2's and MMLU's
    answer words do too, so those two keep them)."""
    w = lambda n: " ".join(f"w{rng.randrange(3, 320)}" for _ in range(n))  # noqa: E731
    return {"arc_easy": [{"id": f"t{i}", "question": w(4), "choices": {"text": [w(2), w(2), w(2)],
                          "label": ["A", "B", "C"]}, "answerKey": rng.choice("ABC")} for i in range(LIMIT)],
            "piqa": [{"goal": w(4), "sol1": w(3), "sol2": w(3), "label": rng.randrange(2)} for _ in range(LIMIT)]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("exp")
    make_checkpoint(d / "ckpt", "llama")
    rng = random.Random(0)
    w = lambda: f"w{rng.randrange(3, 320)}"  # noqa: E731
    records = [{"prompt": f"{w()} {w()} {w()}", "target": w(), "subject": w(), "old_answer": w(),
                "rephrases": [f"{w()} {w()}"], "locality": [[f"{w()} {w()}", w()]]} for _ in range(24)]
    (d / "edits.json").write_text(json.dumps(records))
    (d / "cap").mkdir()
    docs = {**DOCS, **tiny_vocab_docs(rng)}
    for task in TASKS.split(","):
        (d / "cap" / f"{task}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs[task]))
    return d


def script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def capability_averages(model, tok, cap_dir) -> dict:
    """Each average of the primary metrics, from capability.run on the model as it is."""
    score = {t: np.mean(C.run(model, tok, C.TASKS[t], C.load_docs(t, LIMIT, cap_dir))[C.TASKS[t].primary])
             for t in TASKS.split(",")}
    return {name: float(np.mean([score[t] for t in members])) for name, members in AVERAGES.items()}


@torch.no_grad()
def greedy(model, tok, prompt: str) -> list[int]:
    """The new token ids of a plain greedy loop: one prompt, no cache, no batching, stopping at
    EOS or once the new text holds "." or a newline (the authors' protocol)."""
    ids, new = tok.encode(prompt), []
    while len(new) < MAX_NEW_TOKENS:
        new.append(int(model(torch.tensor([ids + new]))[0, -1].argmax()))
        if new[-1] == tok.eos_id or any(s in tok.decode(new) for s in EDIT_STOP):
            break
    return new


def greedy_em(model, tok, pairs) -> float:
    """The share of (prompt, target) whose greedy answer is the target."""
    return float(np.mean([exact_match(cut_at_stop(tok.decode(greedy(model, tok, p))), t) for p, t in pairs]))


@torch.no_grad()
def argmax_along(model, ids: list[int], n_prompt: int) -> torch.Tensor:
    """The model's argmax at each position after the prompt, given the tokens before it."""
    return model(torch.tensor([ids]))[0, n_prompt - 1:len(ids) - 1].argmax(-1)


def table_cells(table: str) -> list[dict]:
    """The markdown table's rows as {header: cell}."""
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]


# name, its own flags, one of its rows (by its identifying fields) and how that row was trained
CHECKED = {
    "bf_vs_df": (["--n", "6"], {"run": "depth-first (batch 1)"}, 6, dict(layer=1, pipeline="df")),
    "batch_size": (["--n", "6", "--batch-sizes", "1,3"], {"batch_size": 3}, 6, dict(layer=1, batch_size=3)),
    "location": (["--n", "6", "--layers", "0,2"], {"layer": 2, "module": "mlp"}, 6, dict(layer=2, module="mlp")),
    "prefix_aug": (["--n", "6", "--k", "2"], {"run": "LocFT-BF + 2 prefixes"}, 6, dict(layer=1, augment_prefixes=2)),
    "ftpp": (["--n", "6"], {"run": "all three"}, 6, dict(layer=1, smooth_alpha=0.1, general_kl=1.0, local_kl=1.0)),
}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", list(CHECKED))
def test_experiment_writes_its_table_and_plot(setup, tmp_path, name):
    extra, which, n, hp = CHECKED[name]
    out = tmp_path / "results"
    layer = [] if name == "location" else ["--layer", "1"]
    script(name).main(["--ckpt", str(setup / "ckpt"), "--edits", str(setup / "edits.json"), "--quick", *layer,
                       "--capability", TASKS, "--limit", str(LIMIT), "--capability-data", str(setup / "cap"),
                       "--out", str(out), *extra])
    table = (out / f"{name}.md").read_text()
    rows = json.loads((out / f"{name}.json").read_text())["rows"]
    assert f"python experiments/{name}.py" in table and (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"

    # the unedited model's capability: every row and the table's setting line say what it scores
    model, tok = model_lib.load(setup / "ckpt")
    base = capability_averages(model, tok, setup / "cap")
    assert f"base model: Cap {base['Cap']:.3f}, small {base['small']:.3f}" in table
    for r in rows:
        for avg, members in AVERAGES.items():
            assert r[f"{avg}_base"] == pytest.approx(base[avg])
            per_task = [r[f"{t}_{C.TASKS[t].primary}"] for t in members]  # the edited model's, task by task
            assert r[avg] == pytest.approx(np.mean(per_task))
            assert r[f"{avg}_change"] == pytest.approx(r[avg] - r[f"{avg}_base"])

    # one configuration trained again from the base and scored without the evaluation code
    row, = [r for r in rows if all(r[k] == v for k, v in which.items())]
    edits = data.load_edits(setup / "edits.json", n=n)
    trained, _ = edit.edit(model, tok, edits, replace(edit.Hparams(), **hp), say=lambda s: None)
    # teacher-forced locality: along the base model's own greedy output, how often the edited
    # model's argmax is the base model's (a figure that moves with every change of the tensor)
    along = [(tok.encode(p) + greedy(model, tok, p), len(tok.encode(p))) for e in edits for p, _ in e.locality]
    kept = [argmax_along(model, ids, k) for ids, k in along]
    model.load_tensors(trained)
    locality = np.mean([(argmax_along(model, ids, k) == b).float().mean().item() for (ids, k), b in zip(along, kept)])
    assert row["locality_teacher_forced"] == pytest.approx(locality)
    assert row["reliability"] == pytest.approx(greedy_em(model, tok, [(e.prompt, e.target) for e in edits]))
    assert row["generalization"] == pytest.approx(greedy_em(model, tok, [(p, e.target) for e in edits for p in e.rephrases]))
    edited = capability_averages(model, tok, setup / "cap")
    assert row["Cap"] == pytest.approx(edited["Cap"]) and row["small"] == pytest.approx(edited["small"])

    # the table shows the JSON's figures, row for row, to the places it prints
    cells = table_cells(table)
    assert len(cells) == len(rows)
    for c, r in zip(cells, rows):
        for key in ("reliability", "generalization", "Cap", "small", "locality_unchanged", "locality_teacher_forced"):
            if key in c:
                places = len(c[key].split(".")[1])
                assert abs(float(c[key]) - r[key]) <= 0.5 * 10 ** -places + 1e-12, (key, c[key], r[key])


@pytest.mark.usefixtures("one_thread")
def test_location_sweep_resumes_from_the_cells_it_has(setup, tmp_path, monkeypatch):
    args = ["--ckpt", str(setup / "ckpt"), "--edits", str(setup / "edits.json"), "--quick", "--n", "4",
            "--layers", "1", "--capability", "sst2", "--limit", "1", "--capability-data", str(setup / "cap"),
            "--out", str(tmp_path)]
    location = script("location")
    location.main(args)
    cells = sorted(p.name for p in (tmp_path / "location" / "ckpt-4").iterdir())
    assert cells == [f"L1-{m}.json" for m in sorted(location.MODULES)]
    monkeypatch.setattr(location.edit, "edit", lambda *a, **k: pytest.fail("a finished cell was trained again"))
    location.main(args + ["--layers", "1"])
    (tmp_path / "location" / "ckpt-4" / "L1-attn.json").unlink()  # one cell lost: only it runs
    monkeypatch.undo()
    calls = []
    real = location.edit.edit
    monkeypatch.setattr(location.edit, "edit", lambda *a, **k: calls.append(a[3].module) or real(*a, **k))
    location.main(args)
    assert calls == ["attn"]


@pytest.mark.usefixtures("one_thread")
def test_capacity_and_budget_write_their_tables_and_resume(setup, tmp_path):
    """capacity.py: one row per edit count, every cell stored and skipped when found; budget.py:
    the long run's tensors, scored at the epochs asked for and where each rule stops."""
    common = ["--ckpt", str(setup / "ckpt"), "--edits", str(setup / "edits.json"), "--layer", "1", "--out", str(tmp_path)]
    script("capacity").main([*common, "--ns", "4,8", "--work", str(tmp_path / "cells")])
    rows = json.loads((tmp_path / "capacity.json").read_text())["rows"]
    assert [r["n"] for r in rows] == [4, 8] and all({"reliability", "learnt", "kl_per_token", "edits_per_param"} <= set(r) for r in rows)
    assert (tmp_path / "capacity.png").read_bytes()[:4] == b"\x89PNG"
    stored = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir()}
    script("capacity").main([*common, "--ns", "4,8", "--work", str(tmp_path / "cells")])  # found: nothing trains
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir()} == stored
    full = {r["n"]: r for r in rows}
    script("capacity").main([*common, "--ns", "4,8", "--sample", "5", "--work", str(tmp_path / "sampled")])
    rows = {r["n"]: r for r in json.loads((tmp_path / "capacity.json").read_text())["rows"]}
    assert rows[4]["scored"] == 4 and rows[4]["reliability_ci95"] is None and rows[4]["reliability"] == full[4]["reliability"]
    assert rows[8]["scored"] == 5 and rows[8]["learnt"] == full[8]["learnt"]  # the learnt check: every edit
    lo, hi = rows[8]["reliability_ci95"]
    assert lo <= rows[8]["reliability"] <= hi and len(json.loads((tmp_path / "sampled" / "ckpt-8-sample5-base.json").read_text())) == 5
    assert [round(x, 4) for x in script("capacity").wilson(5, 10)] == [0.2366, 0.7634]  # the textbook 95% interval
    script("budget").main([*common, "--n", "6", "--cap", "3", "--every", "2", "--work", str(tmp_path / "runs")])
    result = json.loads(next((tmp_path / "budget").glob("*.json")).read_text())
    assert len(result["epochs"]) == 3 and [r["epoch"] for r in result["rows"]] == [2, 3]
    assert set(result["stops"]) >= {"cap only", "P10-G0.1"} and len(list((tmp_path / "runs").glob("*/snaps/e*.pt"))) == 3


def test_harm_preset_keeps_its_own_document_counts():
    """--capability harm: no --limit unless asked (or --quick); any other set: the script's default."""
    from experiments import common

    def limit(*argv):
        return common.parse(common.parser("harm"), ["--edits", "x.json", *argv])[2]

    assert limit("--capability", "harm") is None
    assert limit("--capability", "harm", "--quick") == 5 and limit("--capability", "harm", "--limit", "7") == 7
    assert limit("--capability", "small") == 20


def test_harm_runs_only_the_steps_whose_outputs_are_missing(tmp_path, monkeypatch):
    """experiments/harm.py: an edit whose delta exists is not trained again; an interrupted one
    continues with --resume; evaluation follows its edit; the runs go smallest first."""
    harm = script("harm")
    (tmp_path / "smol-100").mkdir()
    (tmp_path / "smol-100" / "delta.safetensors").write_bytes(b"")
    (tmp_path / "qwen-100.partial").mkdir()
    (tmp_path / "qwen-100.partial" / "checkpoint.pt").write_bytes(b"")
    calls = []
    monkeypatch.setattr(harm.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    harm.main(["--edits", "z.json", "--runs", "smol-100,qwen-100", "--work", str(tmp_path), "--out", str(tmp_path)])
    steps = [(Path(c[1]).name, c[c.index("--out") + 1]) for c in calls]
    assert steps == [("evaluate.py", str(tmp_path / "smol-100-harm.json")), ("edit.py", str(tmp_path / "qwen-100")),
                     ("evaluate.py", str(tmp_path / "qwen-100-harm.json"))]
    assert "--resume" in calls[1] and calls[0][calls[0].index("--capability") + 1] == "harm"
    assert harm.RUNS == ["smol-100", "qwen-100", "smol-1000", "qwen-1000"]


def test_capacity_reuses_a_budget_run_only_with_the_same_edits_and_settings(setup, tmp_path):
    """capacity.from_budget (and so harm.py --reuse): the tensor of the epoch the defaults stop
    at, and budget.py's scores of it; nothing from a run still training, of other edits or of
    other settings. An option newer than the run's log counts as at its default."""
    import edit
    from data import load_edits
    from_budget = script("capacity").from_budget
    edits = load_edits(str(setup / "edits.json"), n=4)
    hp = edit.Hparams(layer=1)
    run = tmp_path / "ckpt-edits-4-b1"
    (run / "snaps").mkdir(parents=True)
    (run / "scores").mkdir()
    (run / "edits.json").write_text(json.dumps([e.to_json() for e in edits]))
    losses = [0.5, 0.2, 0.005, 0.001]  # the paper's early stop after epoch 3
    epochs = [{"epoch": i + 1, "mean_loss": x, "learnt": i, "steps": 1, "seconds": 1.0} for i, x in enumerate(losses)]
    for e in epochs:
        torch.save({"w": torch.full((2,), float(e["epoch"]))}, run / "snaps" / f"e{e['epoch']:03d}.pt")
    (run / "scores" / "e003.json").write_text(json.dumps({"reliable": [True] * 4}))
    settings = {k: v for k, v in vars(hp).items() if k not in ("retain", "retain_weight", "retain_tokens")}
    log = {"hparams": {**settings, "batch_size": 1, "patience": 0, "general_text": "/elsewhere/general_text.txt"}, "batch_size": 1,
           "epochs": epochs, "prefix_seconds": 2.0}
    assert from_budget(run, edits, hp) is None  # no final log yet: still training
    (run / "train_log.json").write_text(json.dumps(log))
    tensors, got = from_budget(run, edits, hp)
    assert tensors["w"][0] == 3 and got["epochs_run"] == 3 and got["scores"] == {"reliable": [True] * 4}
    assert got["seconds"] == 2.0 + 3 and got["stop"].startswith("early stop")
    (run / "train_log.json").write_text(json.dumps({**log, "learnt": {"learnt": 4, "edits": 4, "not_learnt": []}}))
    assert "learnt" not in from_budget(run, edits, hp)[1]  # the run's end-of-training check is of epoch 4
    (run / "train_log.json").write_text(json.dumps({**log, "epochs": epochs[:3], "learnt": {"learnt": 4}}))
    assert from_budget(run, edits, hp)[1]["learnt"] == {"learnt": 4}  # the defaults stop at its last epoch
    (run / "train_log.json").write_text(json.dumps(log))
    assert from_budget(run, edits[:3], hp) is None
    assert from_budget(run, edits, edit.Hparams(layer=1, lr=1e-3)) is None
