"""edit.py: the cached prefix is exact, only the chosen tensors train, deltas round-trip and refuse
another base, exports load in transformers, bad input fails with one line, and LocFT-BF learns."""
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import delta
import edit
import evaluate
import preflight
import model as model_lib
from tiny import make_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def random_edits(n, seed=0, vocab=320):
    rng = random.Random(seed)
    w = lambda: f"w{rng.randrange(3, vocab)}"
    return [data.Edit(prompt=" ".join(w() for _ in range(rng.randint(2, 6))),
                      target=" ".join(w() for _ in range(rng.randint(1, 3)))) for _ in range(n)]


def write_edits(path, edits):
    with open(path, "w") as f:
        for e in edits:
            f.write(json.dumps(e.to_json()) + "\n")
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    make_checkpoint(d, "llama", shard_size="60KB")  # several shards: export must rewrite just one
    return d


@pytest.fixture(scope="module")
def edits_file(tmp_path_factory):
    return write_edits(tmp_path_factory.mktemp("edits") / "edits.jsonl", random_edits(8))


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "edit.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


def cli_in_process(capsys, *args):
    rc = edit.main([str(a) for a in args])
    return rc, capsys.readouterr()


def file_hashes(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(d).iterdir()) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# Exactness of the prefix cache


def per_sample_ce(logits, batch):
    """The oracle's loss: mean CE over each sequence's target tokens, then over the batch."""
    ce = torch.nn.functional.cross_entropy(logits, batch.labels, reduction="none")
    counts = batch.target_mask.sum(1).tolist()
    return torch.stack([c.mean() for c in ce.split(counts)]).mean()


DENSE_MODULES = [m for m in model_lib.MODULES if not m.startswith("shared_expert")]
MOE_MODULES = [m for m in model_lib.MODULES if m.startswith("shared_expert")] + ["attn", "layer"]


# qwen2: q/k/v biases + tied head; mistral: sliding window; qwen3: q/k norm; qwen2-moe: layer 1 is
# sparse (router, routed and shared experts), layer 2 after it dense
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("variant,module", [(v, m) for v in ("qwen2", "mistral", "qwen3") for m in DENSE_MODULES]
                         + [("qwen2-moe", m) for m in MOE_MODULES])
@pytest.mark.parametrize("packed,row_tokens", [(True, 1024), (True, 12), (False, None)],
                         ids=["packed", "packed-rows", "padded"])
def test_cached_prefix_gives_same_loss_and_grad(tmp_path, variant, module, packed, row_tokens):
    make_checkpoint(tmp_path, variant)
    m, tok = model_lib.load(tmp_path)
    L, edits = 1, random_edits(6, seed=1)
    encoded = [data.encode_edit(tok, e.prompt, e.target) for e in edits]
    # cache built in batches of 2 (other padding than the training batch), then a batch of 4
    cache = data.PrefixCache(m, encoded, tok.pad_id, L, batch_size=2)
    cache.row_tokens = row_tokens  # 12: the batch is split over several packed rows
    params = model_lib.select_params(m, L, module)
    for p in params.values():
        p.requires_grad_(True)
    idx = [4, 0, 5, 2]
    if row_tokens == 12:
        assert cache.batch(idx)[1].ids.shape[0] > 1
    hp = edit.Hparams(layer=L, module=module)
    if packed:
        loss_c = edit.batch_loss(m, cache, idx, hp)
    else:  # the padded path FT++ uses: force it through a cache that is never packed
        h, batch = cache.batch(idx, packed=False)
        logits = m.forward_from(h, L, logits_at=batch.predict_mask)
        loss_c = per_sample_ce(logits, batch)
    grads_c = torch.autograd.grad(loss_c, list(params.values()))
    # the oracle: the plain full forward over the right-padded batch, logits everywhere
    padded = data.collate([encoded[i] for i in idx], tok.pad_id)
    loss_f = per_sample_ce(m(padded.ids)[padded.predict_mask], padded)
    grads_f = torch.autograd.grad(loss_f, list(params.values()))
    torch.testing.assert_close(loss_c, loss_f, rtol=1e-5, atol=1e-7)
    for n, gc, gf in zip(params, grads_c, grads_f):
        assert gc.abs().sum() > 0, n
        assert ((gc - gf).norm() / gf.norm()).item() < 1e-5, n  # relative 1e-5 (fp32 rounding ~1e-7)


