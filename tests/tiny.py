"""Tiny random Llama / Qwen2 / Mistral checkpoints built with transformers, for tests.

The tokenizer is word-level over "w3".."w319" plus <pad>=0, <s>=1, </s>=2, so a prompt such as
"w5 w17 w99" and an answer "w42 w43" tokenise one id per word.
"""
import torch
import transformers

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)

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
}
MODEL_CLS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def write_tokenizer(path, vocab_size=TINY["vocab_size"]):
    """A word-level tokenizer.json so the checkpoint directory is complete."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))


def make_checkpoint(tmp_path, variant, shard_size=None):
    torch.manual_seed(0)
    cfg = VARIANTS[variant]()
    hf = getattr(transformers, MODEL_CLS[cfg.model_type])(cfg).eval()
    hf.save_pretrained(tmp_path, **({"max_shard_size": shard_size} if shard_size else {}))
    write_tokenizer(tmp_path)
    return hf

