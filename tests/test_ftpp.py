"""FT++ regularisers (ftpp.py) on a tiny random model, and the relation token on a real tokenizer."""
import copy

import pytest
import torch

import data
import edit
import ftpp
import model as M
from tiny import make_checkpoint

EDITS = [
    data.Edit(prompt="w5 w17 w99", target="w42 w43", subject="w17", old_answer="w7"),
    data.Edit(prompt="w6 w18", target="w44", subject="w6", old_answer="w8 w9"),
    data.Edit(prompt="w10 w11 w12 w13", target="w45 w46 w47", subject="w12", old_answer=None),  # no old answer
    data.Edit(prompt="w20 w21 w22", target="w48", subject="w20", old_answer="w30"),
]
LAYER = 1
DOWN = f"model.layers.{LAYER}.mlp.down_proj.weight"
# the position whose logits predict r_l, the prompt's last word after the subject:
# "w5 w17 [w99]", "w6 [w18]", "w10 w11 w12 [w13]", "w20 w21 [w22]"
PREDICTS_R_L = [1, 0, 2, 1]
GENERAL = ["w100 w101 w102 w103 w104 w105 w106", "w110 w111 w112", "w120 w121 w122 w123 w124 w125 w126 w127 w128"]


def setup(tmp_path, edits=EDITS, **weights):
    make_checkpoint(tmp_path, "qwen2")
    model, tok = M.load(tmp_path)
    (tmp_path / "general.txt").write_text("\n".join(GENERAL))
    hp = edit.Hparams(layer=LAYER, general_text=str(tmp_path / "general.txt"), **weights)
    pairs = [(e.prompt, e.target) for e in edits]
    encoded = [data.encode_edit(tok, p, t) for p, t in pairs]
    cache = data.PrefixCache(model, encoded, tok.pad_id, LAYER)
    reg = ftpp.FTPP(model, tok, pairs, [e.subject for e in edits], [e.old_answer for e in edits], encoded, cache, hp)
    return model, tok, reg, cache, hp


def test_kl_terms_are_zero_before_the_first_step(tmp_path):
    model, _, reg, cache, _ = setup(tmp_path, general_kl=1.0, local_kl=1.0)
    idx = list(range(len(EDITS)))
    h, batch = cache.batch(idx, packed=False)
    reg.loss(model, idx, h, batch)
    parts = reg.epoch_parts()
    assert abs(parts["general_kl"]) < 1e-6 and abs(parts["local_kl"]) < 1e-6


def independent_kl(edited_logits, base_logits):
    """Mean over positions of sum_v p_e(v) * (log p_e(v) - log p_b(v)), from full forward passes."""
    p_e, p_b = edited_logits.float().softmax(-1), base_logits.float().softmax(-1)
    return (p_e * (p_e.log() - p_b.log())).sum(-1).mean()


def test_kl_terms_grow_once_the_tensor_moves_and_gradients_reach_only_it(tmp_path, one_thread):
    """Each KL term, alone and weighted, adds its own value to the loss and its own gradient to
    the tensor: both match KL(p_edited || p_base) computed from full forward passes of the moved
    model and of an untouched copy of the base, so a term that is detached (or mis-weighted, or
    compared at the wrong positions) fails here, not just one whose value stays 0."""
    model, _, reg, cache, hp = setup(tmp_path, general_kl=1.0, local_kl=1.0)
    base = copy.deepcopy(model)
    idx = [0, 1, 2, 3]
    seqs = {"general_kl": [ids for ids, _ in reg.general_cache.encoded],
            "local_kl": [ids for ids, _ in cache.encoded]}
    with edit.trainable_copies(model, [DOWN]) as params:
        p = params[DOWN]
        with torch.no_grad():
            p.add_(torch.randn_like(p) * 0.5)
        h, batch = cache.batch(idx, packed=False)
        reg.hp = edit.Hparams(layer=LAYER, general_text=hp.general_text)  # every weight 0: CE alone
        ce = reg.loss(model, idx, h, batch)
        ce_grad, = torch.autograd.grad(ce, p)
        for term, weight in (("general_kl", 0.7), ("local_kl", 1.3)):
            edited, base_logits = [], []
            for i in idx:
                ids = torch.tensor([seqs[term][i]])
                at = slice(0, ids.shape[1] - 1) if term == "general_kl" else slice(PREDICTS_R_L[i], PREDICTS_R_L[i] + 1)
                edited.append(model(ids)[0, at])  # every next-token prediction / the one predicting r_l
                with torch.no_grad():
                    base_logits.append(base(ids)[0, at])
            kl = independent_kl(torch.cat(edited), torch.cat(base_logits))
            kl_grad, = torch.autograd.grad(kl, p)
            reg.hp = edit.Hparams(layer=LAYER, general_text=hp.general_text, **{term: weight})
            p.grad = None
            loss = reg.loss(model, idx, h, batch)
            assert reg.epoch_parts()[term] > 1e-4
            torch.testing.assert_close(loss - ce, weight * kl.detach(), rtol=1e-4, atol=1e-5)
            loss.backward()
            torch.testing.assert_close(p.grad - ce_grad, weight * kl_grad, rtol=1e-3,
                                       atol=1e-4 * float(kl_grad.abs().max()))
        trained = {n for n, q in model.named_parameters() if q.requires_grad}
        assert trained == {DOWN}
        assert all(q.grad is None for n, q in model.named_parameters() if n not in trained)