@pytest.mark.parametrize("variant,waits", [("qwen2", {"_local_scalar_dense": 1}),  # the loss's value
                                           ("qwen2-moe", {"_local_scalar_dense": 1, "tolist": 1})])  # + experts' counts
def test_a_training_step_waits_for_the_device_once(tmp_path, variant, waits):
    """Everything a step does on the host (packing, cache rows, target positions) is plain
    Python, so the only values it needs back from a GPU are the loss (the skip rule needs it) and,
    per sparse layer, how many tokens each expert takes. Counted on a CPU by bench/syncs.py."""
    sys.path.insert(0, str(ROOT / "bench"))
    from syncs import HostSyncs

    make_checkpoint(tmp_path, variant)
    m, tok = model_lib.load(tmp_path)
    hp = edit.Hparams(layer=1, module="shared_expert.down_proj" if "moe" in variant else "down_proj")
    _, cache, _, _ = edit.prepare(m, tok, random_edits(6, seed=2), hp)
    for p in model_lib.select_params(m, 1, hp.module).values():
        p.requires_grad_(True)
    with HostSyncs() as syncs:  # layer 1 is the only sparse layer at or after L in qwen2-moe
        loss = edit.batch_loss(m, cache, [4, 0, 5, 2], hp)
        loss.item()
        loss.backward()
    assert dict(syncs.ops) == waits


def test_select_params_names(ckpt):
    m, _ = model_lib.load(ckpt)
    assert list(model_lib.select_params(m, 2, "down_proj")) == ["model.layers.2.mlp.down_proj.weight"]
    assert len(model_lib.select_params(m, 2, "mlp")) == 3
    assert sorted(model_lib.select_params(m, 0, "attn")) == [f"model.layers.0.self_attn.{x}_proj.weight" for x in "koqv"]
    layer = model_lib.select_params(m, 1, "layer")
    assert "model.layers.1.input_layernorm.weight" in layer and len(layer) == 9


# ----------------------------------------------------------------------------------------------
# Training


def test_only_selected_tensors_get_grads(ckpt):
    m, tok = model_lib.load(ckpt)
    before = {n: p.clone() for n, p in m.state_dict().items()}
    seen = []

    def check(line):  # an epoch line is printed while the trained tensors are installed
        if line.startswith("epoch"):
            trainable = {n for n, p in m.named_parameters() if p.requires_grad}
            with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
            seen.append((trainable, with_grad))

    hp = edit.Hparams(layer=1, module="mlp", epochs=2, lr=1e-3)
    trained, log = edit.edit(m, tok, random_edits(8), hp, say=check)
    want = set(model_lib.select_params(m, 1, "mlp"))
    assert set(trained) == want and all(t.dtype == torch.float32 for t in trained.values())
    assert len(seen) == 2 and all(t == want and g <= want and g for t, g in seen)
    # edit() leaves the model as it found it: frozen, same values
    assert not any(p.requires_grad or p.grad is not None for p in m.parameters())
    assert all(torch.equal(before[n], t) for n, t in m.state_dict().items())
    assert any(not torch.equal(before[n], trained[n]) for n in want)


def sharp_model(ckpt):
    """The tiny random model with a final-norm gain of 50: with its 0.02-std head, logits could
    otherwise not move far enough for any loss below ~4.5 (a property of the toy, not the method)."""
    m, tok = model_lib.load(ckpt)
    with torch.no_grad():
        m.model.norm.weight.mul_(50)
    return m, tok


def test_locft_bf_learns_edits(ckpt):
    m, tok = sharp_model(ckpt)
    edits = random_edits(8, seed=3)
    hp = edit.Hparams(layer=2, module="down_proj", epochs=60, lr=3e-2, seed=0)
    lines = []
    trained, log = edit.edit(m, tok, edits, hp, say=lines.append)
    assert log["final_loss"] < edit.STOP_LOSS and log["stopped_early"]
    assert log["batch_size"] == 1 and log["epochs"][0]["steps"] == 8  # auto batch: >= ~8 steps per epoch
    assert lines[0].startswith("8 training sequences (") and "tokens), batch 1 (8 steps per epoch), up to 60 epochs; about " in lines[0]
    assert lines[1].startswith("epoch 1/60: loss ") and "steps 8 (skipped" in lines[1]
    m.load_tensors(trained)
    batch = data.collate([data.encode_edit(tok, e.prompt, e.target) for e in edits], tok.pad_id)
    pred = m(batch.ids, logits_at=batch.predict_mask).argmax(-1)
    assert torch.equal(pred, batch.labels)  # teacher-forced: every answer token and EOS


