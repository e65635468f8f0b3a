"""Edit files of every supported layout, their error messages, subsets, tokenising, augmentation."""
import json
from pathlib import Path

import pytest

import data
import edit
from data import Edit, EditFileError, augment_prefixes, collate, encode_edit, load_edits
from tiny import make_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    make_checkpoint(d, "llama")
    return d


def write(tmp_path, records, name="edits.json"):
    p = tmp_path / name
    if name.endswith(".jsonl"):
        p.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        p.write_text(json.dumps(records))
    return p


LOCFT_ZSRE = {"subject": "Charity Creek", "src": "Which river system contains Charity Creek?",
              "pred": "Parramatta River", "rephrase": "What river system is Charity Creek in?",
              "alt": "Chichester River", "answers": ["Parramatta River"],
              "loc": "nq question: how many series of diary of a wimpy kid are there", "loc_ans": "12",
              "cond": "Parramatta River >> Chichester River || Which river system contains Charity Creek?"}
COUNTERFACT = {"case_id": 1884, "prompt": "Reedy Glacier is in", "target_new": "Asia", "subject": "Reedy Glacier",
               "ground_truth": "Antarctica", "rephrase_prompt": "Some noise. Reedy Glacier is located in the continent",
               "locality_prompt": "Mount Erebus, in", "locality_ground_truth": "Antarctica"}
WIKIBIGEDIT = {"prompt": "In which county is Crailing Parish Church located?", "target_new": "Roxburghshire",
               "subject": "Crailing Parish Church", "rephrase_prompt": "Where is Crailing Parish Church?",
               "locality_prompt": "In which county is Carriden Parish Church located?",
               "locality_ground_truth": "West Lothian"}
# EasyEdit's zsre_mend_eval.json has the LocFT keys (above); its KnowEdit ZsRE file uses these:
KNOWEDIT_ZSRE = {"subject": "Epaspidoceras", "target_new": "Aves", "prompt": "Which family does Epaspidoceras belong to?",
                 "ground_truth": ["Aspidoceratidae"], "rephrase_prompt": "What family are Epaspidoceras?",
                 "portability": {"Reasoning": [{"prompt": "x", "ground_truth": [["y"]]}]},
                 "locality": {"Relation_Specificity": [
                     {"prompt": "The taxon rank of Epaspidoceras is", "ground_truth": [["genus"]]}]}}
ROME_CF = {"case_id": 0, "pararel_idx": 2796,
           "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                                 "target_new": {"str": "English", "id": "Q1860"},
                                 "target_true": {"str": "French", "id": "Q150"}, "subject": "Danielle Darrieux"},
           "paraphrase_prompts": ["Shayna does this. Danielle Darrieux speaks", "Danielle Darrieux, a native"],
           "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Michel Rocard is a native speaker of"],
           "generation_prompts": ["Danielle Darrieux's mother tongue is"]}
PROJECT = {"prompt": "The Eiffel Tower is located in the city of", "target": "Rome", "subject": "Eiffel Tower",
           "rephrases": ["The city where the Eiffel Tower stands is"],
           "locality": [["The capital of Japan is", "Tokyo"]], "old_answer": "Paris"}


@pytest.mark.parametrize("record, expected", [
    (LOCFT_ZSRE, Edit("Which river system contains Charity Creek?", "Chichester River", "Charity Creek",
                      ["What river system is Charity Creek in?"],
                      [("nq question: how many series of diary of a wimpy kid are there", "12")], "Parramatta River")),
    (COUNTERFACT, Edit("Reedy Glacier is in", "Asia", "Reedy Glacier",
                       ["Some noise. Reedy Glacier is located in the continent"],
                       [("Mount Erebus, in", "Antarctica")], "Antarctica")),
    (WIKIBIGEDIT, Edit("In which county is Crailing Parish Church located?", "Roxburghshire", "Crailing Parish Church",
                       ["Where is Crailing Parish Church?"],
                       [("In which county is Carriden Parish Church located?", "West Lothian")], None)),
    (KNOWEDIT_ZSRE, Edit("Which family does Epaspidoceras belong to?", "Aves", "Epaspidoceras",
                         ["What family are Epaspidoceras?"], [("The taxon rank of Epaspidoceras is", "genus")],
                         "Aspidoceratidae")),
    (ROME_CF, Edit("The mother tongue of Danielle Darrieux is", "English", "Danielle Darrieux",
                   ["Shayna does this. Danielle Darrieux speaks", "Danielle Darrieux, a native"],
                   [("The mother tongue of Léon Blum is", "French"), ("Michel Rocard is a native speaker of", "French")],
                   "French")),
    (PROJECT, Edit("The Eiffel Tower is located in the city of", "Rome", "Eiffel Tower",
                   ["The city where the Eiffel Tower stands is"], [("The capital of Japan is", "Tokyo")], "Paris")),
], ids=["locft-zsre", "counterfact", "wikibigedit", "knowedit-zsre", "rome-counterfact", "project"])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_every_layout_loads(tmp_path, record, expected, suffix):
    edits = load_edits(write(tmp_path, [record, record], "edits" + suffix))
    assert edits == [expected, expected]


