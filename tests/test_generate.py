"""generate.py: the fast decoder gives the reference decoder's tokens; rows stop where they should."""
import pytest
import torch

import generate as G
import model as M


PROMPTS = [" ".join(f"w{3 + (i * 7 + j * 13) % 300}" for j in range(1 + i % 6)) for i in range(12)]


def one_row_no_cache(model, tok, prompt, max_new, stop_ids):
    """The plainest greedy decoder: one row, the whole sequence every step."""
    x = torch.tensor([tok.encode(prompt)])
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            t = model(x, logits_at="last").argmax(-1).item()
            out.append(t)
            if t in stop_ids:
                break
            x = torch.cat([x, torch.tensor([[t]])], 1)
    return out


def test_reference_decoder_matches_one_row_without_cache(tiny):
    _, model, tok = tiny
    got = G.greedy_reference(model, tok, PROMPTS, max_new_tokens=12, stop=())
    assert got == [one_row_no_cache(model, tok, p, 12, tok.eos_ids) for p in PROMPTS]


@pytest.mark.parametrize("batch_size", [64, 5, 3, 1])
def test_fast_decoder_gives_the_reference_tokens(tiny, batch_size):
    _, model, tok = tiny
    ref = G.greedy_reference(model, tok, PROMPTS, max_new_tokens=12, stop=())
    assert G.greedy(model, tok, PROMPTS, max_new_tokens=12, stop=(), batch_size=batch_size) == ref


@pytest.mark.parametrize("batch_size", [64, 3])
def test_a_shared_prefix_read_once_gives_the_reference_tokens(tiny, batch_size):
    """Few-shot prompts: the tokens every prompt begins with are prefilled once and each batch
    starts from that cache; the new tokens are the reference decoder's."""
    _, model, tok = tiny
    shots = " ".join(f"w{40 + j}" for j in range(20))
    prompts = [shots + " " + p for p in PROMPTS] + [shots]  # one prompt is the prefix alone
    assert G.common_prefix([tok.encode(p) for p in prompts]) == 20
    ref = G.greedy_reference(model, tok, prompts, max_new_tokens=12, stop=())
    got = G.greedy(model, tok, prompts, max_new_tokens=12, stop=(), batch_size=batch_size, share_prefix=True)
    assert got == ref


def test_rows_stop_independently_and_the_fast_decoder_agrees(tiny, monkeypatch):
    """Make common tokens EOS: rows finish at different steps and leave the live set early."""
    _, model, tok = tiny
    free = G.greedy(model, tok, PROMPTS, max_new_tokens=12, stop=())
    eos = torch.bincount(torch.tensor([t for g in free for t in g[1:]])).topk(3).indices.tolist()
    monkeypatch.setattr(tok, "eos_ids", eos)
    ref = G.greedy_reference(model, tok, PROMPTS, max_new_tokens=12, stop=())
    assert len({len(g) for g in ref}) > 2  # rows really stopped at different steps
    assert ref == [one_row_no_cache(model, tok, p, 12, eos) for p in PROMPTS]
    for bs in (64, 4):
        assert G.greedy(model, tok, PROMPTS, max_new_tokens=12, stop=(), batch_size=bs) == ref


def test_a_stop_string_spanning_tokens_stops_the_row(tiny):
    """Stop strings are matched in the decoded text, so one made of two tokens works too."""
    _, model, tok = tiny
    free = G.greedy(model, tok, PROMPTS[:6], max_new_tokens=10, stop=())
    row = free[0]
    two = tok.decode(row[3:5])  # tokens 4 and 5 of row 0, as one stop string
    got = G.greedy(model, tok, PROMPTS[:6], max_new_tokens=10, stop=(two,), batch_size=2)
    first = min(i for i, g in enumerate(row) if two in tok.decode(row[:i + 1]))
    assert got[0] == row[:first + 1]
    assert got == G.greedy_reference(model, tok, PROMPTS[:6], max_new_tokens=10, stop=(two,))
    text = tok.decode(got[0])
    assert G.cut_at_stop(text, (two,)) == text[:text.find(two)].strip()


@pytest.mark.parametrize("text, answer", [
    (" Paris. It is the capital", "Paris"),
    (" Paris\nQuestion: next", "Paris"),
    (" Paris", "Paris"),
    (".", ""),
    ("\n Paris", ""),
    (" 3.5 km", "3"),  # the authors' rule: "." stops, even inside a number
    (" Rome, Italy\n.", "Rome, Italy"),
    ("", ""),
])
def test_cut_at_stop(text, answer):
    assert G.cut_at_stop(text) == answer


def test_rows_stop_at_a_token_whose_text_has_a_period_or_newline(tiny, tmp_path):
    """A tokenizer in which some tokens decode to "." or "x\\ny": generation stops right there,
    and the answer is the text before it."""
    d, model, tok = tiny
    free = G.greedy(model, tok, PROMPTS[:6], max_new_tokens=8)
    dot, newline = free[0][2], free[1][3]  # tokens these rows produce mid-way
    assert dot != newline and dot not in free[0][:2] and newline not in free[1][:3]
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 320)}}
    inv = {i: w for w, i in vocab.items()}
    inv[dot], inv[newline] = ".", "x\ny"
    t = Tokenizer(models.WordLevel({w: i for i, w in inv.items()}, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.save(str(tmp_path / "tokenizer.json"))
    for f in ("config.json", "generation_config.json"):
        if (d / f).exists():
            (tmp_path / f).write_text((d / f).read_text())
    tok2 = M.Tokenizer(tmp_path, model.args)
    assert tok2.decode([dot]) == "."
    got = G.greedy(model, tok2, PROMPTS[:6], max_new_tokens=8)
    assert got[0] == free[0][:3] and got[1] == free[1][:4]
    assert G.cut_at_stop(tok2.decode(got[0])) == tok2.decode(free[0][:2])
    assert G.cut_at_stop(tok2.decode(got[1])) == tok2.decode(free[1][:3]) + " x"  # cut inside the token
