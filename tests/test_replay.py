"""The edited pass started at the edited layer (replay.py) against the whole model: the same
scores item by item, the same held-out drift, and the layers below the edit not run."""
import pytest
import torch

import capability as C
from replay import Replay, first_layer
from test_capability import write_docs


def test_first_layer():
    assert first_layer(["model.layers.22.mlp.down_proj.weight"], 30) == 22
    assert first_layer(["model.layers.7.mlp.up_proj.weight", "model.layers.12.mlp.down_proj.weight"], 30) == 7
    assert first_layer(["model.embed_tokens.weight", "model.layers.5.self_attn.q_proj.weight"], 30) == 0
    assert first_layer(["lm_head.weight"], 30) == 30 and first_layer(["model.norm.weight"], 30) == 30


@pytest.mark.parametrize("layer", [1, 2])
def test_replayed_scores_equal_the_whole_model(tiny, tmp_path, layer):
    """Multiple choice (the shared-prefix path), a single continuation and held-out text: every
    item's log-likelihood, every metric and the KL are what the whole model gives, and no layer
    below the edit runs in the edited pass."""
    _, model, tok = tiny
    write_docs(tmp_path, ["arc_easy", "piqa", "lambada"])
    name = f"model.layers.{layer}.mlp.down_proj.weight"
    original = dict(model.named_parameters())[name].detach().clone()
    edited = {name: original + 0.3}
    spec = C.resolve("arc_easy,piqa,lambada,lambada_text")
    slow = C.before_after(model, tok, spec, {name: original}, edited, data_dir=tmp_path, say=lambda *_: None,
                          replay=False)
    cache = {}
    fast = C.before_after(model, tok, spec, {name: original}, edited, data_dir=tmp_path, say=lambda *_: None,
                          base_cache=cache)
    calls = []
    hook = model.model.layers[0].register_forward_hook(lambda *_: calls.append(1))
    try:  # base results and kept states from the cache: only the edited pass runs, from the edit up
        again = C.before_after(model, tok, spec[:-1], {name: original}, edited, data_dir=tmp_path,
                               say=lambda *_: None, base_cache=cache)
    finally:
        hook.remove()
        model.load_tensors({name: original})
    assert calls == []
    for task in ("arc_easy", "piqa", "lambada"):
        assert fast["tasks"][task]["metrics"] == slow["tasks"][task]["metrics"]
        assert again["tasks"][task]["metrics"] == slow["tasks"][task]["metrics"]
    assert fast["tasks"]["lambada_text"]["metrics"] == slow["tasks"]["lambada_text"]["metrics"]
    assert slow["tasks"]["lambada_text"]["metrics"]["kl_per_token"]["edited"] > 0


def test_replay_refuses_other_calls(tiny):
    _, model, tok = tiny
    r = Replay(model, 1).record()
    with torch.inference_mode():
        a = r(torch.tensor([[5, 6, 7]]), logits_at="last")
        r(torch.tensor([[5, 6, 7, 8]]))
        b = r.replay()(torch.tensor([[5, 6, 7]]), logits_at="last")
        assert torch.equal(a, b)
        with pytest.raises(RuntimeError, match="call 1 reads other tokens"):
            r.replay()
            r(torch.tensor([[5, 6, 7]]))
            r(torch.tensor([[5, 6, 7, 9]]))


def test_base_cache_on_disk(tiny, tmp_path):
    """A later process (a new BaseCache on the same directory) reads the base results and the
    kept states from disk, scores the same, and runs no layer below the edit; other base weights
    find nothing there."""
    from basecache import BaseCache
    _, model, tok = tiny
    write_docs(tmp_path, ["arc_easy", "lambada"])
    name = "model.layers.2.mlp.down_proj.weight"
    original = dict(model.named_parameters())[name].detach().clone()
    edited = {name: original + 0.3}
    spec = ["arc_easy", "lambada"]
    args = dict(data_dir=tmp_path, say=lambda *_: None)
    first = C.before_after(model, tok, spec, {name: original}, edited, base_cache=BaseCache(tmp_path / "c", model),
                           **args)
    model.load_tensors({name: original})
    assert len(list((tmp_path / "c").glob("*.json"))) == 2 and len(list((tmp_path / "c").glob("*.safetensors"))) == 2
    calls = []
    hook = model.model.layers[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        second = C.before_after(model, tok, spec, {name: original}, edited,
                                base_cache=BaseCache(tmp_path / "c", model), **args)
    finally:
        hook.remove()
        model.load_tensors({name: original})
    assert calls == [] and second["tasks"]["arc_easy"]["metrics"] == first["tasks"]["arc_easy"]["metrics"]
    assert second["tasks"]["lambada"]["metrics"] == first["tasks"]["lambada"]["metrics"]
    model.load_tensors(edited)  # another base: a miss
    other = BaseCache(tmp_path / "c", model)
    model.load_tensors({name: original})
    same = BaseCache(tmp_path / "c", model)
    assert other.stamp != same.stamp
    keys = [(t, C.digest([C.load_docs(t, None, tmp_path), 32, 16])) for t in spec]
    assert all(k in same for k in keys) and not any(k in other for k in keys)


def test_code_digest_ignores_comments_and_docstrings_only():
    from basecache import code_digest
    a = 'def f(x):\n    """Doc."""\n    return x + 1  # one\n'
    assert code_digest(a) == code_digest('def f(x):\n    """Other doc."""\n    # two\n    return x + 1\n')
    assert code_digest(a) == code_digest('def f(x):\n    return x + 1\n')
    assert code_digest(a) != code_digest('def f(x):\n    return x + 2\n')
