"""The rival editors (baselines/) against the algebra of their official implementations, on a
tiny random Llama: each test checks a property the method's own equations promise."""
import json
from pathlib import Path

import pytest
import torch

import data
from baselines import alphaedit, cov, hparams, locate, memit, ultraedit

VSTAR = locate.VStar(v_num_grad_steps=6, v_lr=0.5, v_weight_decay=1e-3, clamp_norm_factor=4.0, kl_factor=0.0625)
TEMPLATES = [["{}"], ["w7 w8 w9. {}", "w20 w21. {}"]]
ROOT = Path(__file__).resolve().parent.parent


def edits(n=3):
    """Edits in the tiny tokenizer's words: subject w{a} w{a+1} inside the prompt."""
    return [data.Edit(prompt=f"w{30 + 5 * i} w{100 + i} w{101 + i} w{40 + i}", target=f"w{200 + i} w{210 + i}",
                      subject=f"w{100 + i} w{101 + i}", rephrases=[f"w{60 + i} w{100 + i} w{101 + i}"],
                      locality=[(f"w{150 + i} w{160 + i}", f"w{170 + i}")], record=i) for i in range(n)]


def test_subject_token_comes_from_character_offsets(tiny):
    _, _, tok = tiny
    r = locate.requests(tok, edits(1), "e.json", eos=False)[0]
    ids, j = locate.subject_token(tok, *locate.fill("w7 w8. {}", r))
    assert tok.decode([ids[j]]) == "w101"  # the subject's last word, behind a context
    assert r.answer == tok.encode(" w200 w210", add_special_tokens=False)


def test_a_subject_missing_from_its_prompt_is_refused_by_record(tiny):
    _, _, tok = tiny
    bad = edits(3)
    bad[2].subject = "w250"
    with pytest.raises(data.EditFileError, match=r"record 2: subject 'w250' does not occur in the prompt"):
        locate.requests(tok, bad, "e.json", eos=False)


def test_batched_v_star_equals_per_edit_v_star(tiny):
    _, model, tok = tiny
    reqs = locate.requests(tok, edits(3), "e.json", eos=True)
    together, log = locate.target_values(model, tok, reqs, TEMPLATES, 1, VSTAR)
    alone = torch.cat([locate.target_values(model, tok, [r], TEMPLATES, 1, VSTAR)[0] for r in reqs])
    assert torch.allclose(together, alone, rtol=1e-4, atol=1e-5)
    assert all(x["steps"] > 0 for x in log)  # it did optimise


def test_v_star_loss_before_any_step_is_the_full_models_answer_nll(tiny):
    """The v* loop runs only the tokens from the subject on, over cached keys and values of
    the rest: before any step its NLL must be what a plain forward pass of each whole sequence gives."""
    _, model, tok = tiny
    reqs = locate.requests(tok, edits(3), "e.json", eos=True)
    _, log = locate.target_values(model, tok, reqs, TEMPLATES, 1, locate.VStar(v_num_grad_steps=1))
    for r, x in zip(reqs, log):
        nll = []
        for t in [t for g in TEMPLATES for t in g]:
            ids, _ = locate.subject_token(tok, *locate.fill(t, r))
            logp = torch.log_softmax(model(torch.tensor([ids + r.answer]))[0].float(), -1)
            nll.append(-sum(logp[len(ids) - 1 + k, a] for k, a in enumerate(r.answer)) / len(r.answer))
        assert abs(x["nll"] - sum(nll).item() / len(nll)) < 1e-4 * abs(x["nll"])
        assert abs(x["kl"]) < 1e-6


def test_v_star_lowers_the_answer_loss_within_the_clamp(tiny):
    _, model, tok = tiny
    reqs = locate.requests(tok, edits(2), "e.json", eos=False)
    hp = locate.VStar(v_num_grad_steps=15, v_lr=0.5, v_weight_decay=1e-3, clamp_norm_factor=0.75, kl_factor=0.0625)
    _, log = locate.target_values(model, tok, reqs, TEMPLATES, 1, hp)
    _, start = locate.target_values(model, tok, reqs, TEMPLATES, 1, locate.VStar(v_num_grad_steps=1))  # no step
    for x, x0 in zip(log, start):
        assert x["delta_norm"] <= 0.75 * x["init_norm"] * (1 + 1e-5)
        assert x["nll"] < x0["nll"]