def test_epoch_mean_weighs_each_batch_by_its_size(ckpt, monkeypatch):
    """5 sequences in batches of 2: the last batch holds one, and counts for one, not for two."""
    m, tok = model_lib.load(ckpt)
    seen = []
    real = edit.batch_loss
    monkeypatch.setattr(edit, "batch_loss", lambda *a, **k: seen.append((real(*a, **k), len(a[2]))) or seen[-1][0])
    _, log = edit.edit(m, tok, random_edits(5), edit.Hparams(layer=1, epochs=1, batch_size=2), say=lambda s: None)
    assert [n for _, n in seen] == [2, 2, 1]
    weighted = sum(loss.item() * n for loss, n in seen) / 5
    assert log["epochs"][0]["mean_loss"] == pytest.approx(weighted, rel=1e-9)
    assert weighted != pytest.approx(sum(loss.item() for loss, _ in seen) / 3, rel=1e-6)


def target_ce(m, tok, seqs) -> list[torch.Tensor]:
    """By hand: each (ids, n_prompt) alone through the whole model, cross-entropy at every token
    after the prompt (the answer and EOS)."""
    out = []
    for ids, n in seqs:
        logits = m(torch.tensor([ids]))[0]
        out.append(torch.nn.functional.cross_entropy(logits[n - 1:len(ids) - 1], torch.tensor(ids[n:]), reduction="none"))
    return out


@pytest.mark.usefixtures("one_thread")
def test_token_loss_average_is_the_mean_over_every_target_token(ckpt):
    """--loss-avg token: the mean over every target token of the mini-batch (a 3-token answer
    weighs three times a 1-token one); the default, the mean per edit and then over the batch.
    Both the packed path and FT++'s padded one."""
    assert preflight.parse_args(["--ckpt", "c", "--edits", "e", "--loss-avg", "token"], edit.Hparams()).loss_avg == "token"
    edits = random_edits(6, seed=6)  # answers of 2 or 3 words plus EOS
    m, tok = sharp_model(ckpt)
    learnt, _ = edit.edit(m, tok, edits[5:], edit.Hparams(layer=2, epochs=60, lr=3e-2), say=lambda s: None)
    m.load_tensors(learnt)  # edit 5 (the short answer) now costs ~0, the others ~20: the averages differ
    encoded = [data.encode_edit(tok, e.prompt, e.target) for e in edits]
    cache = data.PrefixCache(m, encoded, tok.pad_id, 1)
    idx = [4, 0, 5, 2]
    ce = target_ce(m, tok, [encoded[i] for i in idx])
    assert len({len(c) for c in ce}) > 1
    by_token, by_sample = torch.cat(ce).mean(), torch.stack([c.mean() for c in ce]).mean()
    assert abs(by_token - by_sample) > 0.05 * by_sample
    torch.testing.assert_close(edit.batch_loss(m, cache, idx, edit.Hparams(layer=1, loss_avg="token")), by_token,
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(edit.batch_loss(m, cache, idx, edit.Hparams(layer=1)), by_sample, rtol=1e-5, atol=0)
    hp = edit.Hparams(layer=1, loss_avg="token", local_kl=1.0)  # FT++: the answer's term, averaged the same way
    _, ftpp_cache, reg, _ = edit.prepare(m, tok, edits, hp, say=lambda s: None)
    h, batch = ftpp_cache.batch(idx, packed=False)
    reg.loss(m, idx, h, batch, "token")
    assert reg.epoch_parts()["edit"] == pytest.approx(by_token.item(), rel=1e-5)


@pytest.mark.usefixtures("one_thread")
def test_adamw_with_weight_decay_takes_the_decoupled_step(ckpt, edits_file, tmp_path, capsys):
    """edit.py --optimizer adamw --weight-decay 0.1, one step (one epoch, one batch): the delta is
    AdamW's first step from the base on the batch's gradient, written out by hand,
    W - lr * wd * W - lr * g / (|g| + eps), and what torch.optim.AdamW does with that gradient;
    Adam's coupled L2 decay would give another tensor."""
    lr, wd, name = 1e-2, 0.1, "model.layers.2.mlp.down_proj.weight"
    rc, _ = cli_in_process(capsys, "--ckpt", ckpt, "--edits", edits_file, "--layer", 2, "--epochs", 1,
                           "--batch-size", 8, "--lr", lr, "--optimizer", "adamw", "--weight-decay", wd,
                           "--out", tmp_path / "out")
    assert rc == 0
    got = delta.tensors(tmp_path / "out" / "delta.safetensors")[name]
    m, tok = model_lib.load(ckpt)
    edits = data.load_edits(edits_file)
    cache = data.PrefixCache(m, [data.encode_edit(tok, e.prompt, e.target) for e in edits], tok.pad_id, 2)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(edit.Hparams.seed)).tolist()  # epoch 1's
    with edit.trainable_copies(m, [name]) as params:
        w = params[name]
        g, = torch.autograd.grad(edit.batch_loss(m, cache, order, edit.Hparams(layer=2)), w)
        w0 = w.detach().clone()
    by_hand = w0 - lr * wd * w0 - lr * g / (g.abs() + 1e-8)
    torch.testing.assert_close(got, by_hand, rtol=0, atol=1e-7)
    w1 = w0.clone().requires_grad_(True)
    w1.grad = g
    opt = torch.optim.AdamW([w1], lr=lr, weight_decay=wd)
    opt.step()
    torch.testing.assert_close(got, w1.detach(), rtol=0, atol=1e-7)
    coupled = w0 - lr * (g + wd * w0) / ((g + wd * w0).abs() + 1e-8)  # Adam with L2 decay in the gradient
    assert (got - coupled).abs().max() > 1e-3


