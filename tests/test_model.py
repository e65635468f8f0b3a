"""model.py against transformers: tiny random Llama / Qwen2 / Qwen3 / Qwen2-MoE / Mistral checkpoints
built here."""
import json

import pytest
import torch

import model as M

import transformers  # noqa: E402  the oracle

from tiny import TINY, VARIANTS, make_checkpoint, write_tokenizer  # noqa: E402


def padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [13, 9, 5]
    ids = torch.randint(3, TINY["vocab_size"], (3, 13), generator=g)
    mask = torch.zeros(3, 13, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids, mask


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_transformers_on_padded_batch(tmp_path, variant, side):
    hf = make_checkpoint(tmp_path, variant)
    ours, _ = M.load(tmp_path, dtype="float32")
    ids, mask = padded_batch()
    if side == "left":
        mask = mask.flip(1)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    diff = (ref[real] - got[real]).abs().max().item()
    print(f"{variant} {side}-padded max |logit diff| = {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("variant", ["llama", "qwen2", "mistral", "llama3.1-rope", "qwen3", "qwen2-moe"])
def test_greedy_generation_matches_generate(tmp_path, variant):
    hf = make_checkpoint(tmp_path, variant)
    ours, _ = M.load(tmp_path, dtype="float32")
    prompt = torch.tensor([[1, 17, 42, 99, 7, 250, 31]])
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                          do_sample=False, eos_token_id=None, pad_token_id=0)[0, prompt.shape[1]:]
        # incremental decoding through our KV cache
        cache = ours.new_cache(1, prompt.shape[1] + 20)
        nxt = ours(prompt, cache=cache, logits_at="last").argmax(-1)
        out, pos = [nxt.item()], prompt.shape[1]
        for _ in range(19):
            nxt = ours(nxt[:, None], cache=cache, cache_pos=pos, logits_at="last").argmax(-1)
            out.append(nxt.item())
            pos += 1
    assert out == ref.tolist()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_moe_routing_ties_and_no_token_dropping_match_transformers(tmp_path, norm_topk_prob):
    """Router rows built so that experts tie exactly: layer 0's rows are all zero, so every token
    ties over all experts and all go to the same k experts (a capacity limit would drop most of
    them); layer 1's rows are r, 0, 0, 0, 0, 0, so every token has a tie across the top-k
    boundary. Which tied expert wins is torch.topk's choice in both."""
    torch.manual_seed(0)
    cfg = VARIANTS["qwen2-moe"]()
    cfg.norm_topk_prob = norm_topk_prob
    hf = transformers.Qwen2MoeForCausalLM(cfg).eval()
    r = torch.randn(TINY["hidden_size"]) * 0.3
    with torch.no_grad():
        # zero rows give logits of exactly 0 on any CPU (identical non-zero rows can differ in the
        # last bit, by the column a matmul kernel puts them in): layer 0 ties all experts, layer 1
        # ties experts 1..5, so the k-th choice of every token is a tie
        hf.model.layers[0].mlp.gate.weight.zero_()
        hf.model.layers[1].mlp.gate.weight.copy_(torch.tensor([1.0, 0, 0, 0, 0, 0])[:, None] * r)
    hf.save_pretrained(tmp_path)
    write_tokenizer(tmp_path)
    ours, _ = M.load(tmp_path, dtype="float32")
    probs = {}

    def keep(i):  # a hook that records the router's probabilities and leaves its output alone
        def hook(module, inputs, logits):
            probs[i] = logits.softmax(-1)
        return hook

    for i in (0, 1):
        ours.layers[i].mlp.gate.register_forward_hook(keep(i))
    ids, mask = padded_batch(3)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    k = cfg.num_experts_per_tok
    assert len(probs[0]) == ids.numel() and (probs[0] == probs[0][:, :1]).all()  # all tokens, all experts tie
    chosen0 = probs[0].topk(k, dim=-1).indices
    assert (chosen0 == chosen0[0]).all()  # so every token goes to the same k experts
    p1 = probs[1].sort(-1, descending=True).values
    assert (p1[:, k - 1] == p1[:, k]).all()  # every token: a tie that top-k must break
    diff = (ref - got)[mask.bool()].abs().max().item()
    print(f"qwen2-moe ties (norm_topk_prob={norm_topk_prob}) max |logit diff| = {diff:.2e}")
    assert diff < 1e-4


def test_left_padded_cached_decoding_matches_unpadded(tmp_path):
    """Batched generation with left padding: every row decodes as it would alone."""
    make_checkpoint(tmp_path, "qwen2")
    ours, _ = M.load(tmp_path, dtype="float32")
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14]]
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    steps = 8
    with torch.no_grad():
        cache = ours.new_cache(3, T + steps)
        nxt = ours(ids, attention_mask=mask, cache=cache, logits_at="last").argmax(-1)
        batch_out = [nxt]
        for i in range(steps - 1):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
            nxt = ours(nxt[:, None], attention_mask=mask, cache=cache, cache_pos=T + i, logits_at="last").argmax(-1)
            batch_out.append(nxt)
        batch_out = torch.stack(batch_out, 1)
        for row, p in enumerate(prompts):
            x = torch.tensor([p])
            for _ in range(steps):
                x = torch.cat([x, ours(x, logits_at="last").argmax(-1, keepdim=True)], 1)
            assert x[0, len(p):].tolist() == batch_out[row].tolist()


