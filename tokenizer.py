"""The checkpoint's tokenizer: `tokenizer.json` through `tokenizers`, else `tokenizer.model`
through `sentencepiece`, with the special ids (BOS, EOS, pad) the checkpoint's config files give."""
from __future__ import annotations

import json
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and the problem."""


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


class Tokenizer:
    """BOS is added exactly when the checkpoint adds it: the tokenizer.json post-processor decides
    for `tokenizers` (Llama-3 adds <|begin_of_text|>, Qwen2 adds nothing); `add_bos_token` in
    tokenizer_config.json decides for sentencepiece (default true, as for Llama-2 / Mistral).
    """

    def __init__(self, ckpt_dir: Path, args):  # args: model.ModelArgs (bos, eos and pad ids)
        ckpt_dir = Path(ckpt_dir)
        tcfg = read_json(ckpt_dir / "tokenizer_config.json") if (ckpt_dir / "tokenizer_config.json").exists() else {}
        gcfg = read_json(ckpt_dir / "generation_config.json") if (ckpt_dir / "generation_config.json").exists() else {}
        self._tok = self._sp = None
        try:
            if (ckpt_dir / "tokenizer.json").exists():
                from tokenizers import Tokenizer as HFTokenizer

                self._tok = HFTokenizer.from_file(str(ckpt_dir / "tokenizer.json"))
                self.add_bos = None  # the post-processor decides
            elif (ckpt_dir / "tokenizer.model").exists():
                import sentencepiece as spm

                self._sp = spm.SentencePieceProcessor(model_file=str(ckpt_dir / "tokenizer.model"))
                self.add_bos = bool(tcfg.get("add_bos_token", True))
            else:
                raise CheckpointError(f"{ckpt_dir}: no tokenizer.json or tokenizer.model")
        except CheckpointError:
            raise
        except Exception as e:  # the libraries' own errors for a corrupt file, in one line
            name = "tokenizer.json" if (ckpt_dir / "tokenizer.json").exists() else "tokenizer.model"
            raise CheckpointError(f"{ckpt_dir / name}: cannot be read as a tokenizer ({str(e).splitlines()[0][:200]})") from None

        def token_id(value):
            if value is None or isinstance(value, int):
                return value
            if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config files
                value = value.get("content")
            return self.token_to_id(value)

        self.bos_id = args.bos_token_id if args.bos_token_id is not None else token_id(tcfg.get("bos_token"))
        # generation_config's eos list is what generate() stops on (e.g. Llama-3-Instruct's <|eot_id|>)
        eos = gcfg.get("eos_token_id", args.eos_token_ids or token_id(tcfg.get("eos_token")))
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if not self.eos_ids:
            raise CheckpointError(f"{ckpt_dir}: no eos_token_id in config.json or generation_config.json")
        # The EOS appended to edit targets: the tokenizer's own eos (Qwen2.5-Instruct: <|im_end|>),
        # falling back to the model config's first eos.
        self.eos_id = token_id(tcfg.get("eos_token")) if tcfg.get("eos_token") else self.eos_ids[0]
        pad = args.pad_token_id if args.pad_token_id is not None else token_id(tcfg.get("pad_token"))
        self.pad_id = pad if pad is not None else self.eos_id

    def token_to_id(self, token: str) -> int | None:
        if self._tok is not None:
            return self._tok.token_to_id(token)
        return self._sp.piece_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._tok is not None:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self._sp.encode(text)
        return ([self.bos_id] if add_special_tokens and self.add_bos else []) + ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self._tok is not None:
            return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._sp.decode(ids)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size() if self._tok is not None else self._sp.get_piece_size()