@pytest.mark.usefixtures("one_thread")
def test_augment_prefixes_trains_each_prompt_behind_k_distinct_prefixes(ckpt, monkeypatch):
    """--augment-prefixes 3: every edit is trained as itself and behind 3 distinct members of
    data.PREFIXES, drawn per edit and fixed by the seed; every epoch's mini-batches cover all
    4n sequences once, and the loss is the per-sequence mean over all of them."""
    # prefixes in the tiny model's words, so each one tokenises to its own ids
    monkeypatch.setattr(data, "PREFIXES", [f"w{300 + i} w{301 + i} w{302 + i}" for i in range(10)])
    m, tok = model_lib.load(ckpt)
    edits, k = random_edits(5, seed=7), 3
    assert preflight.parse_args(["--ckpt", "c", "--edits", "e", "--augment-prefixes", "3"], edit.Hparams()).augment_prefixes == 3

    def trained_on(seed):
        seen, real = [], edit.batch_loss
        monkeypatch.setattr(edit, "batch_loss", lambda *a, **kw: seen.append((a[1], list(a[2]))) or real(*a, **kw))
        hp = edit.Hparams(layer=1, epochs=2, lr=0.0, batch_size=4, augment_prefixes=k, seed=seed)
        _, log = edit.edit(m, tok, edits, hp, say=lambda s: None)
        monkeypatch.setattr(edit, "batch_loss", real)
        return seen, log

    seen, log = trained_on(seed=0)
    encoded = seen[0][0].encoded
    assert log["n_sequences"] == len(encoded) == 5 * (k + 1)
    prefixes = []  # per edit, the prefixes of its k copies, read back from the token ids
    for i, e in enumerate(edits):
        own, *copies = encoded[i * (k + 1):(i + 1) * (k + 1)]
        assert own == data.encode_edit(tok, e.prompt, e.target)
        found = [p for c in copies for p in data.PREFIXES if c == data.encode_edit(tok, f"{p} {e.prompt}", e.target)]
        assert len(found) == k == len(set(found))  # each copy is the prompt behind one prefix; k distinct ones
        prefixes.append(found)
    assert len({tuple(sorted(p)) for p in prefixes}) > 1  # drawn per edit, not one set for all
    for epoch in (0, 1):  # 20 sequences in batches of 4: five steps an epoch, each sequence once
        steps = [idx for _, idx in seen[epoch * 5:(epoch + 1) * 5]]
        assert sorted(i for idx in steps for i in idx) == list(range(len(encoded)))
    by_hand = torch.stack([c.mean() for c in target_ce(m, tok, encoded)]).mean()  # lr 0: every step sees the base
    assert log["epochs"][0]["mean_loss"] == pytest.approx(by_hand.item(), rel=1e-5)
    again, _ = trained_on(seed=0)
    other, _ = trained_on(seed=1)
    assert again[0][0].encoded == encoded and other[0][0].encoded != encoded