def test_two_shard_checkpoint_loads(tmp_path):
    hf = make_checkpoint(tmp_path, "llama", shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    ours, _ = M.load(tmp_path, dtype="float32")
    ids, mask = padded_batch(1)
    with torch.no_grad():
        diff = (hf(input_ids=ids, attention_mask=mask).logits - ours(ids, attention_mask=mask))[mask.bool()]
    assert diff.abs().max().item() < 1e-4


def test_hidden_states_and_forward_from_compose(tmp_path):
    """Layers 0..L-1 then L..end, head only at chosen positions, equals the full forward."""
    make_checkpoint(tmp_path, "llama")
    ours, _ = M.load(tmp_path, dtype="float32")
    ids, mask = padded_batch(2)
    with torch.no_grad():
        full = ours(ids, attention_mask=mask)
        h = ours.hidden_states(ids, layer=2, attention_mask=mask)
        part = ours.forward_from(h, layer=2, attention_mask=mask, logits_at=mask.bool())
    torch.testing.assert_close(part, full[mask.bool()], rtol=0, atol=1e-5)


def test_config_spellings_old_and_new_agree():
    new = dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
               intermediate_size=128, vocab_size=100, dtype="bfloat16",
               rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192})
    old = dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
               intermediate_size=128, vocab_size=100, torch_dtype="bfloat16", rope_theta=500000.0,
               rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    a, b = M.ModelArgs.from_config(new), M.ModelArgs.from_config(old)
    assert a.rope_theta == b.rope_theta == 500000.0 and a.torch_dtype == b.torch_dtype == "bfloat16"
    torch.testing.assert_close(M.precompute_inv_freq(a), M.precompute_inv_freq(b))


# -- broken checkpoints: one line naming the file and the problem ------------------------------