def key_covariance(model, tok, layer, n=60):
    """C0 of a layer over random word sequences (full rank for the tiny MLP width)."""
    g = torch.Generator().manual_seed(0)
    seqs = [tok.encode(" ".join(f"w{int(x)}" for x in torch.randint(3, 320, (30,), generator=g))) for _ in range(n)]
    return cov.second_moments(model, seqs, [layer])[layer]


def test_memit_one_edit_with_lambda_to_zero_maps_its_key_to_v_star(tiny):
    _, model, tok = tiny
    layer = 1
    reqs = locate.requests(tok, edits(1), "e.json", eos=False)
    bare = [["{}"]]  # one context: the key is the bare prompt's, the one read back below
    z, _ = locate.target_values(model, tok, reqs, bare, layer, VSTAR)
    K = locate.keys(model, tok, reqs, bare, [layer])[layer]
    now = locate.subject_outputs(model, tok, reqs, layer)
    dW = memit.memit_update(K, z - now, key_covariance(model, tok, layer), lam=1e-9)
    W = memit.down_proj(model, layer)
    original = W.detach().clone()
    try:
        memit.set_weight(W, original.double() + dW)
        after = locate.subject_outputs(model, tok, reqs, layer)
    finally:
        memit.set_weight(W, original)
    assert (after - z).norm() / (z - now).norm() < 1e-4  # the layer now outputs v* at the subject


def test_memit_update_solves_its_normal_equations():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 40, generator=g, dtype=torch.float64)
    C0, K, R = X.T @ X / 500, torch.randn(7, 40, generator=g), torch.randn(7, 16, generator=g)
    dW = memit.memit_update(K, R, C0, lam=3.0)
    # d/d(dW) of |dW K^T - R^T|^2 + lam tr(dW C0 dW^T) = 0
    lhs = dW @ (3.0 * C0 + K.double().T @ K.double())
    assert torch.allclose(lhs, R.double().T @ K.double(), atol=1e-10)


