"""experiments/: each script runs end to end on a tiny random model and writes its table, its
data and its plot (the figures themselves are not checked: they come from real runs)."""
import importlib.util
import json
import random
from pathlib import Path

import pytest

from test_capability import DOCS
from tiny import make_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TASKS = "sst2,mmlu,arc_easy,piqa"  # two of the paper's set and two of the small set: both averages


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
    for task in TASKS.split(","):
        (d / "cap" / f"{task}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in DOCS[task]))
    return d


def script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name, extra", [
    ("bf_vs_df", ["--n", "6"]),
    ("batch_size", ["--n", "6", "--batch-sizes", "1,3"]),
    ("location", ["--n", "6", "--layers", "0,2"]),
    ("n_edits", ["--ns", "4,8"]),
    ("prefix_aug", ["--n", "6", "--k", "2"]),
    ("ftpp", ["--n", "6"]),
])
def test_experiment_writes_its_table_and_plot(setup, tmp_path, name, extra):
    out = tmp_path / "results"
    layer = [] if name == "location" else ["--layer", "1"]
    script(name).main(["--ckpt", str(setup / "ckpt"), "--edits", str(setup / "edits.json"), "--quick", *layer,
                       "--capability", TASKS, "--limit", "2", "--capability-data", str(setup / "cap"),
                       "--out", str(out), *extra])
    table = (out / f"{name}.md").read_text()
    rows = json.loads((out / f"{name}.json").read_text())["rows"]
    assert f"python experiments/{name}.py" in table and table.count("\n| ") >= len(rows) + 1
    assert all({"reliability", "generalization", "Cap", "small"} <= set(r) for r in rows)
    assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


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
