"""A pure-PyTorch Llama / Qwen2 / Qwen3 / Qwen2-MoE / Mistral decoder that loads Hugging Face
checkpoints.

Module and parameter names are identical to the checkpoint's (`model.layers.22.mlp.down_proj`),
so a tensor named in a paper, a config or a delta file means the same thing here and in
transformers. The forward pass is split so the edit loop can start at any layer:

    h = model.hidden_states(ids, layer=L)        # run layers 0..L-1 once, keep h
    logits = model.forward_from(h, layer=L, logits_at=target_mask)   # layers L.., head at targets

and the evaluator can decode incrementally with a `KVCache`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer import CheckpointError, Tokenizer, read_json

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen2_moe", "mistral")


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    dim: int  # hidden_size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": ...} or None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 (always) and Llama with attention_bias
    o_bias: bool = False  # Llama with attention_bias
    mlp_bias: bool = False
    sliding_window: int | None = None
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's queries and keys
    # Qwen2-MoE: the layers whose MLP is a sparse mixture of experts, and its sizes
    moe_layers: list[int] = field(default_factory=list)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = False
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    torch_dtype: str = "float32"

    @classmethod
    def from_config(cls, cfg: dict, path: str = "config.json") -> "ModelArgs":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{path}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        sizes = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")
        for key in sizes + ("num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = cfg.get(key)
            if v is None and key in sizes:
                raise CheckpointError(f"{path}: required field {key!r} is missing")
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise CheckpointError(f"{path}: field {key!r} should be a positive whole number, got {v!r}")
        dim, n_heads, n_layers, inter, vocab = (cfg[k] for k in sizes)
        for key in ("rms_norm_eps", "rope_theta"):
            if key in cfg and (isinstance(cfg[key], bool) or not isinstance(cfg[key], (int, float))):
                raise CheckpointError(f"{path}: field {key!r} should be a number, got {cfg[key]!r}")
        # transformers >= 4.5x moved rope_theta / rope_scaling into `rope_parameters`.
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind not in ("default", "linear", "llama3"):
                raise CheckpointError(f"{path}: rope_scaling type {kind!r} is not supported (default, linear, llama3)")
            scaling = None if kind == "default" else {**scaling, "rope_type": kind}
        eos = cfg.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if cfg.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{path}: hidden_act {cfg['hidden_act']!r} is not supported (silu only)")
        # The Qwen configs carry a sliding_window but only use it when use_sliding_window is true
        # (false for every released Qwen2/2.5/3 and Qwen1.5-MoE model); Mistral uses it whenever set.
        window = cfg.get("sliding_window")
        if model_type.startswith("qwen") and not cfg.get("use_sliding_window", False):
            window = None
        if model_type in ("qwen2", "qwen3", "qwen2_moe"):
            # Their windows apply to some layers only (by max_window_layers / layer_types); refused
            # rather than applied to every layer.
            if cfg.get("use_sliding_window", False):
                raise CheckpointError(f"{path}: use_sliding_window true is not supported for {model_type}")
            kinds = set(cfg.get("layer_types") or ["full_attention"])
            if kinds != {"full_attention"}:
                raise CheckpointError(f"{path}: layer_types {sorted(kinds)} is not supported (full_attention only)")
        # q/k/v biases: always in Qwen2, by `qkv_bias` (default true) in Qwen2-MoE, by
        # attention_bias elsewhere (Llama, Qwen3); an o_proj bias never in the Qwen2 families
        attention_bias = bool(cfg.get("attention_bias", False))
        if model_type == "qwen2":
            qkv_bias = True
        elif model_type == "qwen2_moe":
            qkv_bias = bool(cfg.get("qkv_bias", True))
        else:
            qkv_bias = attention_bias
        o_bias = attention_bias and model_type not in ("qwen2", "qwen2_moe")
        moe = moe_fields(cfg, n_layers, path) if model_type == "qwen2_moe" else {}
        if model_type == "qwen3" and "head_dim" not in cfg:  # transformers' default is 128, not dim // heads
            raise CheckpointError(f"{path}: required field 'head_dim' is missing")
        return cls(
            model_type=model_type,
            vocab_size=vocab,
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or dim // n_heads,
            intermediate_size=inter,
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=window,
            qk_norm=model_type == "qwen3",
            **moe,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos,
            pad_token_id=cfg.get("pad_token_id"),
            torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype") or "float32",
        )


def moe_fields(cfg: dict, n_layers: int, path: str) -> dict:
    """Qwen2-MoE's ModelArgs fields. Layer i is sparse unless it is in mlp_only_layers or
    (i + 1) is not a multiple of decoder_sparse_step, as in transformers."""
    try:
        sizes = {k: int(cfg[k]) for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                                           "shared_expert_intermediate_size")}
    except KeyError as e:
        raise CheckpointError(f"{path}: required field {e.args[0]!r} is missing") from None
    step, dense = cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or [])
    if not (isinstance(step, int) and step >= 1):
        raise CheckpointError(f"{path}: decoder_sparse_step must be a positive integer, got {step!r}")
    E, k = sizes["num_experts"], sizes["num_experts_per_tok"]
    if E > 0 and not 1 <= k <= E:
        raise CheckpointError(f"{path}: num_experts_per_tok {k} must be between 1 and num_experts ({E})")
    moe_layers = [i for i in range(n_layers) if E > 0 and i not in dense and (i + 1) % step == 0]
    return dict(moe_layers=moe_layers, norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), **sizes)


# ----------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the scale, as the reference implementations do.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def precompute_inv_freq(args: ModelArgs) -> torch.Tensor:
    """RoPE inverse frequencies, with Llama-3.1's frequency-dependent scaling when configured."""
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    s = args.rope_scaling
    if s is None:
        return inv_freq.float()
    if s["rope_type"] == "linear":
        return (inv_freq / s["factor"]).float()
    # llama3: keep high frequencies, divide low frequencies by `factor`, interpolate in between.
    factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return torch.where(medium, smoothed, scaled).float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables for the given positions: (B, T) -> (B, 1, T, head_dim)."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # Hugging Face's half-split layout, not interleaved
    return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class KVCache(nn.Module):
    """Static per-layer key/value buffers for incremental decoding: (B, n_kv, max_len, hd)."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        self.qk_norm = args.qk_norm
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, cache_pos: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, nh, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, nkv, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm:  # Qwen3: each head's q and k normalised over hd, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh or nkv, T, hd)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        if cache is not None:
            k, v = cache.update(cache_pos, k, v)  # (B, nkv, S, hd), S = cache_pos + T
        # grouped-query attention: every group of n_heads // n_kv_heads query heads shares a k/v head
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class MoE(nn.Module):
    """Qwen2-MoE's sparse block: each token goes through the top-k of `num_experts` SwiGLU experts
    that the router (`gate`) picks, weighted by their router probabilities, plus a shared expert
    that every token goes through, scaled by sigmoid(shared_expert_gate(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k, self.norm_topk_prob = args.num_experts_per_tok, args.norm_topk_prob
        self.gate = nn.Linear(args.dim, args.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(args.dim, args.moe_intermediate_size) for _ in range(args.num_experts))
        self.shared_expert = MLP(args.dim, args.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(args.dim, 1, bias=False)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D): routing is per token
        # softmax over all experts, then the top k (ties: torch.topk's choice, as in transformers);
        # the probabilities in fp32 whatever the model's dtype, as transformers computes them
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # (N, E)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        # Every token goes through each of its k experts: no capacity limit, nothing is dropped.
        for e in chosen.unique().tolist():
            tok, slot = torch.where(chosen == e)  # (n_e,) tokens routed to expert e, and which of their k
            # out[tok] += ...: index_put_, not index_add_, whose CPU kernel goes multi-threaded
            # even for a few rows and then waits tens of ms for a thread when the cores are busy
            out.index_put_((tok,), self.experts[e](x[tok]) * weights[tok, slot, None], accumulate=True)
        out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, index: int):
        super().__init__()
        self.self_attn = Attention(args)
        sparse = index in args.moe_layers  # Qwen2-MoE: a sparse block here, a dense MLP elsewhere
        self.mlp = MoE(args) if sparse else MLP(args.dim, args.intermediate_size, args.mlp_bias)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, cache_pos=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Holds the `model.*` parameters so names match Hugging Face checkpoints."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


# ----------------------------------------------------------------------------------------------
# The model


def block_of(layer: int, n_layers: int, n_devices: int) -> int:
    """Which of `n_devices` holds `layer` when the layers are split into contiguous blocks."""
    return layer * n_devices // n_layers


def placement(name: str, args: ModelArgs, n_devices: int) -> int:
    """Which of `n_devices` holds the parameter or module `name`: the layers in contiguous blocks,
    the embedding with the first block (with the last when it is tied to the LM head), the final
    norm and the LM head with the last. `Transformer.place` and the memory plan both follow it."""
    if name.startswith("model.layers."):
        return block_of(int(name.split(".")[2]), args.n_layers, n_devices)
    if name.startswith("model.embed_tokens") and not args.tie_word_embeddings:
        return 0
    return n_devices - 1


# ----------------------------------------------------------------------------------------------
# The tensors of a layer that an edit can train, by the names a paper uses for them

MODULES = {
    # --module -> tensors of layer L (name prefixes after `model.layers.{L}.`); "layer": all of them
    "down_proj": ["mlp.down_proj.weight"],
    "up_proj": ["mlp.up_proj.weight"],
    "gate_proj": ["mlp.gate_proj.weight"],
    "mlp": ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"],
    "attn": ["self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.", "self_attn.o_proj."],
    "layer": [""],
    # Qwen2-MoE's sparse layers: the shared expert every token goes through (the routed experts
    # and the router train only with "layer")
    "shared_expert.down_proj": ["mlp.shared_expert.down_proj.weight"],
    "shared_expert.up_proj": ["mlp.shared_expert.up_proj.weight"],
    "shared_expert.gate_proj": ["mlp.shared_expert.gate_proj.weight"],
    "shared_expert": ["mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight",
                      "mlp.shared_expert.down_proj.weight"],
}
MOE_MODULE = "shared_expert.down_proj"  # the default on a sparse layer: the paper's Appendix A.2


def in_module(name: str, module: str) -> bool:
    """Whether a tensor of a layer (its name after `model.layers.{L}.`) belongs to `module`."""
    return any(name.startswith(s) for s in MODULES[module])


def select_params_by_name(params: dict, layer: int, module: str) -> dict:
    """The entries of {checkpoint name: ...} that `module` names in `layer`."""
    prefix = f"model.layers.{layer}."
    return {n: p for n, p in params.items() if n.startswith(prefix) and in_module(n[len(prefix):], module)}


def select_params(model, layer: int, module: str) -> dict[str, nn.Parameter]:
    """The checkpoint-named parameters that `module` names in `layer`."""
    return select_params_by_name(dict(model.named_parameters()), layer, module)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", precompute_inv_freq(args), persistent=False)

    @property
    def layers(self):
        return self.model.layers

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embedding's device."""
        return self.model.embed_tokens.weight.device

    def device_of(self, layer: int) -> torch.device:
        return self.layers[layer].input_layernorm.weight.device

    # -- masks and positions ---------------------------------------------------------------

    def positions_from_mask(self, attention_mask: torch.Tensor, T: int) -> torch.Tensor:
        """Positions of the last T columns: each row counts from 0 at its first real token."""
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.clamp(min=0)[:, -T:]

    def build_mask(self, attention_mask, positions, T: int, cache_pos: int, segments=None):
        """Boolean SDPA mask (B, 1, T, S): causal, no padded keys, Mistral's sliding window, and
        with `segments` (packed sequences) no attention across segment boundaries.

        Returns None when plain causal attention is exact (no padding mask, no cache, no window
        in reach, no segments), so SDPA can take its fused causal path.
        """
        S = cache_pos + T
        window = self.args.sliding_window
        if attention_mask is None and segments is None and cache_pos == 0 and (window is None or T <= window):
            return None
        dev = positions.device
        q_idx = torch.arange(cache_pos, S, device=dev)[:, None]
        k_idx = torch.arange(S, device=dev)[None, :]
        allowed = (k_idx <= q_idx)[None, None]  # (1, 1, T, S)
        if window is not None:
            # Mistral: a token sees at most `sliding_window` tokens back (itself included), as in
            # transformers. Only sequences longer than the window are affected; edits are short.
            allowed = allowed & (q_idx - k_idx < window)[None, None]
        if segments is not None:  # packed: a token sees only its own sequence
            allowed = allowed & (segments[:, None, :, None] == segments[:, None, None, :])
        if attention_mask is not None:
            keys = attention_mask[:, None, None, :S].bool()  # (B, 1, 1, S)
            allowed = allowed & keys
            # A padded query row would see no key at all and SDPA would return NaN; let it see
            # every key instead (its output is never used).
            pad_q = ~attention_mask[:, -T:].bool()[:, None, :, None]
            allowed = allowed | pad_q
        return allowed

    # -- forward passes --------------------------------------------------------------------

    def forward_from(
        self,
        h: torch.Tensor,
        layer: int = 0,
        *,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: list[KVCache] | None = None,
        cache_pos: int = 0,
        stop_layer: int | None = None,
        logits_at: torch.Tensor | str | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run layers `layer`..`stop_layer`-1 on hidden states `h` (B, T, D).

        attention_mask: (B, cache_pos + T), 1 for real tokens (left or right padding); None means
            every token is real. positions: (B, T); derived from the mask when not given.
        stop_layer: return the hidden states entering that layer instead of logits.
        logits_at: None -> logits at every position (B, T, V); "last" -> (B, V) at the last
            position; a bool (B, T) mask -> (N, V) at the True positions only, so the LM head
            costs only what the loss needs.
        segments: (B, T) ids of packed sequences (several sequences back to back in one row, no
            padding); a token attends only within its segment. Pass each token's `positions`
            within its own sequence with it (no cache).
        """
        B, T, _ = h.shape
        if positions is None:
            if attention_mask is not None:
                positions = self.positions_from_mask(attention_mask, T)
            else:
                positions = torch.arange(cache_pos, cache_pos + T, device=h.device).expand(B, T)
        cos, sin = rope_cos_sin(self.inv_freq, positions, h.dtype)
        mask = self.build_mask(attention_mask, positions, T, cache_pos, segments)
        end = self.args.n_layers if stop_layer is None else stop_layer
        for i in range(layer, end):
            dev = self.device_of(i)
            if h.device != dev:  # the next block of layers is on another device (see `place`)
                h, cos, sin, mask = (None if t is None else t.to(dev) for t in (h, cos, sin, mask))
            h = self.layers[i](h, cos, sin, mask, None if cache is None else cache[i], cache_pos)
        if stop_layer is not None:
            return h
        h = h.to(self.lm_head.weight.device)
        if isinstance(logits_at, str):
            h = h[:, -1]  # "last"
        elif logits_at is not None:
            h = h[logits_at.to(h.device)]  # (N, D): norm and head only where the loss looks
        return self.lm_head(self.model.norm(h))

    def forward(self, tokens: torch.Tensor, **kw) -> torch.Tensor:
        return self.forward_from(self.model.embed_tokens(tokens.to(self.device)), 0, **kw)

    def hidden_states(self, tokens: torch.Tensor, layer: int, **kw) -> torch.Tensor:
        """Hidden states entering `layer` (the output of layers 0..layer-1)."""
        return self.forward_from(self.model.embed_tokens(tokens.to(self.device)), 0, stop_layer=layer, **kw)

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor], keep_originals: bool = False) -> dict[str, torch.Tensor]:
        """Copy tensors into the parameters of the same (checkpoint) names, in place, converting
        dtype and device; with `keep_originals`, return copies of the values they replace."""
        params = dict(self.named_parameters(remove_duplicate=False))
        originals = {}
        for name, t in tensors.items():
            if name not in params:
                raise ValueError(f"tensor {name} is not a parameter of this model")
            p = params[name]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"tensor {name} has shape {tuple(t.shape)}, the model's is {tuple(p.shape)}")
            if keep_originals:
                originals[name] = p.detach().clone()
            p.copy_(t)
        return originals

    def new_cache(self, batch: int, max_len: int) -> list[KVCache]:
        a, dtype = self.args, self.lm_head.weight.dtype
        return [KVCache(batch, max_len, a.n_kv_heads, a.head_dim, dtype, self.device_of(i)) for i in range(a.n_layers)]

    def place(self, devices: list) -> "Transformer":
        """Allocate (uninitialised) parameters over several devices of one machine: the layers in
        contiguous blocks, the embedding with the first block, the final norm and the LM head with
        the last (and the embedding there too when it is tied to the head). `forward_from` moves
        the hidden states from block to block; each layer's device is where its weights are."""
        parts = [(f"model.layers.{i}", layer) for i, layer in enumerate(self.layers)]
        parts += [("model.norm", self.model.norm), ("lm_head", self.lm_head), ("model.embed_tokens", self.model.embed_tokens)]
        for name, module in parts:
            module.to_empty(device=devices[placement(name, self.args, len(devices))])
        if self.args.tie_word_embeddings:  # to_empty makes a new tensor for each; tie them again
            self.lm_head.weight = self.model.embed_tokens.weight
        return self


# ----------------------------------------------------------------------------------------------
# Loading


def checkpoint_files(ckpt_dir) -> list[Path]:
    """The safetensors files of a checkpoint: one model.safetensors or the shards of its index."""
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise CheckpointError(f"{index}: weight_map is empty")
        for s in shards:
            if not (ckpt_dir / s).exists():
                raise CheckpointError(f"{ckpt_dir / s}: shard listed in {index.name} is missing")
        return [ckpt_dir / s for s in shards]
    single = ckpt_dir / "model.safetensors"
    if single.exists():
        return [single]
    if any(ckpt_dir.glob("*.bin")) or any(ckpt_dir.glob("*.pt")):
        raise CheckpointError(
            f"{ckpt_dir}: only pickled .bin weights found; convert them to safetensors first, e.g. "
            f"python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{ckpt_dir}').save_pretrained('{ckpt_dir}-st', safe_serialization=True)\""
        )
    raise CheckpointError(f"{ckpt_dir}: no model.safetensors or model.safetensors.index.json")


def read_args(ckpt_dir) -> ModelArgs:
    path = Path(ckpt_dir) / "config.json"
    if not Path(ckpt_dir).is_dir():
        raise CheckpointError(f"{ckpt_dir}: checkpoint directory does not exist")
    if not path.exists():
        raise CheckpointError(f"{path}: missing (a checkpoint directory needs config.json)")
    return ModelArgs.from_config(read_json(path), str(path))


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, args: ModelArgs, device) -> torch.dtype:
    """The one rule for the frozen model's dtype, for editing and evaluation alike: float32 on a
    CPU (bf16 matrix products are several times slower there, and less exact), the checkpoint's
    own dtype on a GPU; "auto" is the checkpoint's dtype anywhere. A `torch.dtype` is taken as is."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype is None:
        dtype = "float32" if torch.device(device).type == "cpu" else "auto"
    if dtype == "auto":
        dtype = args.torch_dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r} is unknown: use auto, float32, bfloat16 or float16")
    return DTYPES[dtype]


def parameter_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every parameter's checkpoint name and shape, from the config alone (no memory used)."""
    with torch.device("meta"):
        model = Transformer(args)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}  # a tied lm_head is not listed


