"""Tiny random Llama / Qwen2 / Qwen3 / Qwen2-MoE / Mistral checkpoints built with transformers, for
tests.

The tokenizer is word-level over "w3".."w319" plus <pad>=0, <s>=1, </s>=2, so a prompt such as
"w5 w17 w99" and an answer "w42 w43" tokenise one id per word.
"""
import torch
import transformers

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)

MOE = dict(TINY, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=48, rope_theta=1e6)

VARIANTS = {
    "llama": lambda: transformers.LlamaConfig(**TINY, rope_theta=10000.0),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, rope_theta=1e6, tie_word_embeddings=True),
    # a window shorter than the test sequences, so the sliding-window mask is exercised
    "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=6),
    "llama3.1-rope": lambda: transformers.LlamaConfig(
        **TINY, rope_theta=500000.0, head_dim=32,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "llama-bias": lambda: transformers.LlamaConfig(**TINY, attention_bias=True),
    # head_dim 24 is not hidden / heads (16): q/k norm and RoPE run over the config's head_dim
    "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=24, rope_theta=1e6, tie_word_embeddings=True),
    # layers 0 and 1 sparse, layer 2 dense through mlp_only_layers (decoder_sparse_step 1)
    "qwen2-moe": lambda: transformers.Qwen2MoeConfig(**MOE, mlp_only_layers=[2]),
    # layer 1 sparse, 0 and 2 dense through decoder_sparse_step; renormalised top-k weights
    "qwen2-moe-step": lambda: transformers.Qwen2MoeConfig(**MOE, decoder_sparse_step=2, norm_topk_prob=True),
}
MODEL_CLS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
             "qwen3": "Qwen3ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


def write_tokenizer(path, vocab_size=TINY["vocab_size"]):
    """A word-level tokenizer.json so the checkpoint directory is complete."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])  # so decoding skips them, as a real tokenizer does
    tok.save(str(path / "tokenizer.json"))


def make_checkpoint(tmp_path, variant, shard_size=None):
    torch.manual_seed(0)
    cfg = VARIANTS[variant]()
    hf = getattr(transformers, MODEL_CLS[cfg.model_type])(cfg).eval()
    spread_router(hf)
    hf.save_pretrained(tmp_path, **({"max_shard_size": shard_size} if shard_size else {}))
    write_tokenizer(tmp_path)
    return hf


@torch.no_grad()
def spread_router(hf, std=0.3):
    """Router weights large enough that the top-k choice has clear margins: with the default
    0.02 std the router probabilities are all near 1/E, and a last-bit difference between two
    implementations could flip a choice."""
    for name, p in hf.named_parameters():
        if name.endswith("mlp.gate.weight"):
            p.normal_(0, std)