def test_df_pipeline_trains_each_edit_in_order(ckpt):
    m, tok = sharp_model(ckpt)
    hp = edit.Hparams(layer=2, pipeline="df", lr=1e-2, max_steps=40)
    trained, log = edit.edit(m, tok, random_edits(5, seed=4), hp, say=lambda s: None)
    assert [e["edit"] for e in log["edits"]] == list(range(5))
    assert log["batch_size"] == 1 and edit.Hparams().max_steps == 25  # EasyEdit FT-M's num_steps
    assert all(e["steps"] > 0 and (e["final_loss"] < edit.STOP_LOSS or e["steps"] == 40) for e in log["edits"])
    assert log["edits"][-1]["final_loss"] < edit.STOP_LOSS  # the last edit is memorised


def test_df_gives_each_edit_a_fresh_optimiser(ckpt):
    """Depth-first editing of [A, B] is editing A, then editing B on the result: nothing (Adam's
    moments, its step count) carries over from one edit to the next."""
    edits = random_edits(2, seed=5)
    hp = edit.Hparams(layer=2, pipeline="df", lr=1e-2, max_steps=6)
    m, tok = sharp_model(ckpt)
    both, _ = edit.edit(m, tok, edits, hp, say=lambda s: None)
    first, _ = edit.edit(m, tok, edits[:1], hp, say=lambda s: None)
    m.load_tensors(first)
    then_second, _ = edit.edit(m, tok, edits[1:], hp, say=lambda s: None)
    name = "model.layers.2.mlp.down_proj.weight"
    assert not torch.equal(both[name], first[name])
    # The prefix cache of B is computed beside A in one run and alone in the other, so the two agree
    # to float rounding (~1e-6 here); a carried-over Adam state moves entries by ~lr = 1e-2.
    torch.testing.assert_close(both[name], then_second[name], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def nan_ckpt(ckpt, tmp_path_factory):
    """A copy of the tiny checkpoint whose final norm holds a NaN: every loss is NaN."""
    import shutil
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("nan")
    for f in ckpt.iterdir():
        shutil.copyfile(f, d / f.name)
    for f in model_lib.checkpoint_files(d):
        t = load_file(str(f))
        if "model.norm.weight" in t:
            t["model.norm.weight"][0] = float("nan")
            save_file(t, str(f), metadata={"format": "pt"})
    return d


def test_nan_loss_stops_with_advice(nan_ckpt):
    m, tok = model_lib.load(nan_ckpt)
    with pytest.raises(edit.EditError, match="loss is nan at epoch 1, step 1, before any update") as e:
        edit.edit(m, tok, random_edits(4), edit.Hparams(layer=2, epochs=5), say=lambda s: None)
    assert "checkpoint's weights" in str(e.value) and "--lr" not in str(e.value)


class NaNGradient(torch.autograd.Function):
    """The identity, whose backward returns NaN: an attention kernel's faulty backward."""
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


@pytest.mark.parametrize("pipeline,where", [("bf", "epoch 1, step 1"), ("df", "edit 0, step 1")])
def test_nan_gradient_names_the_tensor_and_the_step(ckpt, monkeypatch, pipeline, where):
    """A finite loss whose backward gives NaN (pytorch#196678 does this to attention's queries):
    the run stops at the next check naming the gradient, the tensor and the step, not --lr."""
    m, tok = model_lib.load(ckpt)
    attend = model_lib.attend
    monkeypatch.setattr(model_lib, "attend", lambda q, k, v, mask: attend(NaNGradient.apply(q), k, v, mask))
    hp = edit.Hparams(layer=1, epochs=3, batch_size=2, pipeline=pipeline)
    with pytest.raises(edit.EditError) as e:
        edit.edit(m, tok, random_edits(4), hp, say=lambda s: None)
    msg = str(e.value)
    assert f"the gradient of model.layers.1.mlp.down_proj.weight was not finite at {where}" in msg, msg
    assert "--lr" not in msg and "--dtype float32" in msg


# ----------------------------------------------------------------------------------------------
# Deltas and exports


@pytest.fixture(scope="module")
def cli_run(ckpt, edits_file, tmp_path_factory):
    """One CLI run with --export; returns (out, export, hashes of the base before the run)."""
    base = tmp_path_factory.mktemp("runs")
    before = file_hashes(ckpt)
    r = run_cli("--ckpt", ckpt, "--edits", edits_file, "--layer", "1", "--module", "mlp", "--epochs", "3",
                "--out", base / "run", "--export", base / "exported")
    assert r.returncode == 0, r.stderr
    assert "epoch 1/3: loss" in r.stdout and "done: 8 edits" in r.stdout
    return base / "run", base / "exported", before


def test_base_checkpoint_files_unchanged(cli_run, ckpt):
    out, _, before = cli_run
    assert file_hashes(ckpt) == before
    assert sorted(p.name for p in out.iterdir()) == ["delta.safetensors", "edits.jsonl", "train_log.json"]
    log = json.loads((out / "train_log.json").read_text())
    assert len(log["epochs"]) == 3 and {"mean_loss", "steps", "skipped", "seconds"} <= set(log["epochs"][0])
    assert len((out / "edits.jsonl").read_text().splitlines()) == 8


def test_delta_holds_only_changed_tensors_with_metadata(cli_run):
    from safetensors import safe_open

    with safe_open(str(cli_run[0] / "delta.safetensors"), framework="pt") as sf:
        names, meta = sorted(sf.keys()), sf.metadata()
        assert all(sf.get_tensor(n).dtype == torch.float32 for n in names)  # as trained
    assert names == [f"model.layers.1.mlp.{x}_proj.weight" for x in ("down", "gate", "up")]
    assert meta["layer"] == "1" and meta["module"] == "mlp" and meta["n_edits"] == "8"
    assert json.loads(meta["hparams"])["lr"] == 2e-3 and all(f"sha256.{n}" in meta for n in names)
    assert json.loads(meta["hparams"])["batch_size"] == 1  # the batch size it ran with, resolved


def test_apply_then_revert_is_bit_identical(cli_run, ckpt):
    m, _ = model_lib.load(ckpt)
    before = {n: p.clone() for n, p in m.state_dict().items()}
    originals = delta.apply(m, cli_run[0] / "delta.safetensors")
    assert not torch.equal(m.get_parameter("model.layers.1.mlp.down_proj.weight"),
                           before["model.layers.1.mlp.down_proj.weight"])
    m.load_tensors(originals)
    assert all(torch.equal(before[n], t) for n, t in m.state_dict().items())


def test_delta_for_other_base_is_refused(cli_run, ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    path = cli_run[0] / "delta.safetensors"
    m, _ = model_lib.load(ckpt)
    with torch.no_grad():
        m.get_parameter("model.layers.1.mlp.up_proj.weight")[0, 0] += 1e-3  # another base
    with pytest.raises(delta.DeltaError, match="differs from the base"):
        delta.apply(m, path)
    m, _ = model_lib.load(ckpt)
    delta.apply(m, path)
    with pytest.raises(delta.DeltaError, match="differs from the base"):  # already edited
        delta.apply(m, path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as sf:
        meta = sf.metadata()
    t = load_file(str(path))
    m, _ = model_lib.load(ckpt)
    save_file({"model.layers.7.mlp.up_proj.weight": t["model.layers.1.mlp.up_proj.weight"]}, str(tmp_path / "a.st"), meta)
    with pytest.raises(delta.DeltaError, match="does not exist in this model"):
        delta.apply(m, tmp_path / "a.st")
    save_file({"model.layers.1.mlp.up_proj.weight": t["model.layers.1.mlp.up_proj.weight"][:5]}, str(tmp_path / "b.st"), meta)
    with pytest.raises(delta.DeltaError, match="has shape"):
        delta.apply(m, tmp_path / "b.st")


def test_export_loads_in_transformers_and_matches(cli_run, ckpt):
    import transformers

    _, exported, _ = cli_run
    # real copies, every shard, plus config/tokenizer/index
    src = {p.name for p in ckpt.iterdir()}
    assert src == {p.name for p in exported.iterdir()}
    for p in exported.iterdir():
        assert os.stat(p).st_ino != os.stat(ckpt / p.name).st_ino and os.stat(p).st_nlink == 1
    changed = [n for n, h in file_hashes(exported).items() if h != file_hashes(ckpt)[n]]
    assert len(changed) >= 1 and all(n.endswith(".safetensors") for n in changed)

    hf = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    m, tok = model_lib.load(ckpt)
    delta.apply(m, cli_run[0] / "delta.safetensors")
    ids = torch.tensor([tok.encode("w5 w17 w99 w42 w43")])
    with torch.no_grad():
        torch.testing.assert_close(m(ids), hf(ids).logits, rtol=1e-4, atol=1e-5)
    m2, _ = model_lib.load(exported)  # and the export equals base + delta exactly
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


# ----------------------------------------------------------------------------------------------
# The command line


def test_layer_parsing():
    assert preflight.resolve_layer("22", 30) == 22
    assert preflight.resolve_layer("-1", 30) == 29 and preflight.resolve_layer(-30, 30) == 0
    assert preflight.resolve_layer("0.25", 28) == 6  # Qwen2.5-7B layer 6 = 7th of 28
    assert preflight.resolve_layer("0.25", 80) == 19  # -> Qwen2.5-72B layer 19, the paper's example
    assert preflight.resolve_layer(edit.Hparams.layer, 30) == 22  # default depth 0.75: SmolLM2's layer 22
    for bad in ("40", "-31", "1.0", "0.0", "abc"):
        with pytest.raises(preflight.EditError, match="--layer"):
            preflight.resolve_layer(bad, 30)
    with pytest.raises(edit.EditError, match=r"layers 0\.\.29 \(or -30\.\.-1, or a fraction in \(0,1\)\)"):
        preflight.resolve_layer("40", 30)


def test_cli_errors_are_one_line_and_write_nothing(ckpt, nan_ckpt, edits_file, tmp_path):
    out = tmp_path / "out"
    r = run_cli("--ckpt", ckpt, "--edits", edits_file, "--layer", "40", "--out", out)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--layer 40 is out of range" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
    r = run_cli("--ckpt", nan_ckpt, "--edits", edits_file, "--epochs", "5", "--layer", "2", "--out", out)
    assert r.returncode == 2 and "before any update" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("extra,needle", [
    (["--module", "ffn"], "--module"),
    (["--lr", "0"], "--lr"),
    (["--lr=-1e-3"], "--lr"),
    (["--lr", "fast"], "--lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--n", "0"], "--n"),
    (["--layer", "1.5"], "--layer"),
    (["--export", "{ckpt}"], "--export"),
    (["--export", "{ckpt}/sub"], "--export"),
    (["--out", "{ckpt}"], "--out"),
    (["--out", "{tmp}/same", "--export", "{tmp}/same"], "overlap"),
    (["--out", "{tmp}/o2", "--export", "{tmp}/o2/inside"], "overlap"),
    (["--smooth-alpha", "1.5"], "--smooth-alpha"),
    (["--augment-prefixes", "500"], "--augment-prefixes"),
    (["--retain-tokens", "2"], "--retain-tokens acts with --retain only"),
    (["--retain", "--retain-weight", "-1"], "--retain-weight"),
    (["--retain", "--retain-pool", "0"], "--retain-pool"),
    (["--retain", "--retain-file", "{tmp}/none.txt"], "--retain-file"),
])
def test_cli_bad_flag(capsys, ckpt, edits_file, tmp_path, extra, needle):
    extra = [x.format(ckpt=ckpt, tmp=tmp_path) for x in extra]
    args = ["--ckpt", ckpt, "--edits", edits_file, "--epochs", "1"] + (["--out", tmp_path / "o"] if "--out" not in extra else []) + extra
    before = file_hashes(ckpt)
    try:
        rc, cap = cli_in_process(capsys, *args)
    except SystemExit as e:  # argparse's own errors (bad number): exit 2, also one line
        rc, cap = e.code, capsys.readouterr()
    assert rc == 2 and cap.err.count("\n") == 1 and needle in cap.err
    assert not (tmp_path / "o").exists() and file_hashes(ckpt) == before
    assert not (ckpt / "sub").exists() and not (tmp_path / "same").exists() and not (tmp_path / "o2").exists()


def test_cli_bad_files(capsys, ckpt, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    rc, cap = cli_in_process(capsys, "--ckpt", ckpt, "--edits", empty, "--out", tmp_path / "o")
    assert rc == 2 and "empty.json" in cap.err and cap.err.count("\n") == 1
    rc, cap = cli_in_process(capsys, "--ckpt", tmp_path / "nope", "--edits", empty, "--out", tmp_path / "o")
    assert rc == 2 and "nope" in cap.err
    assert not (tmp_path / "o").exists()


def test_existing_out_and_export_need_overwrite(capsys, ckpt, edits_file, tmp_path):
    out, exp = tmp_path / "o", tmp_path / "x"
    out.mkdir()
    (out / "keep").write_text("mine")
    base = ["--ckpt", ckpt, "--edits", edits_file, "--epochs", "1", "--layer", "2"]
    rc, cap = cli_in_process(capsys, *base, "--out", out)
    assert rc == 2 and "--out" in cap.err and "--overwrite" in cap.err and (out / "keep").exists()
    exp.mkdir()
    rc, cap = cli_in_process(capsys, *base, "--out", tmp_path / "o2", "--export", exp)
    assert rc == 2 and "--export" in cap.err and not (tmp_path / "o2").exists()
    rc, cap = cli_in_process(capsys, *base, "--out", out, "--export", exp, "--overwrite")
    assert rc == 0, cap.err
    assert not (out / "keep").exists() and (out / "delta.safetensors").exists() and (exp / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "x"]  # no temp dirs left behind


def test_eval_flag_uses_evaluate(capsys, ckpt, edits_file, tmp_path):
    rc, cap = cli_in_process(capsys, "--ckpt", ckpt, "--edits", edits_file, "--epochs", "1", "--layer", "2",
                             "--out", tmp_path / "o", "--eval")
    assert rc == 0, cap.err
    report = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert report["metrics"]["reliability (greedy EM)"]["n"] == 8 and "reliability (greedy EM)" in cap.out


# ----------------------------------------------------------------------------------------------
# Qwen3 and Qwen2-MoE through the command line


def sharp_checkpoint(d, variant):
    """A tiny checkpoint with sharp_model's final-norm gain of 50 written into its weights."""
    from safetensors.torch import load_file, save_file

    make_checkpoint(d, variant)
    t = load_file(str(d / "model.safetensors"))
    t["model.norm.weight"] = t["model.norm.weight"] * 50
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("variant,module", [("qwen3", "down_proj"), ("qwen2-moe", "shared_expert.down_proj")])
def test_cli_edits_qwen3_and_moe_and_evaluate_scores_the_delta(capsys, tmp_path, variant, module):
    """edit.py with the default module (the shared expert's down_proj on the MoE's sparse layer 1),
    then evaluate.py with the delta: every edit is recalled by greedy decoding."""
    ckpt = sharp_checkpoint(tmp_path / "ckpt", variant)
    edits = write_edits(tmp_path / "edits.jsonl", random_edits(4, seed=3))
    rc, cap = cli_in_process(capsys, "--ckpt", ckpt, "--edits", edits, "--layer", "1", "--lr", "3e-2",
                             "--epochs", "40", "--out", tmp_path / "run")
    assert rc == 0, cap.err
    tensor = f"model.layers.1.mlp.{module}.weight"
    assert f"into {tensor} (bf" in cap.out
    path = tmp_path / "run" / "delta.safetensors"
    trained, meta = delta.tensors(path), delta.check(path, model_lib.parameter_shapes(model_lib.read_args(ckpt)))
    assert list(trained) == [tensor] and meta["module"] == module
    assert evaluate.main(["--ckpt", str(ckpt), "--delta", str(tmp_path / "run" / "delta.safetensors"),
                          "--edits", str(edits), "--out", str(tmp_path / "report.json")]) == 0
    reliability = json.loads((tmp_path / "report.json").read_text())["metrics"]["reliability (greedy EM)"]
    assert reliability["base"] == 0 and reliability["edited"] == 1


@pytest.mark.usefixtures("one_thread")
def test_moe_module_defaults_by_layer_and_refuses_what_a_layer_lacks(capsys, tmp_path):
    """On the tiny MoE layer 1 is sparse and layer 2 dense: each gets its own default, and a
    module the layer does not have is refused before anything is read or written."""
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, "qwen2-moe")
    capsys.readouterr()  # transformers' save progress bar
    margs = model_lib.read_args(ckpt)
    assert preflight.resolve_module(None, margs, 1, edit.Hparams.module) == "shared_expert.down_proj"
    assert preflight.resolve_module(None, margs, 2, edit.Hparams.module) == edit.Hparams.module == "down_proj"
    assert preflight.resolve_module("shared_expert", margs, 1, edit.Hparams.module) == "shared_expert"
    edits = write_edits(tmp_path / "edits.jsonl", random_edits(2))
    for layer, module, has in [("1", "down_proj", "shared_expert.down_proj"), ("1", "mlp", "layer"),
                               ("2", "shared_expert.down_proj", "down_proj")]:
        rc, cap = cli_in_process(capsys, "--ckpt", ckpt, "--edits", edits, "--layer", layer, "--module", module,
                                 "--out", tmp_path / "o")
        assert rc == 2 and cap.err.count("\n") == 1 and f"--module {module}: layer {layer} has no such" in cap.err
        assert has in cap.err and not (tmp_path / "o").exists()
    m, _ = model_lib.load(ckpt)
    assert sorted(model_lib.select_params(m, 1, "shared_expert")) == [
        f"model.layers.1.mlp.shared_expert.{x}_proj.weight" for x in ("down", "gate", "up")]
