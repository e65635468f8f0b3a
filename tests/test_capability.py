"""Capability: the lm-eval oracle (the real lm_eval package through lm_eval_adapter on the same
documents), the log-likelihood batching, scoring, the paired interval and the CLI's bad input.

The documents are written here, a few per task in each data set's own fields, so the suite needs
neither the capability data (make capability) nor a network.
"""
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import capability as C

ROOT = Path(__file__).resolve().parent.parent

DOCS = {
    "mmlu": [
        {"subject": "astronomy", "question": "Which planet is closest to the Sun?",
         "choices": ["Venus", "Mercury", "Mars", "Earth"], "answer": 1},
        {"subject": "astronomy", "question": " What is the name of the galaxy that contains the Solar System? ",
         "choices": ["Andromeda", "Triangulum", "The Milky Way", "Sombrero"], "answer": 2},
        {"subject": "high_school_mathematics", "question": "What is 7 multiplied by 8?",
         "choices": ["54", "56", "58", "64"], "answer": 1},
        {"subject": "high_school_mathematics", "question": "If 2x + 3 = 11, what is x?",
         "choices": ["3", "4", "5", "7"], "answer": 1},
    ],
    "sst2": [
        {"sentence": "a gorgeous , witty , seductive movie . ", "label": 1, "idx": 0},
        {"sentence": "the plot is nothing but boilerplate clichés from start to finish , ", "label": 0, "idx": 1},
        {"sentence": "an utterly charming and hilarious film that reminded me why i love the movies . ", "label": 1,
         "idx": 2},
    ],
    "nq": [
        {"question": "what is the capital city of france", "answer": ["Paris"]},
        {"question": "who wrote the play romeo and juliet", "answer": ["William Shakespeare", "Shakespeare"]},
        {"question": "how many legs does a spider have", "answer": ["eight", "8"]},
    ],
    "gsm8k": [
        {"question": "Tom has 3 apples and buys 4 more. How many apples does he have now?",
         "answer": "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
        {"question": "A box holds 12 eggs. How many eggs are in 3 boxes?",
         "answer": "3 boxes hold 3 * 12 = <<3*12=36>>36 eggs.\n#### 36"},
    ],
    "arc_easy": [
        {"id": "t1", "question": "Which of these is a source of light?",
         "choices": {"text": ["a rock", "the Sun", "a spoon", "a leaf"], "label": ["A", "B", "C", "D"]},
         "answerKey": "B"},
        {"id": "t2", "question": "What do plants need to make food?",
         "choices": {"text": ["sunlight", "sand", "plastic"], "label": ["1", "2", "3"]}, "answerKey": "1"},
    ],
    "arc_challenge": [
        {"id": "t3", "question": "Which property of a mineral can be determined just by looking at it?",
         "choices": {"text": ["luster", "mass", "weight", "hardness"], "label": ["A", "B", "C", "D"]},
         "answerKey": "A"},
        {"id": "t4", "question": "Why does ice float on water?",
         "choices": {"text": ["Ice is colder than water.", "Ice is less dense than water.",
                              "Ice has more mass than water.", "Ice is a gas."],
                     "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
    ],
    "hellaswag": [
        {"ind": 1, "activity_label": "Making a sandwich", "ctx_a": "A man places two slices of bread on a plate.",
         "ctx_b": "he", "ctx": "", "endings": ["spreads butter on the bread.", "throws the plate [title] at the wall.",
                                               "drives a car to the moon.", "swims across the plate."],
         "source_id": "x", "split": "val", "split_type": "indomain", "label": "0"},
        {"ind": 2, "activity_label": "Home and Garden", "ctx_a": "[header] How to water a plant [title] Fill a can.",
         "ctx_b": "then", "ctx": "", "endings": ["pour the water slowly onto the soil.", "eat the plant.",
                                                 "paint the can [step] blue.", "sleep in the garden."],
         "source_id": "y", "split": "val", "split_type": "indomain", "label": "0"},
    ],
    "piqa": [
        {"goal": "How do you boil an egg?", "sol1": "Put the egg in boiling water for ten minutes.",
         "sol2": "Put the egg in the freezer for ten minutes.", "label": 0},
        {"goal": "To dry wet hands,", "sol1": "rub them with a dry towel.", "sol2": "dip them in a bucket of water.",
         "label": 0},
    ],
    "winogrande": [
        {"sentence": "The trophy didn't fit in the suitcase because _ was too big.", "option1": "the trophy",
         "option2": "the suitcase", "answer": "1"},
        {"sentence": "Sarah lent Maria money because _ had plenty of it.", "option1": "Sarah", "option2": "Maria",
         "answer": "1"},
    ],
    "boolq": [
        {"question": "is the sun a star", "passage": "Sun -- The Sun is the star at the center of the Solar System.",
         "idx": 0, "label": 1},
        {"question": "is a tomato a vegetable in botany",
         "passage": "Tomato -- In botany, the tomato is a fruit, a berry of the nightshade plant.", "idx": 1, "label": 0},
    ],
    "sciq": [
        {"question": "What do plants absorb from the air to make food?", "distractor1": "oxygen",
         "distractor2": "nitrogen", "distractor3": "helium", "correct_answer": "carbon dioxide",
         "support": " Plants take in carbon dioxide from the air and use sunlight to make sugar."},
        {"question": "What is the boiling point of water at sea level in degrees Celsius?", "distractor1": "50",
         "distractor2": "0", "distractor3": "212", "correct_answer": "100", "support": ""},
    ],
    "openbookqa": [
        {"id": "o1", "question_stem": "The sun is responsible for",
         "choices": {"text": ["puppies learning new tricks", "plants sprouting, blooming and wilting",
                              "a rock falling", "the moon shining"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
        {"id": "o2", "question_stem": "Which of these would let the most heat travel through?",
         "choices": {"text": ["a steel spoon", "a wooden spoon", "a plastic spoon", "a paper cup"],
                     "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
    ],
    "social_iqa": [
        {"context": "Tracy gave Riley a warm hug after the long trip.", "question": "How would Riley feel as a result?",
         "answerA": "loved", "answerB": "angry", "answerC": "bored", "label": "1"},
        {"context": "Jordan forgot his umbrella and it started to rain.", "question": "What will Jordan want to do next?",
         "answerA": "go swimming", "answerB": "find shelter", "answerC": "buy sunscreen", "label": "2"},
    ],
    "lambada": [
        {"text": "She opened the door, stepped outside and looked up at the bright blue sky"},
        {"text": "He poured the milk into a glass and drank the milk"},
    ],
}

MMLU_SUBJECTS = ["astronomy", "high_school_mathematics"]


# ---------------------------------------------------------------------------------------------
# The oracle: lm-eval itself, through the adapter, on the same documents


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    import model as M

    return M.load(smollm2_dir)


def test_capability_matches_lm_eval_item_by_item(smollm2, tmp_path):
    """For every task: lm-eval's prompts equal ours, and each document's scores (and extracted
    answers) are the same under lm-eval's own scoring code as under capability.py. lm-eval's
    requests go through the adapter's plain path (one row per request, every prompt read whole);
    capability.run reads shared prefixes once (score_shared, greedy with share_prefix), so this
    also holds the fast paths to the plain ones, log-likelihood by log-likelihood."""
    from lm_eval.tasks import TaskManager

    from lm_eval_adapter import ProjectLM, evaluate_local, local_tasks

    model, tok = smollm2
    lm, tm = ProjectLM(model=model, tokenizer=tok), TaskManager()  # indexing lm-eval's tasks takes seconds: once
    correct = 0
    for name, task in C.TASKS.items():
        groups = ({f"mmlu_{s}": [d for d in DOCS[name] if d["subject"] == s] for s in MMLU_SUBJECTS}
                  if name == "mmlu" else {task.lm_eval: DOCS[name]})
        for lm_task, docs in groups.items():
            config, samples = evaluate_local(lm, local_tasks(tm, {lm_task: docs}, tmp_path))[lm_task]
            assert str(config["metadata"]["version"]) == task.version.split()[0], lm_task
            ours = C.run(model, tok, task, docs)
            correct += sum(ours[task.primary])
            if task.score is not None:  # generation: one sample per filter and document
                for s in samples:
                    i = int(s["doc_id"])
                    assert s["arguments"][0][0] == task.request(docs[i]), lm_task
                    assert s["filtered_resps"][0] == ours["answers"][i][s["filter"]], (lm_task, i)
                    metric = f"exact_match,{s['filter']}"
                    assert s["exact_match"] == ours[metric][i], (lm_task, i, metric)
                continue
            assert len(samples) == len(docs)
            for i, s in enumerate(samples):
                req = task.request(docs[i])
                pairs = [req] if isinstance(req, tuple) else req.pairs()
                assert [tuple(a) for a in s["arguments"]] == pairs, (lm_task, i)
                for m in task.metrics:
                    assert s[m] == ours[m][i], (lm_task, i, m)
                lls = ours["loglikelihoods"][i]  # lm-eval's come from one row per request (score_tokens)
                assert [float(r[0]) for r in s["filtered_resps"]] == pytest.approx(
                    lls if isinstance(lls, list) else [lls], abs=1e-4), lm_task
    assert correct > 0  # the model answers some of these easy items: the comparison is not all-wrong


# ---------------------------------------------------------------------------------------------
# Log-likelihoods: batched and shared rows against one plain forward per request


def test_score_tokens_equals_plain_forward(tiny):
    _, model, tok = tiny
    requests = [([1, 5, 9], [17]), ([1, 5, 9], [18]), ([1, 5, 9], [17, 40, 41]), ([7, 8], [9, 10]),
                ([3, 4, 5, 6, 7, 8, 9, 10], [11]), ([1, 5, 9, 17], [40])]
    got = C.score_tokens(model, tok, requests, batch_size=2)
    for (ctx, cont), (ll, is_greedy) in zip(requests, got):
        logp = F.log_softmax(model(torch.tensor([ctx + cont])).float()[0], -1)
        pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
        want = logp[pos, torch.tensor(cont)].sum().item()
        assert ll == pytest.approx(want, abs=1e-4)
        assert is_greedy == bool((logp[pos].argmax(-1) == torch.tensor(cont)).all())
    # a continuation that is the model's greedy one is reported as such
    ctx = [1, 5, 9]
    best = model(torch.tensor([ctx])).float()[0, -1].argmax().item()
    assert C.score_tokens(model, tok, [(ctx, [best])])[0][1] is True


def test_shared_prefix_scores_equal_one_row_per_request(tiny):
    """score_shared (each group's shared tokens read once into a KV cache) against score_tokens
    (one row per request): the same log-likelihoods in fp rounding, the same greedy flags, in
    batches that cut groups apart and mix prefix lengths."""
    _, model, tok = tiny
    groups = [
        [([1, 5, 9, 11], [17, 18]), ([1, 5, 9, 11], [30]), ([1, 5, 9, 11], [40, 41, 42])],  # choices after one context
        [([7, 8], [9]), ([7, 8], [10])],  # one-token choices: one row, the plain path
        [([3, 4, 5, 6], [20, 21]), ([3, 4, 5, 60, 61], [20, 21])],  # WinoGrande: contexts differ, continuation shared
        [([2, 9, 9, 9, 9, 9, 9, 9], [50, 51]), ([2, 9, 9, 9, 9, 9, 9, 9], [52]), ([2, 9, 9, 9, 9, 9, 9, 9], [50, 53])],
        [([6], [7, 8]), ([6], [9, 10])],  # nothing to share before the first predicted token
    ]
    # the greedy continuation of a context, so that a True is among the flags compared
    best = model(torch.tensor([[1, 5, 9, 11]])).float()[0, -1].argmax().item()
    groups[0].append(([1, 5, 9, 11], [best]))
    want = C.score_tokens(model, tok, [r for g in groups for r in g], batch_size=64)
    for batch_size in (64, 4, 1):
        got = [x for g in C.score_shared(model, tok, groups, batch_size=batch_size) for x in g]
        assert [g for _, g in got] == [g for _, g in want]
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-4)
    assert any(g for _, g in want)


def test_encode_pair_moves_trailing_space_to_the_continuation(smollm2_dir):
    import model as M

    tok = M.Tokenizer(smollm2_dir, M.read_args(smollm2_dir))
    ctx, cont = C.encode_pair(tok, "The capital of France is ", "Paris")
    assert ctx == tok.encode("The capital of France is")
    assert ctx + cont == tok.encode("The capital of France is Paris")


# ---------------------------------------------------------------------------------------------
# Scoring pieces against lm-eval's own functions


@pytest.mark.parametrize("pred, ref, kw", [
    ("The Paris", "Paris", {"regexes_to_ignore": [C.NQ_ARTICLES], "ignore_case": True, "ignore_punctuation": True}),
    ("paris.", "Paris", {"ignore_case": True, "ignore_punctuation": True}),
    ("Paris ", "Paris", {"ignore_case": True}),
    ("$1,000.", "1000", {"regexes_to_ignore": C.GSM8K_IGNORE, "ignore_case": True}),
    ("so #### 72", "72", {"regexes_to_ignore": C.GSM8K_IGNORE}),
    ("an apple", "apple", {"regexes_to_ignore": [C.NQ_ARTICLES]}),
])
def test_exact_match_as_lm_eval(pred, ref, kw):
    from lm_eval.api.metrics import exact_match_hf_evaluate

    want = exact_match_hf_evaluate(predictions=[pred], references=[ref], **kw)["exact_match"]
    assert C.exact_match(pred, ref, kw.get("regexes_to_ignore", ()), kw.get("ignore_case", False),
                         kw.get("ignore_punctuation", False)) == bool(want)


@pytest.mark.parametrize("text", ["The answer is 12. Q: next", "no number here", "It costs $1,250.50 or 3",
                                  "The answer is -4.\n\nThe answer is 9.", "7 then 8"])
def test_gsm8k_filters_as_lm_eval(text):
    from lm_eval.filters.extraction import RegexFilter

    for args in ((r"The answer is (\-?[0-9\.\,]+).", 0), (r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1)):
        want = RegexFilter(regex_pattern=args[0], group_select=args[1]).apply([[text]], [{}])[0][0]
        assert C.regex_filter(text, *args) == want


# ---------------------------------------------------------------------------------------------
# Base against edited


def test_paired_interval():
    rng = np.random.default_rng(0)
    same = [1, 0, 1, 1, 0] * 20
    change, draws = C.paired_change(same, same, rng)
    assert change == 0 and C.interval(draws) == [0.0, 0.0] and C.verdict(C.interval(draws)) == "no measurable change"
    change, draws = C.paired_change([0] * 100, [1] * 60 + [0] * 40, rng)
    lo, hi = C.interval(draws)
    assert change == pytest.approx(0.6) and 0.45 < lo < 0.6 < hi < 0.75 and C.verdict([lo, hi]) == "better"
    change, draws = C.paired_change([1] * 50 + [0] * 50, [0] * 50 + [1] * 50, rng)  # as many lost as won
    assert change == 0 and C.verdict(C.interval(draws)) == "no measurable change"


def test_before_after_one_model(tiny, tmp_path):
    """Base and edited runs on one model: each column is what its own weights score item by item
    (capability.run with the weights loaded by hand), the edit here changes some answers so a
    column computed from the wrong weights shows, identical weights give a change of 0, and the
    model is left holding the edited tensors."""
    _, model, tok = tiny
    rng = random.Random(0)  # PIQA-shaped documents in the tiny model's vocabulary, so answers vary
    words = lambda n: " ".join(f"w{rng.randrange(3, 320)}" for _ in range(n))  # noqa: E731
    docs = [{"goal": words(4), "sol1": words(3), "sol2": words(3), "label": rng.randrange(2)} for _ in range(8)]
    (tmp_path / "piqa.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    name = "model.layers.1.mlp.down_proj.weight"
    w = dict(model.named_parameters())[name]
    original = w.detach().clone()
    edited = {name: original + 0.5}
    expected = {}
    for label, t in (("base", original), ("edited", edited[name])):
        model.load_tensors({name: t})
        expected[label] = C.run(model, tok, C.TASKS["piqa"], docs)["acc"]
    model.load_tensors({name: original})
    assert expected["base"] != expected["edited"]  # 3 of 8 right before, 5 after

    rep = C.before_after(model, tok, ["piqa"], None, edited, data_dir=tmp_path, say=lambda *_: None)
    assert torch.equal(w, edited[name])
    cell = rep["tasks"]["piqa"]["metrics"]["acc"]
    assert rep["tasks"]["piqa"]["n"] == 8
    assert set(cell) == {"base", "edited", "change", "ci95", "verdict", "flipped"}
    assert cell["base"] == np.mean(expected["base"]) and cell["edited"] == np.mean(expected["edited"])
    assert cell["change"] == pytest.approx(np.mean(expected["edited"]) - np.mean(expected["base"]))
    model.load_tensors({name: original})
    same = C.before_after(model, tok, ["piqa"], None, {name: original}, data_dir=tmp_path, say=lambda *_: None)
    assert same["tasks"]["piqa"]["metrics"]["acc"]["change"] == 0
    assert same["tasks"]["piqa"]["metrics"]["acc"]["edited"] == np.mean(expected["base"])


def write_docs(path: Path, names) -> None:
    for n in names:
        (path / f"{n}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS[n]))


def test_unedited_model_kl_and_every_change_are_exactly_zero(tiny, tmp_path):
    """The edited tensors equal to the base ones: every change and interval end, the KL and the
    perplexity change are exactly 0; a real change moves the KL off 0 and leaves the model
    holding the edited tensors."""
    _, model, tok = tiny
    write_docs(tmp_path, ["arc_easy", "piqa", "lambada"])
    name = "model.layers.1.mlp.down_proj.weight"
    w = dict(model.named_parameters())[name]
    original = w.detach().clone()
    spec = C.resolve("arc_easy,piqa,lambada:1,lambada_text")
    rep = C.before_after(model, tok, spec, None, {name: original.clone()}, data_dir=tmp_path, say=lambda *_: None)
    for t in rep["tasks"].values():
        for c in t["metrics"].values():
            assert c["change"] == 0 and c["ci95"] == [0.0, 0.0]
    text = rep["tasks"]["lambada_text"]
    assert text["tokens"] > 0 and text["metrics"]["kl_per_token"]["edited"] == 0.0
    assert text["metrics"]["perplexity"]["base"] == text["metrics"]["perplexity"]["edited"]
    harm = rep["averages"]["small"]
    assert harm["change"] == 0 and harm["half_width"] == 0 and harm["flipped"] == 0
    rep = C.before_after(model, tok, spec, None, {name: original + 0.3}, data_dir=tmp_path, say=lambda *_: None)
    assert rep["tasks"]["lambada_text"]["metrics"]["kl_per_token"]["edited"] > 0
    lo, hi = rep["tasks"]["lambada_text"]["metrics"]["kl_per_token"]["ci95"]
    assert 0 < lo <= rep["tasks"]["lambada_text"]["metrics"]["kl_per_token"]["edited"] <= hi
    assert torch.equal(w, original + 0.3)
    model.load_tensors({name: original})
    assert "lambada_text" in C.format_table(rep) and "KL(base || edited)" in C.format_table(rep)


# ---------------------------------------------------------------------------------------------
# Documents and names


def test_resolve_sets_and_names():
    assert C.resolve("paper") == ["mmlu", "nq", "sst2", "gsm8k"]
    assert C.resolve("sst2, small,sst2")[:2] == ["sst2", "arc_easy"] and len(C.resolve("all")) == len(C.TASKS)
    with pytest.raises(C.CapabilityError, match="unknown task 'wmt16'.*known tasks: mmlu"):
        C.resolve("mmlu,wmt16")
    assert C.resolve("lambada:40,harm,lambada")[0] == "lambada:40"  # a task's first mention counts
    for bad in ("piqa:0", "piqa:ten", "piqa:-3"):
        with pytest.raises(C.CapabilityError, match="after the colon give how many documents"):
            C.resolve(bad)


def test_harm_preset_reads_no_boolq_and_its_text_is_not_its_lambada_documents():
    """BoolQ's passages are reserved for the rival editors' covariance statistics; the held-out
    text must be passages the lambada task does not score."""
    names = [C.split_entry(e)[0] for e in C.SETS["harm"]]
    assert "boolq" not in names and all(n in C.TASKS or n in C.TEXTS for n in names)
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert", ROOT / "data" / "capability" / "convert.py")
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    text = C.TEXTS["lambada_text"]
    lambada = dict(C.split_entry(e) for e in C.SETS["harm"])["lambada"]
    assert text.source == "lambada" and lambada + text.last <= convert.SOURCES["lambada"][2]


def test_half_width_formula_and_the_flip_share_it_allows():
    """half_width is 1.96 * sqrt(sum_k var_k / n_k) / K; with every task flipping the share
    flips_for allows (as many up as down), it is the target exactly; it agrees with the paired
    bootstrap of the mean."""
    sizes = [400, 1000, 2000]
    f = C.flips_for(sizes, 0.015)
    diffs = []
    for n in sizes:
        k = round(f * n / 2)
        diffs.append(np.array([1.0] * k + [-1.0] * k + [0.0] * (n - 2 * k)))
    assert C.half_width(diffs) == pytest.approx(0.015, rel=0.02)
    rng = np.random.default_rng(0)
    draws = np.mean([C.paired_change(np.zeros(len(d)), d, rng)[1] for d in diffs], axis=0)
    lo, hi = C.interval(draws)
    assert (hi - lo) / 2 == pytest.approx(C.half_width(diffs), rel=0.05)


def test_limit_is_per_mmlu_subject_and_missing_files_say_how_to_make_them(tmp_path):
    (tmp_path / "mmlu.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS["mmlu"]))
    assert [d["question"] for d in C.load_docs("mmlu", 1, tmp_path)] == [DOCS["mmlu"][0]["question"],
                                                                        DOCS["mmlu"][2]["question"]]
    with pytest.raises(C.CapabilityError, match="sst2.jsonl: missing; make the capability data with: make capability"):
        C.load_docs("sst2", None, tmp_path)
    with pytest.raises(C.CapabilityError, match="--limit must be at least 1"):
        C.load_docs("mmlu", 0, tmp_path)


@pytest.mark.parametrize("flags, message", [
    (["--capability", "mmlu,wmt16"], "unknown task 'wmt16'"),
    (["--capability", "sst2", "--limit", "0"], "--limit must be at least 1"),
    (["--capability", "sst2"], "sst2.jsonl: missing; make the capability data with: make capability"),
    (["--limit", "5", "--edits", str(ROOT / "data" / "demo_edits.json")], "--limit needs --capability"),
    ([], "give --edits, --capability or both"),
])
def test_evaluate_cli_bad_capability_input(tiny, tmp_path, flags, message):
    ckpt = tiny[0]
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--ckpt", str(ckpt), "--out", str(out),
                        "--capability-data", str(tmp_path / "none"), *flags], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0], r.stderr
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--capability", "small"], "--capability and --limit act with --eval only"),
    (["--eval", "--capability", "nq,wmt16"], "unknown task 'wmt16'"),
    (["--eval", "--capability", "sst2", "--limit", "0"], "--limit must be at least 1"),
])
def test_edit_cli_bad_capability_input(tiny, tmp_path, flags, message):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "edit.py"), "--ckpt", str(tiny[0]), "--edits",
                        str(ROOT / "data" / "demo_edits.json"), "--out", str(out), *flags],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0], r.stderr
    assert not out.exists()
