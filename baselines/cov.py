"""C0 = E[k k^T]: the second moment of down_proj's inputs over ordinary text.

MEMIT keeps what the layer already knows by weighing its update with C0 (the keys of "all other
facts"); AlphaEdit projects its update onto C0's near-null space. The official code estimates C0
on 100,000 Wikipedia articles. Offline, this project uses the Wikipedia passages of BoolQ
(data/capability/boolq.jsonl, ~390K tokens, never used by any evaluation here) unless given a
text file (`--cov-text`): a .jsonl with a "text" field per line (what `datasets`' to_json writes
for a Wikipedia dump), or plain text with documents separated by blank lines.

C0 is accumulated in float64 (each batch's product in the model's dtype, the running sum in
float64) and cached on disk, one file per layer, keyed by the model's weights, the layer, the
corpus's hash and the token count.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import delta
from data import collate

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = ROOT / "data" / "capability" / "boolq.jsonl"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "locft-baselines" / "cov"
MIN_TOKENS_PER_WIDTH = 10  # fewer tokens than 10x the MLP width leave C0 badly estimated (or singular)
MAX_DOC_TOKENS = 4096  # a document is cut here, as the official code cuts at the context length


class CorpusError(ValueError):
    """A covariance text that cannot be used; the message names the file."""


def read_corpus(path=None) -> tuple[list[str], str]:
    """The documents of the covariance text and a name for the log. Default: BoolQ's Wikipedia
    passages, each once, in file order."""
    if path is None:
        if not DEFAULT_CORPUS.is_file():
            raise CorpusError(f"{DEFAULT_CORPUS}: missing (make capability writes it); or give --cov-text FILE")
        seen = dict.fromkeys(json.loads(line)["passage"] for line in open(DEFAULT_CORPUS, encoding="utf-8") if line.strip())
        return list(seen), "BoolQ validation passages (Wikipedia)"
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"--cov-text {path}: cannot read ({e})") from None
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    docs.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise CorpusError(f"--cov-text {path}, line {i + 1}: not a JSON object with a \"text\" field") from None
    else:
        docs = [d.strip() for d in text.split("\n\n")]
    docs = [d for d in docs if isinstance(d, str) and d.strip()]
    if not docs:
        raise CorpusError(f"--cov-text {path}: no text")
    return docs, str(path)


def tokenize(tok, docs: list[str], max_tokens: int | None, width: int, source: str) -> list[list[int]]:
    """Each document's tokens (cut at MAX_DOC_TOKENS), up to `max_tokens` in all (the last
    document cut to fit); refuses a corpus with fewer than 10x `width` tokens."""
    out, total = [], 0
    for d in docs:
        ids = tok.encode(d)[:MAX_DOC_TOKENS]
        if max_tokens is not None:
            ids = ids[:max_tokens - total]
        if len(ids) > 1:
            out.append(ids)
            total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    need = MIN_TOKENS_PER_WIDTH * width
    if total < need:
        raise CorpusError(f"covariance text {source}: {total} tokens, fewer than {MIN_TOKENS_PER_WIDTH}x the MLP "
                          f"width ({need}); give a longer --cov-text or a larger --cov-tokens")
    return out


def corpus_sha256(seqs: list[list[int]], tok_name: str) -> str:
    """The hash of exactly what C0 is estimated on: the token ids, document by document."""
    h = hashlib.sha256(tok_name.encode())
    for ids in seqs:
        h.update(json.dumps(ids).encode())
    return h.hexdigest()


def model_fingerprint(ckpt, last_layer: int) -> str:
    """A hash of everything C0 at layers <= last_layer depends on: the config and the stored
    embedding and layers 0..last_layer."""
    from model import checkpoint_files
    from safetensors import safe_open

    names = []
    for f in checkpoint_files(ckpt):
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            names += [n for n in sf.keys() if n.startswith("model.embed_tokens.")
                      or (n.startswith("model.layers.") and int(n.split(".")[2]) <= last_layer)]
    h = hashlib.sha256((Path(ckpt) / "config.json").read_bytes())
    for name, t in sorted(delta.stored_tensors(ckpt, names).items()):
        h.update(f"{name}:{delta.sha256(t)}".encode())
    return h.hexdigest()


@torch.no_grad()
def second_moments(model, seqs: list[list[int]], layers: list[int], batch_tokens: int = 8192,
                   say=lambda s: None) -> dict[int, torch.Tensor]:
    """E[k k^T] of down_proj's inputs at `layers` over every token of `seqs`: {layer: float64 (inter, inter)}."""
    sums = {l: None for l in layers}
    count, t0, done = 0, time.time(), 0
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    batches, cur = [], []
    for i in order:  # batches of about batch_tokens tokens, similar lengths together
        if cur and len(seqs[i]) * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    batches.append(cur)
    for bi, rows in enumerate(batches):
        b = collate([(seqs[i], len(seqs[i])) for i in rows], pad_id=0)  # right padding: pads never reach real tokens
        real = b.attention_mask.bool()
        grabbed, handles = {}, []
        for l in layers:
            hook = lambda mod, args, l=l: grabbed.__setitem__(l, args[0][real.to(args[0].device)])  # noqa: E731
            handles.append(model.layers[l].mlp.down_proj.register_forward_pre_hook(hook))
        try:
            model.hidden_states(b.ids, layer=max(layers) + 1)
        finally:
            for h in handles:
                h.remove()
        for l in layers:
            k = grabbed[l].float()
            part = (k.T @ k).double().cpu()
            sums[l] = part if sums[l] is None else sums[l] + part
        count += int(real.sum())
        done += 1
        if done % 20 == 0 or done == len(batches):
            say(f"C0: {count} tokens of {sum(map(len, seqs))} ({time.time() - t0:.0f}s)")
    return {l: s / count for l, s in sums.items()}