def test_smoothing_alpha_0_and_1_reduce_to_plain_ce_on_new_and_old_answer(tmp_path):
    with_old = [e for e in EDITS if e.old_answer is not None]
    idx = list(range(len(with_old)))
    for alpha, answer in ((0.0, "target"), (1.0, "old_answer")):
        model, tok, reg, cache, hp = setup(tmp_path / str(alpha), edits=with_old, smooth_alpha=alpha)
        h, batch = cache.batch(idx, packed=False)
        got = reg.loss(model, idx, h, batch)
        plain = [data.encode_edit(tok, e.prompt, getattr(e, answer)) for e in with_old]
        plain_cache = data.PrefixCache(model, plain, tok.pad_id, LAYER)
        torch.testing.assert_close(got, edit.batch_loss(model, plain_cache, idx, edit.Hparams(layer=LAYER)),
                                   rtol=1e-6, atol=0)


def test_edits_without_old_answer_are_trained_plainly_and_counted(tmp_path):
    model, tok, reg, cache, hp = setup(tmp_path, smooth_alpha=0.5)
    assert reg.stats["edits_without_old_answer"] == 1
    idx = [2]  # the edit without an old answer: smoothing must not touch it
    h, batch = cache.batch(idx, packed=False)
    got = reg.loss(model, idx, h, batch)
    torch.testing.assert_close(got, edit.batch_loss(model, cache, idx, edit.Hparams(layer=LAYER)), rtol=1e-6, atol=0)


def test_zero_weights_give_the_plain_locft_loss(tmp_path):
    """Through FTPP.loss with every weight 0 the loss is plain LocFT-BF's, and edit() with all
    weights 0 never builds an FTPP (so its loss is the packed path's, bit for bit)."""
    model, tok, reg, cache, _ = setup(tmp_path)
    idx = [3, 0, 2]
    h, batch = cache.batch(idx, packed=False)
    torch.testing.assert_close(reg.loss(model, idx, h, batch),
                               edit.batch_loss(model, cache, idx, edit.Hparams(layer=LAYER)), rtol=1e-6, atol=0)
    assert not ftpp.active(edit.Hparams())
    _, log = edit.edit(model, tok, EDITS, edit.Hparams(layer=LAYER, epochs=1), say=lambda s: None)
    assert "ftpp" not in log


def test_general_sentences_match_the_edit_lengths(tmp_path):
    make_checkpoint(tmp_path, "llama")
    _, tok = M.load(tmp_path)
    seqs = ftpp.length_matched_sentences(tok, GENERAL, [4, 7, 30], seed=0)
    assert [len(s) for s in seqs][:2] == [4, 7]
    assert len(seqs[2]) == max(len(tok.encode(s)) for s in GENERAL)  # none long enough: the longest