def spectrum_with_null_space(dim=48, big=30, seed=0):
    """An SPD C0 with `big` large eigenvalues and the rest tiny, and its eigenvectors."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    evals = torch.cat([torch.rand(big, generator=g, dtype=torch.float64) + 0.5, torch.full((dim - big,), 1e-4, dtype=torch.float64)])
    return U @ torch.diag(evals) @ U.T, U[:, evals > 1e-2]


def test_alphaedit_leaves_keys_in_the_preserved_subspace_unchanged():
    C0, kept = spectrum_with_null_space()
    P, rank = alphaedit.projection(C0, 2e-2)
    assert rank == 18 and torch.allclose(P @ P, P, atol=1e-12)
    g = torch.Generator().manual_seed(1)
    W = torch.randn(16, 48, generator=g, dtype=torch.float64)
    K, R = torch.randn(5, 48, generator=g), torch.randn(5, 16, generator=g)
    Cp = torch.zeros(48, 48, dtype=torch.float64)
    dW = alphaedit.alphaedit_update(K, R, P, Cp, l2=1.0)
    old_keys = kept @ torch.randn(kept.shape[1], 200, generator=g, dtype=torch.float64)  # keys C0 has seen
    change = (dW @ old_keys).norm(dim=0) / (W @ old_keys).norm(dim=0)
    assert change.max() < 1e-5
    assert (dW @ K.double().T - R.double().T).norm() < R.norm()  # and it does edit


def test_alphaedit_running_key_sum_equals_editing_all_batches_at_once():
    """In the linear setting (batch 2's keys unchanged by batch 1, its residual what batch 1
    left), two batches, the second carrying the first's keys in Cp, sum to the update that
    edits both at once, for any L2: the normal equations add up."""
    C0, _ = spectrum_with_null_space(big=20)
    P, _ = alphaedit.projection(C0, 2e-2)
    g = torch.Generator().manual_seed(2)
    K1, K2 = torch.randn(4, 48, generator=g, dtype=torch.float64), torch.randn(3, 48, generator=g, dtype=torch.float64)
    R1, R2 = torch.randn(4, 16, generator=g, dtype=torch.float64), torch.randn(3, 16, generator=g, dtype=torch.float64)
    zero = torch.zeros(48, 48, dtype=torch.float64)
    for l2 in (1.0, 10.0):  # the official values
        d1 = alphaedit.alphaedit_update(K1, R1, P, zero, l2)
        d2 = alphaedit.alphaedit_update(K2, R2 - K2 @ d1.T, P, K1.T @ K1, l2)  # what is left of batch 2 after batch 1
        both = alphaedit.alphaedit_update(torch.cat([K1, K2]), torch.cat([R1, R2]), P, zero, l2)
        assert torch.allclose(d1 + d2, both, atol=1e-9 * both.abs().max())


def test_rect_keeps_exactly_the_asked_fraction_of_largest_relative_changes():
    g = torch.Generator().manual_seed(3)
    W, dW = torch.randn(20, 50, generator=g), torch.randn(20, 50, generator=g, dtype=torch.float64)
    kept = memit.rect_mask(dW, W, 0.2)
    assert int((kept != 0).sum()) == 200
    rel = (dW / W.double()).abs()
    assert rel[kept != 0].min() >= rel[kept == 0].max()
    assert torch.equal(kept[kept != 0], dW[kept != 0])


def test_ultraedit_solve_satisfies_its_normal_equations():
    g = torch.Generator().manual_seed(4)
    K, V = torch.randn(30, 12, generator=g), torch.randn(30, 7, generator=g)
    X = ultraedit.ridge_solve(K, V, ridge=1.0)
    K, V = K.double(), V.double()
    assert torch.allclose((K.T @ K + torch.eye(12, dtype=torch.float64)) @ X, K.T @ V, atol=1e-10)


def test_lifelong_normaliser_mean_is_the_mean_of_every_row_so_far():
    g = torch.Generator().manual_seed(5)
    norm, rows = ultraedit.RunningNorm(6), []
    for n in (7, 3, 12):
        x = torch.randn(n, 6, generator=g) * 3 + 1
        norm.update(x)
        rows.append(x)
    allx = torch.cat(rows).double()
    assert norm.n == 22 and torch.allclose(norm.mean, allx.mean(0), atol=1e-12)
    assert torch.allclose(norm.std, allx.std(0), rtol=0.1)  # the official update: close to, not exactly, the sample std


def test_ultraedit_changes_only_its_modules_and_shares_a_normaliser_per_shape(tiny):
    _, model, tok = tiny
    enc = [(ids[:-1], n) for ids, n in (data.encode_edit(tok, e.prompt, e.target) for e in edits(4))]
    hp = dict(modules={"gate_proj": [1], "up_proj": [1, 2]}, lr=1e-3, sub_batch=2, ridge=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    norms = {}
    try:
        ultraedit.edit_batch(model, enc, hp, norms)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    finally:
        model.load_tensors(before)
    assert changed == {"model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight",
                       "model.layers.2.mlp.up_proj.weight"}
    assert list(norms) == ["64x112"] and norms["64x112"].n == 3 * 4 * 2  # 3 modules x 4 edits x 2 answer tokens


def test_hyperparameters_are_official_on_reference_models_and_scaled_by_depth_and_width_elsewhere():
    hp, src = hparams.resolve("memit", "llama", 32, 14336)
    assert hp["layers"] == [4, 5, 6, 7, 8] and src["rule"] == "official Llama-3-8B set"
    assert hp["mom2_update_weight"] == 15000
    hp, src = hparams.resolve("rect", "llama", 30, 1536)  # SmolLM2-135M: lambda follows the MLP width
    assert hp["layers"] == [4, 5, 6, 7, 8] and hp["mom2_update_weight"] == pytest.approx(15000 * 1536 / 14336)
    assert "lambda x 1536/14336" in src["rule"]
    hp, _ = hparams.resolve("alphaedit", "qwen2", 24, 4864)
    assert hp["layers"] == [3, 4, 5, 6, 7] and hp["nullspace_threshold"] == 2e-2 and hp["mom2_update_weight"] == 15000
    hp, _ = hparams.resolve("ultraedit", "llama", 30, 1536)
    assert hp["modules"] == {"gate_proj": [10, 11, 12, 13, 14], "up_proj": [17, 18, 19, 20, 21, 22, 23]}
    assert hparams.resolve("ft_l", "qwen2", 28, 18944)[0]["layer"] == 27


def test_covariance_corpus_must_hold_ten_times_the_mlp_width(tiny, tmp_path):
    _, _, tok = tiny
    f = tmp_path / "short.txt"
    f.write_text("w5 w6 w7\n\nw8 w9")
    docs, name = cov.read_corpus(f)
    assert docs == ["w5 w6 w7", "w8 w9"]
    with pytest.raises(cov.CorpusError, match="fewer than 10x the MLP width"):
        cov.tokenize(tok, docs, None, 112, name)
    j = tmp_path / "wiki.jsonl"
    j.write_text(json.dumps({"text": "w1 w2"}) + "\n" + json.dumps({"title": "x"}) + "\n")
    with pytest.raises(cov.CorpusError, match="line 2"):
        cov.read_corpus(j)


# ----------------------------------------------------------------------------------------------
# The command line: every method's delta is scored by evaluate.py like edit.py's


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny Llama checkpoint on disk, an edit file, a covariance text and a cache dir."""
    from tiny import make_checkpoint

    d = tmp_path_factory.mktemp("tinyrun")
    ckpt = d / "ckpt"
    make_checkpoint(ckpt, "llama")
    (d / "edits.json").write_text(json.dumps([e.to_json() for e in edits(4)]))
    g = torch.Generator().manual_seed(7)
    docs = [" ".join(f"w{int(x)}" for x in torch.randint(3, 320, (60,), generator=g)) for _ in range(40)]
    (d / "cov.txt").write_text("\n\n".join(docs))
    return d