def test_numeric_locality_answer_becomes_text(tmp_path):
    [e] = load_edits(write(tmp_path, [{**LOCFT_ZSRE, "loc_ans": 12}]))
    assert e.locality[0][1] == "12"


def test_wrapped_list_is_accepted(tmp_path):
    p = tmp_path / "w.json"
    p.write_text(json.dumps({"data": [PROJECT]}))
    assert load_edits(p)[0].target == "Rome"


def test_demo_edits_load():
    edits = load_edits(ROOT / "data" / "demo_edits.json")
    assert 25 <= len(edits) <= 40
    for e in edits:
        assert e.rephrases and e.locality and e.old_answer and e.subject
        assert 1 <= len(e.target.split()) <= 3
        assert e.target != e.old_answer
    assert len({e.prompt for e in edits}) == len(edits)


@pytest.mark.parametrize("name, layout, prompt_key, target_key", [
    ("zsre", "LocFT / EasyEdit ZsRE", "src", "alt"),
    ("counterfact", "CounterFact / WikiBigEdit / KnowEdit (prompt, target_new)", "prompt", "target_new"),
    ("wikibigedit", "CounterFact / WikiBigEdit / KnowEdit (prompt, target_new)", "prompt", "target_new"),
], ids=["zsre", "counterfact", "wikibigedit"])
def test_shared_data_sets_load(name, layout, prompt_key, target_key):
    """The benchmarks' three edit sets, from the few records of each committed in tests/data/
    (see its README for their source and licence); where the full 2,000-record sets are present
    (../shared/data, outside the project), the samples must be their first records and every
    record of the full sets must load."""
    path = ROOT / "tests" / "data" / f"{name}_sample.json"
    records = json.loads(path.read_text(encoding="utf-8"))
    assert data.detect_format(path, records[0])[0] == layout
    edits = load_edits(path)
    assert len(edits) == len(records) == 5
    assert [e.prompt for e in edits] == [r[prompt_key] for r in records]
    assert [e.target for e in edits] == [r[target_key] for r in records]
    assert all(e.subject and e.subject in e.prompt and e.rephrases and e.locality for e in edits)
    full = SHARED / f"{name}_2k.json"
    if full.exists():
        full_records = json.loads(full.read_text(encoding="utf-8"))
        assert full_records[:len(records)] == records
        assert len(load_edits(full)) == 2000


def test_unknown_layout_lists_known_formats_and_keys_seen(tmp_path):
    with pytest.raises(EditFileError) as err:
        load_edits(write(tmp_path, [{"question": "q", "answer": "a"}]))
    msg = str(err.value)
    assert "unknown layout" in msg and "answer, question" in msg
    for name, keys, _ in data.FORMATS:
        assert name in msg
    assert "target_new" in msg and "requested_rewrite" in msg


