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
    script("budget").main([*common, "--n", "6", "--cap", "3", "--every", "2", "--work", str(tmp_path / "runs")])
    result = json.loads(next((tmp_path / "budget").glob("*.json")).read_text())
    assert len(result["epochs"]) == 3 and [r["epoch"] for r in result["rows"]] == [2, 3]
    assert set(result["stops"]) >= {"cap only", "P10-G0.1"} and len(list((tmp_path / "runs").glob("*/snaps/e*.pt"))) == 3
