"""retain.py: the pool, its base continuations, the term in the loss, and the refusals."""
import json
import random

import pytest
import torch

import data
import edit
import generate
import model as M
import retain
from tiny import make_checkpoint

LAYER = 1
DOWN = f"model.layers.{LAYER}.mlp.down_proj.weight"


def words(rng, lo, hi, vocab):
    return " ".join(f"w{rng.randrange(*vocab)}" for _ in range(rng.randint(lo, hi)))


def records(n, seed, vocab=(100, 320)):
    """Edits with a subject, a rephrase and a locality prompt, as the data sets have them, in the
    words of `vocab` (w100 and up: no word is a part of another)."""
    rng = random.Random(seed)
    words_ = lambda lo, hi: words(rng, lo, hi, vocab)  # noqa: E731
    out = []
    for _ in range(n):
        subject = words_(1, 1)
        out.append(data.Edit(prompt=f"{words_(1, 3)} {subject}", target=words_(1, 2), subject=subject,
                             rephrases=[f"{words_(2, 3)} {subject}"], locality=[(words_(2, 4), words_(1, 1))]))
    return out


def write(path, edits):
    path.write_text("".join(json.dumps(e.to_json()) + "\n" for e in edits))
    return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    make_checkpoint(d, "llama")
    return d


def test_weight_0_gives_plain_locft_delta_bit_for_bit(tiny_llama, tmp_path, one_thread):
    model, tok = M.load(tiny_llama)
    edits = records(6, seed=0)
    pool_file = write(tmp_path / "others.jsonl", records(12, seed=1))
    hp = edit.Hparams(layer=LAYER, epochs=4, batch_size=2)
    plain, _ = edit.edit(model, tok, edits, hp, say=lambda s: None)
    kept, log = edit.edit(model, tok, edits, edit.Hparams(**{**vars(hp), "retain": True, "retain_weight": 0.0,
                                                             "retain_from": str(pool_file)}), say=lambda s: None)
    assert torch.equal(plain[DOWN], kept[DOWN])
    assert log["retain"]["pool"] == 6 and log["epochs"][-1]["retain_kl"] > 0  # built and measured, weighed 0
    weighed, _ = edit.edit(model, tok, edits, edit.Hparams(**{**vars(hp), "retain": True, "retain_from": str(pool_file)}),
                           say=lambda s: None)
    assert not torch.equal(plain[DOWN], weighed[DOWN])  # with a weight it does change the training


def test_base_continuations_equal_greedy_reference(tiny):
    _, model, tok = tiny
    prompts = [f"w{5 + i} w{40 + 3 * i}" + " w7" * (i % 3) for i in range(9)]
    hp = edit.Hparams(layer=LAYER, retain=True, retain_tokens=5)
    keep = retain.Retain(model, tok, prompts, 3, hp)
    assert keep.continuations == generate.greedy_reference(model, tok, prompts, 5)
    assert len({tuple(c) for c in keep.continuations}) > 1  # the prompts do get different answers


def test_retain_term_is_0_on_the_base_and_keeps_pool_answers_closer(tiny, tmp_path):
    _, model, tok = tiny  # weights scaled up: distributions far from uniform, so an edit moves them
    edits = records(6, seed=0)
    pool_file = write(tmp_path / "others.jsonl", records(12, seed=1))
    hp = edit.Hparams(layer=LAYER, epochs=10, lr=1e-2, batch_size=2, retain=True, retain_from=str(pool_file),
                      retain_pool=12)
    keep = retain.Retain(model, tok, retain.pool(edits, hp, say=lambda s: None), len(edits), hp)
    torch.testing.assert_close(keep.loss(model, list(range(6))), torch.zeros(()), atol=1e-6, rtol=0)

    def pool_kl(trained):  # the retain KL of the whole pool under the trained tensor (weight 1)
        with edit.trainable_copies(model, [DOWN]) as params, torch.no_grad():
            params[DOWN].copy_(trained[DOWN])
            return keep.loss(model, list(range(6))).item()

    plain, _ = edit.edit(model, tok, edits, edit.Hparams(**{**vars(hp), "retain": False}), say=lambda s: None)
    kept, _ = edit.edit(model, tok, edits, hp, say=lambda s: None)
    assert pool_kl(kept) < 0.7 * pool_kl(plain)  # measured: 0.11 against 0.21