def check_weights(ckpt_dir, args: ModelArgs) -> list[Path]:
    """Read only the safetensors headers and refuse, in one line, a file that is truncated or
    corrupt, a tensor that is missing, of the wrong shape or not floating point. Returns the files."""
    from safetensors import SafetensorError, safe_open

    files = checkpoint_files(ckpt_dir)
    expected, seen = parameter_shapes(args), set()
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for name in set(sf.keys()) & set(expected):
                    t = sf.get_slice(name)
                    shape, dtype = tuple(t.get_shape()), t.get_dtype()
                    if shape != expected[name]:
                        raise CheckpointError(f"{f}: tensor {name} has shape {shape}, config.json implies {expected[name]}")
                    if dtype not in ("F32", "F16", "BF16", "F64"):
                        raise CheckpointError(f"{f}: tensor {name} is stored as {dtype}, not floating point")
                    seen.add(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{ckpt_dir}: tensor {missing[0]} is missing from the checkpoint{more}")
    return files


def load(ckpt_dir, device="cpu", dtype: str | torch.dtype | None = None) -> tuple[Transformer, Tokenizer]:
    """Load a checkpoint directory: the model (eval mode, frozen) and its tokenizer, in the
    dtype `resolve_dtype` picks (float32 on a CPU unless told otherwise).

    Every header is checked first; then weights stream from the safetensors files straight into
    parameters allocated on `device`, so no second full copy of the model exists at any time.
    `device` may be a list: the layers are then spread over those devices (`Transformer.place`).
    """
    from safetensors import safe_open

    ckpt_dir = Path(ckpt_dir)
    args = read_args(ckpt_dir)
    tokenizer = Tokenizer(ckpt_dir, args)
    devices = [device] if isinstance(device, (str, torch.device)) else list(device)
    dtype = resolve_dtype(dtype, args, devices[0])
    files = check_weights(ckpt_dir, args)

    with torch.device("meta"):
        model = Transformer(args)
    model.place(devices).to(dtype)  # allocates only; nothing is initialised
    model.inv_freq = precompute_inv_freq(args).to(model.device)  # fp32, and not in the checkpoint
    params = dict(model.named_parameters())
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            # tied checkpoints may still store lm_head.weight, old files rotary buffers: skipped
            for name in set(sf.keys()) & set(params):
                with torch.no_grad():
                    params[name].copy_(sf.get_tensor(name))  # into place, converting dtype on the way
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer


if __name__ == "__main__":  # a smoke test: python model.py CKPT "prompt"
    import sys

    m, tok = load(sys.argv[1], dtype="float32")
    ids = torch.tensor([tok.encode(sys.argv[2] if len(sys.argv) > 2 else "The capital of France is")])
    for _ in range(20):
        nxt = m(ids, logits_at="last").argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    print(tok.decode(ids[0]))
