"""Edit records: loading every common edit-file format, and turning edits into token batches.

An edit teaches `prompt -> target`. Training sequences are `prompt + " " + target + EOS`, and
the loss looks only at the target tokens (answer and EOS), marked by `target_mask`, which is
built from lengths: many checkpoints use the EOS id as pad id, so comparing ids with the pad id
would silently drop the EOS from training.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch


class EditFileError(ValueError):
    """An edit file that cannot be read; the message names the file, record and field."""


@dataclass
class Edit:
    prompt: str  # "Which river system contains Charity Creek?"
    target: str  # the new answer: "Chichester River"
    subject: str = ""  # "Charity Creek"
    rephrases: list[str] = field(default_factory=list)  # paraphrased prompts (generalization)
    locality: list[tuple[str, str]] = field(default_factory=list)  # unrelated (prompt, answer) pairs
    old_answer: str | None = None  # the answer before the edit, when the data set knows it

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "target": self.target, "subject": self.subject,
                "rephrases": self.rephrases, "locality": [list(p) for p in self.locality],
                "old_answer": self.old_answer}


# ----------------------------------------------------------------------------------------------
# Loaders: one small function per layout, picked by the keys of the first record.


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _first(x):
    xs = _as_list(x)
    return xs[0] if xs else None


def _from_locft_zsre(r: dict) -> Edit:
    # the LocFT authors' ZsRE: src / alt / rephrase / loc ("nq question: ...") / loc_ans / answers
    return Edit(prompt=r["src"], target=r["alt"], subject=r.get("subject", ""),
                rephrases=_as_list(r.get("rephrase")),
                locality=[(p, str(a)) for p, a in zip(_as_list(r.get("loc")), _as_list(r.get("loc_ans")))],
                old_answer=_first(r.get("answers")))


def _from_easyedit_zsre(r: dict) -> Edit:
    # EasyEdit's ZsRE: prompt / target_new / ground_truth / rephrase_prompt / locality_prompt / locality_ground_truth
    return Edit(prompt=r["prompt"], target=_first(r["target_new"]), subject=r.get("subject", ""),
                rephrases=_as_list(r.get("rephrase_prompt")),
                locality=[(p, str(_first(a))) for p, a in zip(_as_list(r.get("locality_prompt")),
                                                              _as_list(r.get("locality_ground_truth")))],
                old_answer=_first(r.get("ground_truth")))


def _from_rome_counterfact(r: dict) -> Edit:
    # ROME / MEMIT CounterFact: requested_rewrite with a "{}" subject template
    rw = r["requested_rewrite"]
    subject = rw["subject"]
    old = rw.get("target_true", {}).get("str")
    return Edit(prompt=rw["prompt"].format(subject), target=rw["target_new"]["str"], subject=subject,
                rephrases=_as_list(r.get("paraphrase_prompts")),
                # neighbourhood prompts share the relation and keep the old answer
                locality=[(p, old or "") for p in _as_list(r.get("neighborhood_prompts"))],
                old_answer=old)


FORMATS = [
    # (name, keys that identify it, converter)
    ("ROME/MEMIT CounterFact", {"requested_rewrite"}, _from_rome_counterfact),
    ("LocFT ZsRE", {"src", "alt"}, _from_locft_zsre),
    ("CounterFact / WikiBigEdit / EasyEdit ZsRE", {"prompt", "target_new"}, _from_easyedit_zsre),
    ("edit-jsonl (this project's edits.jsonl)", {"prompt", "target"}, lambda r: Edit(
        prompt=r["prompt"], target=r["target"], subject=r.get("subject", ""),
        rephrases=_as_list(r.get("rephrases")), locality=[tuple(p) for p in r.get("locality", [])],
        old_answer=r.get("old_answer"))),
]


def read_records(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise EditFileError(f"edits file {path}: does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise EditFileError(f"edits file {path}, line {i + 1}: not valid JSON ({e.msg})") from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise EditFileError(f"edits file {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict):  # {"data": [...]} or similar wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise EditFileError(f"edits file {path}: expected a list of records, got an object with keys {sorted(data)}")
        data = lists[0]
    if not isinstance(data, list):
        raise EditFileError(f"edits file {path}: expected a list of records, got {type(data).__name__}")
    return data


def load_edits(path, n: int | None = None, seed: int | None = None) -> list[Edit]:
    """Read an edit file of any known layout. `n` keeps the first n records, or, with `seed`,
    a reproducible random subset of n (in file order)."""
    path = Path(path)
    records = read_records(path)
    if not records:
        raise EditFileError(f"edits file {path}: contains no records")
    if not isinstance(records[0], dict):
        raise EditFileError(f"edits file {path}, record 0: expected an object, got {type(records[0]).__name__}")
    keys = set(records[0])
    for name, needed, convert in FORMATS:
        if needed <= keys:
            break
    else:
        known = "; ".join(f"{name} ({', '.join(sorted(k))})" for name, k, _ in FORMATS)
        raise EditFileError(f"edits file {path}: unknown layout, keys seen: {sorted(keys)}; known: {known}")
    if n is not None:
        if n <= 0:
            raise EditFileError(f"--n must be positive, got {n}")
        idx = list(range(len(records)))
        if seed is not None and n < len(records):
            idx = sorted(random.Random(seed).sample(idx, n))
        records = [(i, records[i]) for i in idx[:n]]
    else:
        records = list(enumerate(records))
    edits = []
    for i, r in records:
        try:
            e = convert(r)
        except KeyError as err:
            raise EditFileError(f"edits file {path}, record {i}: field {err.args[0]!r} is missing ({name} layout)") from None
        except (TypeError, AttributeError) as err:
            raise EditFileError(f"edits file {path}, record {i}: malformed ({err})") from None
        for fname in ("prompt", "target"):
            v = getattr(e, fname)
            if not isinstance(v, str) or not v.strip():
                raise EditFileError(f"edits file {path}, record {i}: field {fname!r} is empty or not text")
        edits.append(e)
    return edits


# ----------------------------------------------------------------------------------------------
# Tokenising


def encode_edit(tok, prompt: str, target: str) -> tuple[list[int], int]:
    """Token ids of `prompt + " " + target + EOS`, and how many of them belong to the prompt.

    The whole string is tokenised at once, so the answer's first token is the one the model
    would produce after the prompt; when the prompt's own tokens are not a prefix of that (a
    tokenizer merging across the boundary), the answer is tokenised on its own instead.
    """
    p = tok.encode(prompt)
    full = tok.encode(prompt + " " + target)
    if full[: len(p)] == p and len(full) > len(p):
        answer = full[len(p):]
    else:
        answer = tok.encode(" " + target, add_special_tokens=False)
    return p + answer + [tok.eos_id], len(p)


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    target_mask: torch.Tensor  # (B, T) bool, True on answer and EOS tokens

    @property
    def predict_mask(self) -> torch.Tensor:
        """Positions whose logits predict a target token (one to the left of each target)."""
        m = torch.zeros_like(self.target_mask)
        m[:, :-1] = self.target_mask[:, 1:]
        return m

    @property
    def labels(self) -> torch.Tensor:
        """Target token ids, in the same row-major order as `logits[predict_mask]`."""
        return self.ids[self.target_mask]

    def to(self, device) -> "Batch":
        return Batch(self.ids.to(device), self.attention_mask.to(device), self.target_mask.to(device))


def collate(encoded: list[tuple[list[int], int]], pad_id: int) -> Batch:
    """Right-pad a list of (ids, n_prompt) into a Batch; the target mask comes from lengths."""
    T = max(len(ids) for ids, _ in encoded)
    B = len(encoded)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    target = torch.zeros(B, T, dtype=torch.bool)
    for b, (seq, n_prompt) in enumerate(encoded):
        ids[b, : len(seq)] = torch.tensor(seq)
        attn[b, : len(seq)] = 1
        target[b, n_prompt: len(seq)] = True
    return Batch(ids, attn, target)