def run_cli(tiny_run, method, out, *extra):
    from baselines import run

    return run.main(["--method", method, "--ckpt", str(tiny_run / "ckpt"), "--edits", str(tiny_run / "edits.json"),
                     "--out", str(out), "--batch", "2", *(["--cov-text", str(tiny_run / "cov.txt"), "--cov-cache",
                                                           str(tiny_run / "cache")] if method in ("memit", "rect", "alphaedit") else []),
                     *extra])


@pytest.mark.parametrize("method", hparams.METHODS)
def test_every_method_writes_a_delta_that_evaluate_scores(tiny_run, tmp_path, method, one_thread, capsys):
    import evaluate
    from safetensors import safe_open

    out = tmp_path / method
    assert run_cli(tiny_run, method, out, "--eos") == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["delta.safetensors", "edits.jsonl", "train_log.json"] + (["state.safetensors"] if method in ("alphaedit", "ultraedit") else []))
    with safe_open(str(out / "delta.safetensors"), framework="pt") as sf:
        meta = sf.metadata()
    assert meta["method"] == method and meta["eos"] == "True" and json.loads(meta["hparams"])
    log = json.loads((out / "train_log.json").read_text())
    assert [b["edits"] for b in log["batches"]] == [[0, 2], [2, 4]]
    if method in ("memit", "rect", "alphaedit"):
        assert len(meta["corpus_sha256"]) == 64 and int(meta["corpus_tokens"]) >= 1120
    assert evaluate.main(["--ckpt", str(tiny_run / "ckpt"), "--delta", str(out / "delta.safetensors"),
                          "--edits", str(out / "edits.jsonl"), "--out", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["metrics"]["reliability (greedy EM)"]["n"] == 4


@pytest.mark.parametrize("method", ["alphaedit", "ultraedit"])
def test_a_run_killed_between_batches_resumes_to_the_same_delta(tiny_run, tmp_path, method, one_thread, monkeypatch):
    from safetensors.torch import load_file

    from baselines import run

    assert run_cli(tiny_run, method, tmp_path / "whole") == 0
    calls = {"n": 0}
    real = run.Method.edit_batch

    def dies_in_batch_two(self, start, end):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, start, end)

    monkeypatch.setattr(run.Method, "edit_batch", dies_in_batch_two)
    assert run_cli(tiny_run, method, tmp_path / "split") == 130
    assert (tmp_path / "split.partial" / "checkpoint.pt").is_file() and not (tmp_path / "split").exists()
    monkeypatch.setattr(run.Method, "edit_batch", real)
    assert run_cli(tiny_run, method, tmp_path / "split", "--resume") == 0
    for name in ("delta.safetensors", run.STATE):
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "split" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_gets_one_line_errors(tiny_run, tmp_path, capsys):
    bad = [e.to_json() for e in edits(2)]
    bad[1]["subject"] = "w999"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    from baselines import run

    code = run.main(["--method", "memit", "--ckpt", str(tiny_run / "ckpt"), "--edits", str(tmp_path / "bad.json"),
                     "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "record 1: subject 'w999' does not occur" in err
    assert run_cli(tiny_run, "memit", tmp_path / "o2", "--batch", "0") == 2
    assert "--batch must be positive" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("w5 w6 w7")
    assert run.main(["--method", "alphaedit", "--ckpt", str(tiny_run / "ckpt"), "--edits", str(tiny_run / "edits.json"),
                     "--out", str(tmp_path / "o3"), "--cov-text", str(short)]) == 2
    assert "fewer than 10x the MLP width" in capsys.readouterr().err
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())  # nothing half-written


def test_vs_rivals_scores_every_cell_once_and_keeps_them(tiny_run, tmp_path, one_thread):
    import importlib.util

    spec = importlib.util.spec_from_file_location("vs_rivals", ROOT / "experiments" / "vs_rivals.py")
    vs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vs)
    argv = ["--ckpt", str(tiny_run / "ckpt"), "--edits", str(tiny_run / "edits.json"), "--n", "4", "--batch", "2",
            "--methods", "locft_bf,ultraedit", "--harm", "none", "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "results")]
    vs.main(argv)
    name = "vs_rivals-ckpt-edits-4"
    rows = json.loads((tmp_path / "results" / f"{name}.json").read_text())["rows"]
    assert [(r["run"], r["EOS"]) for r in rows] == [("LocFT-BF", "yes"), ("UltraEdit", "no"), ("UltraEdit", "yes")]
    assert all(0 <= r["reliability"] <= 1 and r["harm"] is None is r["kl_per_token"] and r["s_per_edit"] > 0 for r in rows)
    table = (tmp_path / "results" / f"{name}.md").read_text()
    assert table.count("\n| ") == 4 and "rel (EM)" in table and "rel (TF)" in table
    assert (tmp_path / "results" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    before = {p.name: p.stat().st_mtime for p in (tmp_path / "work").glob("*.json")}
    vs.main(argv)  # every cell is done: nothing is edited or scored again
    assert {p.name: p.stat().st_mtime for p in (tmp_path / "work").glob("*.json")} == before


def test_a_hyperparameter_override_is_checked_and_recorded(tiny_run, tmp_path, one_thread, capsys):
    from safetensors import safe_open

    assert run_cli(tiny_run, "ultraedit", tmp_path / "bad", "--set", "lr=[1]") == 2
    assert "lr should be like 1e-06" in capsys.readouterr().err
    assert run_cli(tiny_run, "ultraedit", tmp_path / "ok", "--set", "lr=0.001") == 0
    with safe_open(str(tmp_path / "ok" / "delta.safetensors"), framework="pt") as sf:
        meta = sf.metadata()
    assert json.loads(meta["hparams"])["lr"] == 0.001 and json.loads(meta["hparams_source"])["overrides"] == {"lr": 0.001}


def test_the_core_never_imports_baselines():
    for p in ROOT.glob("*.py"):
        lines = p.read_text().splitlines()
        assert not any(line.lstrip().startswith(("import baselines", "from baselines")) for line in lines), p.name


@pytest.mark.parametrize("method", ["alphaedit", "ultraedit"])
def test_continuing_from_a_finished_run_equals_one_longer_run(tiny_run, tmp_path, method, one_thread):
    """--base-delta carries the weights and the lifelong state (AlphaEdit's Cp, UltraEdit's
    normaliser); templates and C0 stay the unedited model's."""
    from safetensors.torch import load_file

    records = json.loads((tiny_run / "edits.json").read_text())
    (tmp_path / "first.json").write_text(json.dumps(records[:2]))
    (tmp_path / "second.json").write_text(json.dumps(records[2:]))
    cov_flags = ["--cov-text", str(tiny_run / "cov.txt"), "--cov-cache", str(tiny_run / "cache")] if method == "alphaedit" else []
    from baselines import run

    def cli(edits_file, out, *extra):
        return run.main(["--method", method, "--ckpt", str(tiny_run / "ckpt"), "--edits", str(edits_file),
                         "--out", str(out), "--batch", "2", *cov_flags, *extra])

    assert cli(tiny_run / "edits.json", tmp_path / "whole") == 0
    assert cli(tmp_path / "first.json", tmp_path / "a") == 0
    assert cli(tmp_path / "second.json", tmp_path / "b", "--base-delta", str(tmp_path / "a" / "delta.safetensors")) == 0
    for name in ("delta.safetensors", run.STATE):
        whole, b = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "b" / name))
        assert whole.keys() == b.keys() and all(torch.equal(whole[k], b[k]) for k in whole)
