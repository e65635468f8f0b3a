"""FT++ regularisers (ftpp.py): what the FT++ issue asks to prove, on a tiny random model."""
import torch

import data
import edit
import ftpp
import model as M
from tiny import make_checkpoint

EDITS = [
    data.Edit(prompt="w5 w17 w99", target="w42 w43", old_answer="w7"),
    data.Edit(prompt="w6 w18", target="w44", old_answer="w8 w9"),
    data.Edit(prompt="w10 w11 w12 w13", target="w45 w46 w47", old_answer=None),  # no old answer
    data.Edit(prompt="w20 w21 w22", target="w48", old_answer="w30"),
]
LAYER = 1


def setup(tmp_path, cfg: ftpp.FTPPConfig, edits=EDITS, general_lines=None):
    make_checkpoint(tmp_path, "qwen2")
    model, tok = M.load(tmp_path, dtype="float32")
    if general_lines is not None:
        (tmp_path / "general.txt").write_text("\n".join(general_lines))
        cfg.general_text = str(tmp_path / "general.txt")
    pairs = [(e.prompt, e.target) for e in edits]
    encoded = [data.encode_edit(tok, p, t) for p, t in pairs]

    def prefix_cache(enc):
        return edit.build_prefix_cache(model, enc, tok.pad_id, LAYER)

    reg = ftpp.FTPP(model, tok, pairs, [e.old_answer for e in edits], encoded, LAYER, cfg, prefix_cache)
    return model, tok, reg, prefix_cache(encoded), encoded


GENERAL = ["w100 w101 w102 w103 w104 w105 w106", "w110 w111 w112", "w120 w121 w122 w123 w124 w125 w126 w127 w128"]


def train_down_proj(model):
    name = f"model.layers.{LAYER}.mlp.down_proj.weight"
    p = torch.nn.Parameter(dict(model.named_parameters())[name].detach().clone())
    edit._set_param(model, name, p)
    return p


def test_kl_terms_are_zero_before_the_first_step(tmp_path):
    model, _, reg, cache, _ = setup(tmp_path, ftpp.FTPPConfig(general_kl=1.0, local_kl=1.0), general_lines=GENERAL)
    idx = list(range(len(EDITS)))
    h, batch = cache.batch(idx, "cpu", packed=False)
    _, parts = reg.loss(model, idx, h, batch)
    assert abs(parts["general_kl"].item()) < 1e-6
    assert abs(parts["local_kl"].item()) < 1e-6


def test_kl_terms_grow_once_the_tensor_moves_and_gradients_reach_only_it(tmp_path):
    model, _, reg, cache, _ = setup(tmp_path, ftpp.FTPPConfig(general_kl=1.0, local_kl=1.0), general_lines=GENERAL)
    p = train_down_proj(model)
    with torch.no_grad():
        p.add_(torch.randn_like(p) * 0.5)
    idx = [0, 1, 2, 3]
    h, batch = cache.batch(idx, "cpu", packed=False)
    loss, parts = reg.loss(model, idx, h, batch)
    assert parts["general_kl"].item() > 1e-4 and parts["local_kl"].item() > 1e-4
    for term in ("general_kl", "local_kl"):
        p.grad = None
        parts[term].backward(retain_graph=True)
        assert p.grad is not None and p.grad.abs().sum() > 0
    trained = {n for n, q in model.named_parameters() if q.requires_grad}
    assert trained == {f"model.layers.{LAYER}.mlp.down_proj.weight"}
    assert all(q.grad is None for n, q in model.named_parameters() if n not in trained)


def test_smoothing_alpha_0_and_1_reduce_to_plain_ce_on_new_and_old_answer(tmp_path):
    with_old = [e for e in EDITS if e.old_answer is not None]
    idx = list(range(len(with_old)))
    for alpha, answer in ((0.0, "target"), (1.0, "old_answer")):
        cfg = ftpp.FTPPConfig(smooth_alpha=alpha)
        model, tok, reg, cache, _ = setup(tmp_path / str(alpha), cfg, edits=with_old)
        h, batch = cache.batch(idx, "cpu", packed=False)
        got, _ = reg.loss(model, idx, h, batch)
        plain = [data.encode_edit(tok, e.prompt, getattr(e, answer)) for e in with_old]
        h2, b2 = edit.build_prefix_cache(model, plain, tok.pad_id, LAYER).batch(idx, "cpu", packed=False)
        torch.testing.assert_close(got, edit.edit_loss(model, h2, b2, LAYER), rtol=1e-6, atol=0)


def test_edits_without_old_answer_are_trained_plainly_and_counted(tmp_path):
    model, tok, reg, cache, _ = setup(tmp_path, ftpp.FTPPConfig(smooth_alpha=0.5))
    assert reg.stats["edits_without_old_answer"] == 1
    idx = [2]  # the edit without an old answer: smoothing must not touch it
    h, batch = cache.batch(idx, "cpu", packed=False)
    got, _ = reg.loss(model, idx, h, batch)
    torch.testing.assert_close(got, edit.edit_loss(model, h, batch, LAYER), rtol=0, atol=0)


def test_zero_weights_give_the_plain_locft_loss_bit_for_bit(tmp_path):
    """Even through FTPP.loss with every weight 0, the loss equals edit_loss exactly; and
    edit() with A = L1 = L2 = 0 does not build FTPP at all."""
    model, _, reg, cache, _ = setup(tmp_path, ftpp.FTPPConfig())
    idx = [3, 0, 2]
    h, batch = cache.batch(idx, "cpu", packed=False)
    got, _ = reg.loss(model, idx, h, batch)
    assert torch.equal(got, edit.edit_loss(model, h, batch, LAYER))


def test_general_sentences_match_the_edit_lengths(tmp_path):
    make_checkpoint(tmp_path, "llama")
    _, tok = M.load(tmp_path)
    seqs = ftpp.length_matched_sentences(tok, GENERAL, [4, 7, 30], seed=0)
    assert [len(s) for s in seqs][:2] == [4, 7]
    assert len(seqs[2]) == max(len(tok.encode(s)) for s in GENERAL)  # none long enough: the longest


def test_ftpp_options_through_edit_train_and_log(tmp_path):
    make_checkpoint(tmp_path, "qwen2")
    model, tok = M.load(tmp_path, dtype="float32")
    (tmp_path / "general.txt").write_text("\n".join(GENERAL))
    cfg = edit.EditConfig(layer=LAYER, epochs=3, lr=1e-3, batch_size=2, smooth_alpha=0.2, general_kl=0.5,
                          general_text=str(tmp_path / "general.txt"), local_kl=0.5)
    trained, log = edit.edit(model, tok, EDITS, cfg, say=lambda s: None)
    name = f"model.layers.{LAYER}.mlp.down_proj.weight"
    assert not torch.equal(trained[name], dict(model.named_parameters())[name].float())
    assert log["ftpp"]["edits_without_old_answer"] == 1
    assert {"general_kl", "local_kl"} <= set(log["epochs"][-1])
