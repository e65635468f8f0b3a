"""End to end, as a user runs it: convert (conftest), edit.py on the demo set, evaluate.py,
then transformers loads the exported checkpoint and answers with the edits.

Both default models: SmolLM2-135M (Llama architecture) and Qwen2.5-Coder-0.5B (Qwen2).
"""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch
import transformers

import evaluate
import generate

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo_edits.json"


def run(script, *args):
    r = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, timeout=900)
    assert r.returncode == 0, f"{script} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


def file_hashes(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def exported_model_answers(export: Path, edits) -> float:
    """Greedy answers of transformers' own model loaded from the export: share matching the target."""
    tok = transformers.AutoTokenizer.from_pretrained(export)
    tok.padding_side = "left"
    hf = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    enc = tok([e.prompt for e in edits], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = hf.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    answers = [generate.cut_at_stop(tok.decode(o[enc.input_ids.shape[1]:], skip_special_tokens=True)) for o in out]
    return sum(evaluate.exact_match(a, e.target) for a, e in zip(answers, edits)) / len(edits)


def edit_evaluate_export(ckpt: Path, tmp_path: Path, layer: str, n: int = 30):
    """The first `n` demo edits (all 30 by default)."""
    import data

    before = file_hashes(ckpt)
    out, export, report_path = tmp_path / "run", tmp_path / "export", tmp_path / "report.json"
    r = run("edit.py", "--ckpt", ckpt, "--edits", DEMO, "--n", n, "--layer", layer, "--out", out, "--export", export)
    assert "epoch 1/" in r.stdout + r.stderr  # progress lines
    for name in ("delta.safetensors", "edits.jsonl", "train_log.json"):
        assert (out / name).exists(), name
    run("evaluate.py", "--ckpt", ckpt, "--delta", out / "delta.safetensors", "--edits", DEMO, "--n", n, "--out", report_path)
    metrics = json.loads(report_path.read_text())["metrics"]
    rel = metrics["reliability (greedy EM)"]
    print(f"{ckpt.name}: " + ", ".join(f"{k}: {v.get('base')} -> {v.get('edited')}" for k, v in metrics.items()))
    assert rel["edited"] >= 0.9
    assert rel["base"] <= 0.2  # the demo facts are counterfactual: the base model must not know them
    assert file_hashes(ckpt) == before  # the base checkpoint is never written
    edits = data.load_edits(DEMO, n=n)
    assert exported_model_answers(export, edits) >= 0.9


def test_smollm2_demo_end_to_end(smollm2_dir, tmp_path):
    edit_evaluate_export(smollm2_dir, tmp_path, layer="22")


def test_qwen2_demo_end_to_end(qwen_dir, tmp_path):
    edit_evaluate_export(qwen_dir, tmp_path, layer="17", n=10)  # a third of the set: the 0.5B model is the slow one
