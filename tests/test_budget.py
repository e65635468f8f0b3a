"""The step budget (budget.py) and the learnt report (learnt.py): the report agrees with greedy
generation, each stopping rule stops where its definition says, and --authors-budget runs
exactly the LocFT authors' 25 epochs of batch 100."""
from types import SimpleNamespace

import pytest

import budget
import data
import edit
import generate
import learnt
import model as model_lib
import preflight
from test_edit import ckpt, random_edits, sharp_model, write_edits  # noqa: F401 (ckpt: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models lose a lot to threads on busy cores


def epochs_of(losses, learnt_counts):
    return [{"epoch": i + 1, "mean_loss": x, "learnt": k} for i, (x, k) in enumerate(zip(losses, learnt_counts))]


def stops_at(losses, learnt_counts, patience=3, min_gain=0.1, cap=100):
    hp = SimpleNamespace(patience=patience, min_gain=min_gain, epochs=cap)
    ep = epochs_of(losses, learnt_counts)
    return next(((i + 1, why) for i in range(len(ep)) if (why := budget.stop(ep[:i + 1], hp, 1e-2))), (None, None))


def test_early_stop_comes_first_when_the_loss_is_below_the_stop_loss():
    assert stops_at([1.0, 0.5, 0.009, 0.001], [0, 1, 2, 3]) == (3, "early stop: mean loss below 0.01")


def test_plateau_stops_after_patience_epochs_without_a_new_edit_or_enough_loss_gain():
    # best before the last 3 epochs: loss 0.30, 9 learnt. Epochs 5-7 learn none beyond 9 and
    # reach 0.28 > 0.9 x 0.30 = 0.27: a plateau after epoch 7, not before.
    losses = [1.0, 0.5, 0.35, 0.30, 0.29, 0.285, 0.28, 0.2]
    counts = [0, 5, 8, 9, 9, 8, 9, 9]
    n, why = stops_at(losses, counts)
    assert n == 7 and why.startswith("plateau")
    assert stops_at(losses, counts, min_gain=0.05)[0] is None  # 0.28 < 0.95 x 0.30: the loss still falls enough
    assert stops_at(losses, counts, patience=0)[0] is None  # patience 0: no plateau stop, ever


def test_a_new_edit_learnt_or_a_loss_cut_resets_the_plateau():
    flat_loss, more_learnt = [1.0, 0.5] + [0.5] * 6, [0, 1, 2, 3, 4, 5, 6, 7]
    assert stops_at(flat_loss, more_learnt)[0] is None  # the loss is flat, but every epoch learns an edit
    falling, same = [1.0 * 0.8 ** i for i in range(8)], [3] * 8
    assert stops_at(falling, same)[0] is None  # no new edit, but the loss falls 20% an epoch
    assert stops_at(falling, same, min_gain=0.5)[0] == 4  # 0.8^3 = 0.51 > 0.5 x 1.0: a plateau at epoch 4


def test_the_cap_stops_last():
    assert stops_at([1.0 * 0.5 ** i for i in range(6)], range(6), cap=5) == (5, "epoch cap: 5 epochs")


def test_learnt_report_agrees_with_greedy_generation(ckpt):  # noqa: F811
    """Half-trained, some edits are learnt and some are not; an edit is learnt exactly when greedy
    decoding from its prompt yields its answer tokens and EOS."""
    m, tok = sharp_model(ckpt)
    edits = random_edits(16, seed=5)
    hp = edit.Hparams(layer=1, lr=2e-2, epochs=3, batch_size=4)
    lines = []
    trained, log = edit.edit(m, tok, edits, hp, say=lines.append)
    flags = [i not in {x["edit"] for x in log["learnt"]["not_learnt"]} for i in range(len(edits))]
    assert 0 < sum(flags) < len(edits)  # a mix, or the test would prove nothing
    said = lines.index(f"learnt {sum(flags)} of 16 edits (teacher-forced: every answer token and EOS is the argmax)")
    missed = log["learnt"]["not_learnt"]
    assert [x.startswith("  not learnt: ") for x in lines[said + 1:said + 1 + learnt.EXAMPLES]] == [True] * learnt.EXAMPLES
    assert lines[said + 1 + learnt.EXAMPLES] == f"  ... and {len(missed) - learnt.EXAMPLES} more (train_log.json: learnt.not_learnt)"
    assert all(x["predicted"] != x["target"] for x in missed)
    m.load_tensors(trained)
    for e, ok in zip(edits, flags):
        ids, n_prompt = data.encode_edit(tok, e.prompt, e.target)
        out = generate.greedy(m, tok, [e.prompt], max_new_tokens=len(ids) - n_prompt, stop=())[0]
        assert (out == ids[n_prompt:]) == ok, (e, out, ids[n_prompt:])


def test_per_epoch_learnt_counts_come_from_the_training_forward(ckpt):  # noqa: F811
    """Every epoch logs how many sequences were learnt when their batch came; once training
    has converged, every edit is learnt and the final report says so."""
    m, tok = sharp_model(ckpt)
    edits = random_edits(8, seed=3)
    _, log = edit.edit(m, tok, edits, edit.Hparams(layer=2, epochs=60, lr=3e-2), say=lambda s: None)
    counts = [e["learnt"] for e in log["epochs"]]
    assert counts[0] == 0 and counts[-1] == 8 and all(0 <= c <= 8 for c in counts)
    assert log["learnt"] == {"learnt": 8, "edits": 8, "not_learnt": []}
    assert log["stop"].startswith("early stop")


def test_authors_budget_is_25_epochs_of_batch_100_without_a_plateau_stop(ckpt, tmp_path):  # noqa: F811
    edits_file = write_edits(tmp_path / "e.jsonl", random_edits(150, seed=2))
    args = preflight.parse_args(["--ckpt", str(ckpt), "--edits", str(edits_file), "--authors-budget", "--lr", "1e-6"],
                                edit.Hparams())
    assert (args.epochs, args.batch_size, args.patience) == (25, 100, 0)
    m, tok = model_lib.load(ckpt)
    hp = edit.Hparams(layer=1, epochs=args.epochs, batch_size=args.batch_size, patience=args.patience, lr=args.lr)
    lines = []
    _, log = edit.edit(m, tok, data.load_edits(edits_file), hp, say=lines.append)
    assert [e["steps"] + e["skipped"] for e in log["epochs"]] == [2] * 25  # 100 + 50 edits, every epoch
    assert log["batch_size"] == 100 and log["stop"] == "epoch cap: 25 epochs"
    assert lines[-1].startswith(f"stopped at the epoch cap with {150 - log['learnt']['learnt']} of 150 edits not learnt: raise --epochs")
    # the same nearly frozen run under a plateau rule stops once nothing moves
    _, log = edit.edit(m, tok, data.load_edits(edits_file), edit.Hparams(layer=1, lr=1e-6, patience=3), say=lambda s: None)
    assert log["stop"].startswith("plateau") and log["epochs_run"] < 25


@pytest.mark.parametrize("flag, value", [("--patience", "-1"), ("--min-gain", "1"), ("--min-gain", "-0.1")])
def test_budget_flags_are_checked(ckpt, tmp_path, capsys, flag, value):  # noqa: F811
    edits_file = write_edits(tmp_path / "e.jsonl", random_edits(3))
    rc = edit.main(["--ckpt", str(ckpt), "--edits", str(edits_file), flag, value, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and flag in err and len(err.strip().splitlines()) == 1