@pytest.mark.parametrize("records, words", [
    ([LOCFT_ZSRE, LOCFT_ZSRE, {**LOCFT_ZSRE, "alt": ""}], ["record 2", "'alt'", "empty"]),
    ([LOCFT_ZSRE, {k: v for k, v in LOCFT_ZSRE.items() if k != "src"}], ["record 1", "'src'", "missing"]),
    ([COUNTERFACT, {**COUNTERFACT, "target_new": {"str": "Asia"}}], ["record 1", "'target_new'", "text"]),
    ([COUNTERFACT, {**COUNTERFACT, "rephrase_prompt": 7}], ["record 1", "'rephrase_prompt'"]),
    ([PROJECT, PROJECT, PROJECT, {**PROJECT, "locality": ["just a prompt"]}], ["record 3", "'locality'"]),
    ([PROJECT, "a string"], ["record 1", "expected an object"]),
    ([ROME_CF, {**ROME_CF, "requested_rewrite": {**ROME_CF["requested_rewrite"], "prompt": "no slot"}}],
     ["record 1", "requested_rewrite.prompt"]),
    ([ROME_CF, {k: v for k, v in ROME_CF.items() if k != "requested_rewrite"}], ["record 1", "'requested_rewrite'"]),
])
def test_bad_record_names_file_index_and_field(tmp_path, records, words):
    path = write(tmp_path, records)
    with pytest.raises(EditFileError) as err:
        load_edits(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("content, words", [
    ("", ["not valid JSON"]), ("[]", ["no records"]), ('{"a": 1}', ["expected a list"]), ("[1, 2]", ["record 0"]),
])
def test_bad_files_give_one_line(tmp_path, tiny_ckpt, capsys, content, words):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(EditFileError) as err:
        load_edits(p)
    assert str(p) in str(err.value) and "\n" not in str(err.value)
    assert all(w in str(err.value) for w in words)
    # through the command line: exit status 2, one line on stderr naming the file, nothing written
    rc = edit.main(["--ckpt", str(tiny_ckpt), "--edits", str(p), "--layer", "1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"edit.py: error: edits file {p}") and all(w in err for w in words), err
    assert [x.name for x in tmp_path.iterdir()] == ["bad.json"] and p.read_text() == content


def test_missing_file_and_bad_jsonl_line(tmp_path):
    with pytest.raises(EditFileError, match="does not exist"):
        load_edits(tmp_path / "nope.json")
    p = tmp_path / "e.jsonl"
    p.write_text(json.dumps(PROJECT) + "\n{oops\n")
    with pytest.raises(EditFileError, match="line 2"):
        load_edits(p)


def test_subset_is_reproducible(tmp_path):
    records = [{**PROJECT, "prompt": f"prompt {i}"} for i in range(50)]
    path = write(tmp_path, records)
    first = load_edits(path, n=10)
    assert [e.prompt for e in first] == [f"prompt {i}" for i in range(10)]
    a, b = load_edits(path, n=10, seed=3), load_edits(path, n=10, seed=3)
    assert a == b and len(a) == 10 and a != first
    assert load_edits(path, n=10, seed=4) != a
    idx = [int(e.prompt.split()[1]) for e in a]
    assert idx == sorted(idx)  # file order is kept
    assert len(load_edits(path, n=500, seed=1)) == 50
    with pytest.raises(EditFileError, match="--n"):
        load_edits(path, n=0)


def test_subset_checks_only_the_records_it_keeps(tmp_path):
    path = write(tmp_path, [PROJECT, PROJECT, {**PROJECT, "target": ""}])
    assert len(load_edits(path, n=2)) == 2
    with pytest.raises(EditFileError, match="record 2"):
        load_edits(path)


# ---------------------------------------------------------------------------------------------
# Tokenising


class CharTok:
    """One id per character (+3); EOS 2 doubles as pad, as in many real checkpoints."""
    eos_id = 2
    pad_id = 2

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [ord(c) + 3 for c in text]


def test_eos_is_trained_when_pad_equals_eos():
    tok = CharTok()
    enc = [encode_edit(tok, "ab", "c"), encode_edit(tok, "abcd", "efg")]
    batch = collate(enc, tok.pad_id)
    # row 0 is padded with the EOS id, yet its own EOS is a target and its padding is not
    assert batch.ids[0].tolist() == [1, ord("a") + 3, ord("b") + 3, ord(" ") + 3, ord("c") + 3, 2, 2, 2, 2, 2]
    assert batch.target_mask[0].tolist() == [False, False, False, True, True, True, False, False, False, False]
    assert batch.labels.tolist().count(2) == 2  # both EOS tokens are labels


def test_labels_align_with_predict_mask_and_padding_is_on_the_right():
    tok = CharTok()
    enc = [encode_edit(tok, "hello", "x"), encode_edit(tok, "hi", "yz")]
    batch = collate(enc, tok.pad_id)
    assert batch.attention_mask[1].tolist() == [1] * len(enc[1][0]) + [0] * (len(enc[0][0]) - len(enc[1][0]))
    for b in range(2):
        # the logit at position t predicts the token at t + 1
        pred_pos = batch.predict_mask[b].nonzero().flatten()
        assert batch.target_mask[b, pred_pos + 1].all()
        assert batch.ids[b, pred_pos + 1].tolist() == enc[b][0][enc[b][1]:]
    assert batch.labels.tolist() == enc[0][0][enc[0][1]:] + enc[1][0][enc[1][1]:]


def test_prefix_augmentation_is_reproducible():
    edits = [Edit("The capital of X is", "Y"), Edit("Z was born in", "W")]
    pairs = augment_prefixes(edits, 5, seed=0)
    assert len(pairs) == 12
    assert pairs[0] == ("The capital of X is", "Y") and pairs[6] == ("Z was born in", "W")
    prefixed = pairs[1:6]
    assert all(p.endswith(" The capital of X is") and t == "Y" for p, t in prefixed)
    assert len({p for p, _ in prefixed}) == 5  # distinct prefixes per edit
    assert all(p[: -len(" The capital of X is")] in data.PREFIXES for p, _ in prefixed)
    assert augment_prefixes(edits, 5, seed=0) == pairs
    assert augment_prefixes(edits, 5, seed=1) != pairs
    assert augment_prefixes(edits, 0, seed=0) == [("The capital of X is", "Y"), ("Z was born in", "W")]
    assert len(data.PREFIXES) >= 40 and len(set(data.PREFIXES)) == len(data.PREFIXES)