def test_pool_from_records_drops_evaluated_prompts_and_edited_subjects(tmp_path):
    edits = records(4, seed=0, vocab=(100, 200))
    others = records(5, seed=1, vocab=(200, 320))  # other words: nothing in common by chance
    others[0].locality = [(edits[1].locality[0][0], "w3")]  # an evaluated prompt, in another record
    others[1].prompt = f"w3 w4 {edits[2].subject}"  # names an edited subject
    others[2].prompt = "  " + "   ".join(edits[3].rephrases[0].upper().split())  # evaluated, up to case and spaces
    f = write(tmp_path / "others.jsonl", edits + others)  # the edit file itself: the edited records drop out
    said = []
    prompts = retain.pool(edits, edit.Hparams(retain=True, retain_from=str(f), retain_pool=100), say=said.append)
    asked = retain.evaluated(edits)
    assert prompts and not any(retain.key(p) in asked for p in prompts)
    assert not any(e.subject in p for e in edits for p in prompts)
    assert len(prompts) == 2 * 5 - 3  # each other record's prompt and locality prompt, less the three
    assert "dropped" in said[0]


def test_related_pool_gives_each_edit_prompts_of_its_relation_first(tmp_path):
    edits = records(3, seed=0, vocab=(100, 200))
    for e, rel in zip(edits, ("w900 is in", "w901 works for", "w900 is in")):
        e.prompt = f"{e.subject} {rel}"
    others = records(40, seed=1, vocab=(200, 320))
    for i, r in enumerate(others):  # relations of the edits for 2 of every 10 records, others' for the rest
        r.prompt = f"{r.subject} " + ("w900 is in" if i % 10 == 0 else "w901 works for" if i % 10 == 1 else f"w{950 + i}")
    f = write(tmp_path / "others.jsonl", others)
    hp = edit.Hparams(retain=True, retain_from=str(f), retain_pool=5)
    plain = retain.pool(edits, hp, say=lambda s: None)
    related = retain.pool(edits, edit.Hparams(**{**vars(hp), "retain_related": True}), say=lambda s: None)
    relation = {p: retain.relation(r) for r in others for p in [r.prompt, *(q for q, _ in r.locality)]}
    rels = [relation[p] for p in related]
    assert rels[:3] == ["{} w900 is in", "{} w901 works for", "{} w900 is in"]  # one per edit, in turn
    assert rels.count("{} w901 works for") == 2 and rels.count("{} w900 is in") == 3  # then again, to the size
    assert sum(relation[p] in rels[:2] for p in plain) < 5 and len(set(related)) == 5


def test_pool_file_with_an_evaluated_prompt_is_refused_naming_it(tiny_llama, tmp_path, capsys):
    edits = records(4, seed=0)
    f = write(tmp_path / "edits.jsonl", edits)
    pool = tmp_path / "pool.txt"
    pool.write_text(f"w9 w10\n# a comment\n{edits[2].locality[0][0]}\nw11 w12\n")
    out = tmp_path / "out"
    rc = edit.main(["--ckpt", str(tiny_llama), "--edits", str(f), "--layer", str(LAYER), "--out", str(out),
                    "--retain", "--retain-file", str(pool)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert repr(edits[2].locality[0][0]) in err[0] and "edit 2's locality prompt" in err[0] and "--retain-file" in err[0]
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_retain_flags_need_retain_and_records_to_draw_from(tiny_llama, tmp_path, capsys):
    f = write(tmp_path / "edits.jsonl", records(4, seed=0))
    base = ["--ckpt", str(tiny_llama), "--edits", str(f), "--layer", str(LAYER), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        edit.main(base + ["--retain-weight", "2"])
    assert e.value.code == 2 and "--retain-weight acts with --retain only" in capsys.readouterr().err
    assert edit.main(base + ["--retain"]) == 2  # every record of the edit file is being edited
    err = capsys.readouterr().err
    assert "no prompt left" in err and "--retain-from" in err