def broken(tmp_path, how):
    make_checkpoint(tmp_path, "llama")
    cfg_path = tmp_path / "config.json"
    if how == "no-config":
        cfg_path.unlink()
    elif how == "model-type":
        cfg = json.loads(cfg_path.read_text())
        cfg["model_type"] = "gpt2"
        cfg_path.write_text(json.dumps(cfg))
    elif how in ("missing-tensor", "wrong-shape"):
        from safetensors.torch import load_file, save_file

        sd = load_file(tmp_path / "model.safetensors")
        if how == "missing-tensor":
            del sd["model.layers.1.mlp.down_proj.weight"]
        else:
            sd["model.norm.weight"] = torch.ones(65)
        save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    elif how == "bin-only":
        (tmp_path / "model.safetensors").unlink()
        (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")


@pytest.mark.parametrize("how,words", [
    ("no-config", ["config.json", "missing"]),
    ("model-type", ["config.json", "gpt2", "not supported"]),
    ("missing-tensor", ["model.layers.1.mlp.down_proj.weight", "missing"]),
    ("wrong-shape", ["model.safetensors", "model.norm.weight", "(65,)", "(64,)"]),
    ("bin-only", [".bin", "safetensors"]),
])
def test_broken_checkpoint_gives_one_clear_line(tmp_path, how, words):
    broken(tmp_path, how)
    with pytest.raises(M.CheckpointError) as e:
        M.load(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


QWEN3 = {**TINY, "model_type": "qwen3", "head_dim": 24}
MOE = {**TINY, "model_type": "qwen2_moe", "num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
       "shared_expert_intermediate_size": 48}


@pytest.mark.parametrize("cfg,words", [
    ({**MOE, "use_sliding_window": True, "sliding_window": 8}, ["use_sliding_window", "qwen2_moe"]),
    ({**TINY, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8}, ["use_sliding_window", "qwen2"]),
    ({**QWEN3, "use_sliding_window": True, "sliding_window": 8}, ["use_sliding_window", "qwen3"]),
    ({**QWEN3, "layer_types": ["full_attention", "sliding_attention", "full_attention"]}, ["layer_types"]),
    ({**MOE, "hidden_act": "gelu"}, ["hidden_act", "gelu"]),
    ({**MOE, "num_experts_per_tok": 7}, ["num_experts_per_tok", "num_experts (6)"]),
    ({**MOE, "decoder_sparse_step": 0}, ["decoder_sparse_step"]),
    ({k: v for k, v in MOE.items() if k != "moe_intermediate_size"}, ["moe_intermediate_size", "missing"]),
    ({k: v for k, v in QWEN3.items() if k != "head_dim"}, ["head_dim", "missing"]),
], ids=["moe-window", "qwen2-window", "qwen3-window", "layer-types", "hidden-act", "top-k", "sparse-step", "moe-size", "head-dim"])
def test_unsupported_qwen_options_are_refused_in_one_line(tmp_path, cfg, words):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(M.CheckpointError) as e:
        M.read_args(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / "config.json"))
    for w in words:
        assert w in msg


def test_released_qwen_configs_are_accepted():
    """What the released configs spell: a window set but unused, all-full layer_types; and the
    training-only router loss switched on, which changes nothing in the forward pass."""
    full = ["full_attention"] * 3
    a = M.ModelArgs.from_config({**QWEN3, "use_sliding_window": False, "sliding_window": None, "layer_types": full,
                                 "max_window_layers": 28})
    assert a.qk_norm and a.head_dim == 24 and a.sliding_window is None and not a.qkv_bias
    b = M.ModelArgs.from_config({**MOE, "use_sliding_window": False, "sliding_window": 4096, "output_router_logits": True,
                                 "decoder_sparse_step": 1, "mlp_only_layers": [1]})
    assert b.moe_layers == [0, 2] and b.sliding_window is None and b.qkv_bias and not b.o_bias
    assert not M.ModelArgs.from_config({**MOE, "qkv_bias": False}).qkv_bias  # transformers 5 spells it out


# -- the real default model, converted from PyPI -------------------------------------------------

def test_converted_smollm2_matches_transformers_and_talks(smollm2_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ours, tok = M.load(smollm2_dir, dtype="float32")
    texts = ["The capital of France is", "def add(a, b):\n    return", "Water boils at 100 degrees"]
    enc = [tok.encode(t) for t in texts]
    T = max(map(len, enc))
    ids = torch.tensor([e + [tok.pad_id] * (T - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (T - len(e)) for e in enc])
    with torch.no_grad():
        diff = (hf(input_ids=ids, attention_mask=mask).logits - ours(ids, attention_mask=mask))[mask.bool()]
        print(f"smollm2-135m max |logit diff| = {diff.abs().max().item():.2e}")
        assert diff.abs().max().item() < 1e-3  # 30 layers of fp32 on logits of magnitude ~30
        x = torch.tensor([tok.encode("The capital of France is")])
        for _ in range(8):
            x = torch.cat([x, ours(x, logits_at="last").argmax(-1, keepdim=True)], 1)
    assert "Paris" in tok.decode(x[0])