def test_ftpp_options_through_edit_train_and_log(tmp_path, one_thread):
    """The options reach training: with both KL weights on, the trained tensor ends closer to the
    base model (KL to the base, measured by full forward passes on the general sentences and at
    the relation positions) than a run with the same smoothing and the KL weights at 0, and
    the log reports the terms and the counts."""
    make_checkpoint(tmp_path, "qwen2")
    model, tok = M.load(tmp_path)
    (tmp_path / "general.txt").write_text("\n".join(GENERAL))
    common = dict(layer=LAYER, epochs=3, lr=1e-3, batch_size=2, smooth_alpha=0.2, general_text=str(tmp_path / "general.txt"))
    trained, log = edit.edit(model, tok, EDITS, edit.Hparams(**common, general_kl=20.0, local_kl=20.0), say=lambda s: None)
    smoothed_only, _ = edit.edit(model, tok, EDITS, edit.Hparams(**common), say=lambda s: None)
    assert not torch.equal(trained[DOWN], dict(model.named_parameters())[DOWN].float())
    assert log["ftpp"]["edits_without_old_answer"] == 1 and log["ftpp"]["local_kl_fallback_to_last_token"] == 0
    assert {"edit", "general_kl", "local_kl"} <= set(log["epochs"][-1])

    general = [torch.tensor([tok.encode(s)]) for s in GENERAL]
    prompts = [(torch.tensor([data.encode_edit(tok, e.prompt, e.target)[0]]), at) for e, at in zip(EDITS, PREDICTS_R_L)]

    @torch.no_grad()
    def kl_to_base(tensors):
        edited = copy.deepcopy(model)
        edited.load_tensors(tensors)
        g = independent_kl(torch.cat([edited(ids)[0, :-1] for ids in general]),
                           torch.cat([model(ids)[0, :-1] for ids in general]))
        l = independent_kl(torch.cat([edited(ids)[0, at:at + 1] for ids, at in prompts]),
                           torch.cat([model(ids)[0, at:at + 1] for ids, at in prompts]))
        return g, l

    (g_kl, l_kl), (g_plain, l_plain) = kl_to_base(trained), kl_to_base(smoothed_only)
    assert g_kl < 0.97 * g_plain and l_kl < 0.97 * l_plain  # 16% and 7% lower here; 0 if KL were detached


# -- the relation token r_l on a real tokenizer ----------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return M.load(smollm2_dir)


@pytest.mark.parametrize("prompt, subject, r_l", [
    ("Which river system contains Charity Creek?", "Charity Creek", " contains"),  # ZsRE: subject last
    ("What is the date of birth of Paul Lafargue?", "Paul Lafargue", " of"),
    ("Reedy Glacier is in", "Reedy Glacier", " in"),  # CounterFact: subject first
    ("Danielle Darrieux's mother tongue is", "Danielle Darrieux", " is"),
    ("The weather was mild that day. Which river system contains Charity Creek?", "Charity Creek", " contains"),
])
def test_relation_last_token(smollm2, prompt, subject, r_l):
    _, tok = smollm2
    i = ftpp.relation_last_token(tok, prompt, subject)
    assert tok.decode([tok.encode(prompt)[i]]) == r_l


def test_local_kl_on_a_zsre_prompt_predicts_the_relation_token_not_the_question_mark(smollm2):
    model, tok = smollm2
    edits = [data.Edit("Which river system contains Charity Creek?", "Chichester River", subject="Charity Creek"),
             data.Edit("What is the capital of Freedonia?", "Fredville", subject="Atlantis")]  # subject not there
    pairs = [(e.prompt, e.target) for e in edits]
    encoded = [data.encode_edit(tok, p, t) for p, t in pairs]
    hp = edit.Hparams(layer=20, local_kl=1.0)
    cache = data.PrefixCache(model, encoded, tok.pad_id, hp.layer)
    said = []
    reg = ftpp.FTPP(model, tok, pairs, [e.subject for e in edits], [None, None], encoded, cache, hp, say=said.append)
    ids = encoded[0][0]
    assert tok.decode([ids[reg.local_pos[0] + 1]]) == " contains"  # the position predicting r_l
    n_prompt = encoded[1][1]
    assert reg.local_pos[1] == n_prompt - 2 and tok.decode([encoded[1][0][n_prompt - 1]]) == "?"  # the fallback
    assert reg.stats["local_kl_fallback_to_last_token"] == 1 and "1 of 2 prompts" in said[0]


def test_general_text_is_fingerprinted_by_its_content(tmp_path):
    """--resume of an FT++ run survives a moved checkout: the general text counts by content."""
    import preflight

    a, b, c = tmp_path / "a.txt", tmp_path / "moved" / "a.txt", tmp_path / "c.txt"
    b.parent.mkdir()
    a.write_text("one sentence.\n")
    b.write_text("one sentence.\n")
    c.write_text("another sentence.\n")
    fp = {p: preflight.hparams_fingerprint(edit.Hparams(layer=LAYER, general_kl=1.0, general_text=str(p))) for p in (a, b, c)}
    assert fp[a] == fp[b] and fp[a] != fp[c]