def second_moments_cached(model, tok, ckpt, layers: list[int], cov_text=None, max_tokens: int | None = None,
                          cache_dir=None, say=lambda s: None) -> tuple[dict[int, torch.Tensor], dict]:
    """C0 for `layers`, from the cache when there, else computed and stored. Returns
    ({layer: float64 C0}, a log entry: corpus, its hash, token count, cache files)."""
    docs, source = read_corpus(cov_text)
    seqs = tokenize(tok, docs, max_tokens, model.args.intermediate_size, source)
    sha = corpus_sha256(seqs, Path(ckpt).resolve().name)
    tokens = sum(map(len, seqs))
    fp = model_fingerprint(ckpt, max(layers))
    where = Path(cache_dir or DEFAULT_CACHE) / fp[:16]
    path = {l: where / f"layer{l}-corpus{sha[:16]}-tokens{tokens}.safetensors" for l in layers}
    if Path(ckpt).resolve() in (where.resolve(), *where.resolve().parents):
        raise CorpusError(f"the covariance cache {where} lies inside the checkpoint {ckpt}; give another --cov-cache")
    have = {l: load_file(str(p))["C0"] for l, p in path.items() if p.is_file()}
    missing = [l for l in layers if l not in have]
    if missing:
        say(f"C0: estimating layers {missing} on {tokens} tokens of {source} (cached in {where})")
        where.mkdir(parents=True, exist_ok=True)
        for l, c in second_moments(model, seqs, missing, say=say).items():
            fd, tmp = tempfile.mkstemp(dir=where, suffix=".tmp")
            os.close(fd)
            save_file({"C0": c.contiguous()}, tmp, {"corpus_sha256": sha, "tokens": str(tokens), "source": source,
                                                     "model_sha256": fp, "layer": str(l)})
            os.replace(tmp, path[l])  # a reader never sees half a file
            have[l] = c
    info = {"corpus": source, "corpus_sha256": sha, "tokens": tokens, "documents": len(seqs),
            "model_sha256": fp, "files": {str(l): str(p) for l, p in path.items()}}
    return {l: have[l] for l in layers}, info
