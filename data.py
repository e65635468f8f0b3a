"""Edit records: loading every common edit-file format, and turning edits into token batches.

An edit teaches `prompt -> target`. Training sequences are `prompt + " " + target + EOS`, and
the loss looks only at the target tokens (answer and EOS), marked by `target_mask`, which is
built from lengths: many checkpoints use the EOS id as pad id, so comparing ids with the pad id
would silently drop the EOS from training.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass, field, fields, replace
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
    record: int | None = field(default=None, compare=False, repr=False)  # its index in the file

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "target": self.target, "subject": self.subject,
                "rephrases": self.rephrases, "locality": [list(p) for p in self.locality],
                "old_answer": self.old_answer}


# ----------------------------------------------------------------------------------------------
# Loaders: one small function per layout, picked by the keys of the first record. Every record is
# then checked against that layout, so a bad record 1712 is reported by its index and field.


class _BadField(Exception):
    def __init__(self, field: str, problem: str):
        super().__init__(field, problem)
        self.field, self.problem = field, problem


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _text(r: dict, key: str, required: bool = True) -> str:
    """A non-empty string field; a one-element list (or a list of aliases) gives its first item."""
    if key not in r or r[key] is None:
        if required:
            raise _BadField(key, "is missing")
        return ""
    v = r[key]
    while isinstance(v, list) and v:  # ["Paris"], [["Paris", "Paris, France"]]: the first alias
        v = v[0]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)  # numeric answers ("loc_ans": 12)
    if not isinstance(v, str):
        raise _BadField(key, f"should be text, got {type(r[key]).__name__}")
    if required and not v.strip():
        raise _BadField(key, "is empty")
    return v


def _texts(r: dict, key: str) -> list[str]:
    """An optional field holding one string or a list of strings."""
    v = r.get(key)
    if v is None:
        return []
    items = v if isinstance(v, list) else [v]
    for x in items:
        if not isinstance(x, str):
            raise _BadField(key, f"should be text or a list of text, got a {type(x).__name__} inside")
    return [x for x in items if x.strip()]


def _pairs(r: dict, prompt_key: str, answer_key: str) -> list[tuple[str, str]]:
    """Locality (prompt, answer) pairs from two parallel fields (each one string or a list)."""
    prompts = _texts(r, prompt_key)
    answers = r.get(answer_key)
    answers = [] if answers is None else (answers if isinstance(answers, list) and len(prompts) > 1 else [answers])
    if prompts and len(answers) != len(prompts):
        raise _BadField(answer_key, f"has {len(answers)} answers for {len(prompts)} prompts in {prompt_key!r}")
    return [(p, _text({answer_key: a}, answer_key, required=False)) for p, a in zip(prompts, answers)]


def _from_locft_zsre(r: dict) -> Edit:
    # the LocFT authors' ZsRE, which is also EasyEdit's zsre_mend_eval.json:
    # src / alt / rephrase / loc ("nq question: ...") / loc_ans / answers / subject
    return Edit(prompt=_text(r, "src"), target=_text(r, "alt"), subject=_text(r, "subject", False),
                rephrases=_texts(r, "rephrase"), locality=_pairs(r, "loc", "loc_ans"),
                old_answer=_text(r, "answers", False) or None)


def _knowedit_locality(r: dict) -> list[tuple[str, str]]:
    # KnowEdit (EasyEdit's benchmark files): {"Relation_Specificity": [{"prompt", "ground_truth"}]}
    loc = r["locality"]
    if not isinstance(loc, dict):
        raise _BadField("locality", f"should be an object of lists, got {type(loc).__name__}")
    pairs = []
    for kind, items in loc.items():
        for item in _as_list(items):
            if not isinstance(item, dict) or "prompt" not in item:
                raise _BadField(f"locality.{kind}", "should be a list of {prompt, ground_truth} objects")
            pairs.append((_text(item, "prompt"), _text(item, "ground_truth", required=False)))
    return pairs


def _from_easyedit(r: dict) -> Edit:
    # LocFT's CounterFact and WikiBigEdit, EasyEdit's / KnowEdit's ZsRE:
    # prompt / target_new / ground_truth / rephrase_prompt (or rephrase) / locality_prompt /
    # locality_ground_truth (or a KnowEdit "locality" object)
    if "locality_prompt" in r or "locality" not in r:
        locality = _pairs(r, "locality_prompt", "locality_ground_truth")
    else:
        locality = _knowedit_locality(r)
    return Edit(prompt=_text(r, "prompt"), target=_text(r, "target_new"), subject=_text(r, "subject", False),
                rephrases=_texts(r, "rephrase_prompt") or _texts(r, "rephrase"), locality=locality,
                old_answer=_text(r, "ground_truth", False) or None)


def _from_rome_counterfact(r: dict) -> Edit:
    # ROME / MEMIT CounterFact: requested_rewrite with a "{}" subject template
    rw = r["requested_rewrite"]
    if not isinstance(rw, dict):
        raise _BadField("requested_rewrite", f"should be an object, got {type(rw).__name__}")
    subject = _text(rw, "subject")
    template = _text(rw, "prompt")
    if "{}" not in template:
        raise _BadField("requested_rewrite.prompt", 'has no "{}" where the subject goes')
    for key in ("target_new", "target_true"):
        if key in rw and not isinstance(rw[key], dict):
            raise _BadField(f"requested_rewrite.{key}", f'should be an object with "str", got {type(rw[key]).__name__}')
    if "target_new" not in rw:
        raise _BadField("requested_rewrite.target_new", "is missing")
    try:
        target = _text(rw["target_new"], "str")
        old = _text(rw.get("target_true", {}), "str", required=False) or None
    except _BadField as e:
        raise _BadField(f"requested_rewrite.target_*.{e.field}", e.problem) from None
    return Edit(prompt=template.replace("{}", subject), target=target, subject=subject,
                rephrases=_texts(r, "paraphrase_prompts"),
                # neighbourhood prompts share the relation and keep the old answer
                locality=[(p, old or "") for p in _texts(r, "neighborhood_prompts")],
                old_answer=old)


def _from_project(r: dict) -> Edit:
    # this project's layout (data/demo_edits.json, and the edits.jsonl that edit.py writes):
    # prompt / target / subject / rephrases / locality [[prompt, answer], ...] / old_answer
    locality = r.get("locality") or []
    if not isinstance(locality, list) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in locality):
        raise _BadField("locality", "should be a list of [prompt, answer] pairs of text")
    old = r.get("old_answer")
    if old is not None and not isinstance(old, str):
        raise _BadField("old_answer", f"should be text or null, got {type(old).__name__}")
    return Edit(prompt=_text(r, "prompt"), target=_text(r, "target"), subject=_text(r, "subject", False),
                rephrases=_texts(r, "rephrases"), locality=[tuple(p) for p in locality], old_answer=old)


FORMATS = [
    # (name, keys that identify it, converter); the first whose keys the first record has wins
    ("ROME/MEMIT CounterFact", {"requested_rewrite"}, _from_rome_counterfact),
    ("LocFT / EasyEdit ZsRE", {"src", "alt"}, _from_locft_zsre),
    ("CounterFact / WikiBigEdit / KnowEdit (prompt, target_new)", {"prompt", "target_new"}, _from_easyedit),
    ("this project's layout (prompt, target)", {"prompt", "target"}, _from_project),
]


def detect_format(path, record) -> tuple[str, callable]:
    """The (name, converter) of the layout whose identifying keys `record` has."""
    if not isinstance(record, dict):
        raise EditFileError(f"edits file {path}, record 0: expected an object, got {type(record).__name__}")
    keys = set(record)
    for name, needed, convert in FORMATS:
        if needed <= keys:
            return name, convert
    known = "; ".join(f"{name}: {', '.join(sorted(k))}" for name, k, _ in FORMATS)
    raise EditFileError(f"edits file {path}: unknown layout; keys seen in record 0: {', '.join(sorted(keys))}; "
                        f"known layouts and the keys that identify them: {known}")


def read_records(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise EditFileError(f"edits file {path}: does not exist")
    if path.is_dir():
        raise EditFileError(f"edits file {path}: is a directory")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EditFileError(f"edits file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
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
    """Read an edit file of any known layout (.json list or .jsonl, one record per line).

    `n` keeps the first n records; with `seed` as well, a random subset of n that is the same for
    the same file, n and seed (kept in file order). Only the kept records are converted; each is
    checked, and a bad one is reported as `edits file F, record I: field "alt" is empty`.
    """
    path = Path(path)
    records = read_records(path)
    if not records:
        raise EditFileError(f"edits file {path}: contains no records")
    name, convert = detect_format(path, records[0])
    idx = list(range(len(records)))
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise EditFileError(f"--n must be a positive whole number, got {n!r}")
        if seed is not None and n < len(records):
            idx = sorted(random.Random(seed).sample(idx, n))
        idx = idx[:n]
    edits = []
    for i in idx:
        r = records[i]
        if not isinstance(r, dict):
            raise EditFileError(f"edits file {path}, record {i}: expected an object, got {type(r).__name__}")
        try:
            edits.append(replace(convert(r), record=i))
        except _BadField as e:
            raise EditFileError(f"edits file {path}, record {i}: field {e.field!r} {e.problem} ({name})") from None
        except KeyError as e:
            raise EditFileError(f"edits file {path}, record {i}: field {e.args[0]!r} is missing ({name})") from None
    return edits


def check_context(tok, edits: list[Edit], path, limit: int, new_tokens: int = 0, prefix_tokens: int = 0):
    """Refuse, naming the record, an edit whose training sequence (prompt + target + EOS, plus
    `prefix_tokens` of augmentation) or whose prompts plus `new_tokens` decoded tokens (when
    evaluating) do not fit the model's context of `limit` tokens."""
    for i, e in enumerate(edits):
        where = f"edits file {path}, record {e.record if e.record is not None else i}"
        n = len(encode_edit(tok, e.prompt, e.target)[0]) + prefix_tokens
        if n > limit:
            raise EditFileError(f"{where}: prompt + target is {n} tokens, longer than the model's context ({limit})")
        for p in ([e.prompt, *e.rephrases, *(q for q, _ in e.locality)] if new_tokens else []):
            n = len(tok.encode(p)) + new_tokens
            if n > limit:
                raise EditFileError(f"{where}: a prompt of {n - new_tokens} tokens + {new_tokens} to generate does "
                                    f"not fit the model's context ({limit}): {p[:60]!r}")


# ----------------------------------------------------------------------------------------------
# Prefix augmentation (paper appendix A.4, as in MEMIT / AlphaEdit): each edit prompt is also
# trained behind short unrelated prefixes, so the edit survives text in front of the question
# (CounterFact's rephrases are "noise sentence + paraphrase").

PREFIXES = [
    "The weather was mild that day.", "She opened the window and looked outside.", "It was late in the afternoon.",
    "The meeting started a few minutes early.", "He poured himself a cup of tea.", "The train arrived on time.",
    "Nobody said anything for a while.", "The shop on the corner was closed.", "A dog barked somewhere nearby.",
    "The report was finished on Friday.", "They walked along the river.", "The lights flickered once.",
    "It had rained all morning.", "The room smelled of fresh paint.", "Someone knocked at the door.",
    "The children were playing outside.", "The bus was almost empty.", "Here is a short question.",
    "Let me think about this.", "I read something interesting today.", "The coffee had gone cold.",
    "A new season was about to begin.", "The library was quiet.", "We stopped for lunch at noon.",
    "The phone rang twice.", "Her notes were neatly organised.", "The garden needed watering.",
    "The film ended later than expected.", "A cold wind came from the north.", "He checked the time again.",
    "The kitchen was warm and bright.", "Everyone agreed to meet again.", "The road curved to the left.",
    "It was a busy week at work.", "The museum opened at nine.", "A few clouds drifted past.",
    "The printer ran out of paper.", "She wrote a letter to her friend.", "The market was crowded.",
    "The lecture covered many topics.", "He forgot his umbrella at home.", "The bridge was being repainted.",
    "Quiz time.", "Another day, another question.", "The answer may surprise you.", "A student asked the teacher.",
    "The snow melted quickly.", "They played cards after dinner.", "The ship left the harbour at dawn.",
    "The bakery sold out of bread.",
]


def augment_prefixes(edits: list[Edit], k: int, seed: int = 0) -> list[tuple[str, str]]:
    """Training pairs: each edit's own (prompt, target), then k copies of it whose prompt is
    "<prefix> <prompt>", with k distinct prefixes per edit drawn from PREFIXES (reproducible
    for the same seed)."""
    if k < 0 or k > len(PREFIXES):
        raise ValueError(f"--augment-prefixes must be between 0 and {len(PREFIXES)}, got {k}")
    rng = random.Random(seed)
    pairs = []
    for e in edits:
        pairs.append((e.prompt, e.target))
        pairs.extend((f"{p} {e.prompt}", e.target) for p in rng.sample(PREFIXES, k))
    return pairs


# ----------------------------------------------------------------------------------------------
# Tokenising


def encode_edit(tok, prompt: str, target: str) -> tuple[list[int], int]:
    """Token ids of `prompt + " " + target + EOS`, and how many of them belong to the prompt.

    The space is added only when the target has none (as the authors' script does: ZsRE has
    targets such as " 625"). The whole string is tokenised at once, so the answer's first token
    is the one the model would produce after the prompt; when the prompt's own tokens are not a
    prefix of that (a tokenizer merging across the boundary), the answer is tokenised alone.
    """
    answer = target if target.startswith(" ") else " " + target
    p = tok.encode(prompt)
    full = tok.encode(prompt + answer)
    answer_ids = full[len(p):] if full[:len(p)] == p and len(full) > len(p) else tok.encode(answer, add_special_tokens=False)
    return p + answer_ids + [tok.eos_id], len(p)


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T) right-padded, or (1, S) packed
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    target_mask: torch.Tensor  # (B, T) bool, True on answer and EOS tokens
    # packed batches only (see `pack`): each token's sequence number and position within it
    segments: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    # worked out on the host as the batch is built (`placed`), so that a GPU using them waits for
    # nothing: in row-major order the target token ids, the flat (B*T) positions whose logits
    # predict them, the sample each belongs to; the flat positions of the real tokens
    labels: torch.Tensor | None = None
    predict_at: torch.Tensor | None = None
    sample_of_prediction: torch.Tensor | None = None
    real_at: torch.Tensor | None = None
    n_samples: int = 0

    @property
    def predict_mask(self) -> torch.Tensor:
        """Positions whose logits predict a target token (one to the left of each target)."""
        m = torch.zeros_like(self.target_mask)
        m[:, :-1] = self.target_mask[:, 1:]
        return m

    def per_sample_mean(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-prediction values (N,), in `logits[predict_mask]` order -> the mean over each
        sample's target tokens (n_samples,), and each sample's token count."""
        row, B = self.sample_of_prediction.to(values.device), self.n_samples
        total = torch.zeros(B, device=values.device).index_add(0, row, values)
        count = torch.zeros(B, device=values.device).index_add(0, row, torch.ones_like(values))
        return total / count, count

    def to(self, device) -> "Batch":
        """The batch on `device`; copies to a GPU do not block the host."""
        to_gpu = torch.device(device).type != "cpu"
        return Batch(**{f.name: (lambda t: t.to(device, non_blocking=to_gpu) if torch.is_tensor(t) else t)(getattr(self, f.name))
                        for f in fields(self)})


def placed(B: int, T: int, where: list[tuple[int, int, tuple[list[int], int]]], pad_id: int = 0,
           packed: bool = False) -> Batch:
    """A (B, T) batch of (ids, n_prompt) sequences, each at its (row, column), given in row-major
    order; built in plain Python, the host-side fields (target ids, the positions that predict
    them, ...) included, so that nothing about it has to be asked of a GPU."""
    n = B * T
    ids, attn, target, seg, pos = [pad_id] * n, [0] * n, [False] * n, [-1] * n, [0] * n
    labels, at, sample, real = [], [], [], []
    for i, (row, col, (seq, n_prompt)) in enumerate(where):
        s, e = row * T + col, row * T + col + len(seq)
        ids[s:e], attn[s:e], seg[s:e], pos[s:e] = seq, [1] * len(seq), [i] * len(seq), range(len(seq))
        target[s + n_prompt:e] = [True] * (len(seq) - n_prompt)
        labels += seq[n_prompt:]
        at += range(s + n_prompt - 1, e - 1)  # one to the left of each target
        sample += [i] * (len(seq) - n_prompt)
        real += range(s, e)
    grid = lambda x, dtype=torch.long: torch.tensor(x, dtype=dtype).view(B, T)  # noqa: E731
    flat = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return Batch(grid(ids), grid(attn), grid(target, torch.bool), grid(seg) if packed else None,
                 grid(pos) if packed else None, labels=flat(labels), predict_at=flat(at),
                 sample_of_prediction=flat(sample), real_at=flat(real), n_samples=len(where))


def pack(encoded: list[tuple[list[int], int]], row_tokens: int = 1024) -> Batch:
    """Put (ids, n_prompt) sequences back to back, with no padding between them: `segments`
    keeps the sequences apart in attention and `positions` restarts at 0 for each, so every
    token computes exactly what it would alone and no compute goes to padding. A row holds at
    most `row_tokens` tokens (or one sequence, if longer), so attention, which is quadratic in
    the row length, stays cheap for large batches; only the rows' ends are padded (segment -1)."""
    rows: list[list[int]] = [[]]  # sample indices per row
    for i, (ids, _) in enumerate(encoded):
        used = sum(len(encoded[j][0]) for j in rows[-1])
        if rows[-1] and used + len(ids) > row_tokens:
            rows.append([])
        rows[-1].append(i)
    where = []  # (row, column, sequence), in the order of `encoded`
    for r, row in enumerate(rows):
        col = 0
        for i in row:
            where.append((r, col, encoded[i]))
            col += len(encoded[i][0])
    return placed(len(rows), max(sum(len(encoded[j][0]) for j in row) for row in rows), where, packed=True)


def collate(encoded: list[tuple[list[int], int]], pad_id: int) -> Batch:
    """Right-pad a list of (ids, n_prompt) into a Batch; the target mask comes from lengths."""
    T = max(len(ids) for ids, _ in encoded)
    return placed(len(encoded), T, [(b, 0, e) for b, e in enumerate(encoded)], pad_id)


# ----------------------------------------------------------------------------------------------
# The frozen prefix: layers 0..L-1 run once


class PrefixCache:
    """The hidden states entering layer `layer` of every token of every sequence in `encoded`,
    packed: (total tokens, D), sequence i in rows offsets[i]:offsets[i + 1]. Memory is tokens x D
    in the model's dtype, on `device` (default the model's; "cpu" keeps it in host memory, "disk"
    in a memory-mapped temporary file when it fits neither).

    Exact, not an approximation: nothing below `layer` changes during training, and with right
    padding and causal attention no real token ever sees a pad. Built in length-sorted batches.
    """

    row_tokens = 1024  # a packed row holds at most this many tokens (attention is quadratic in it)

    @torch.no_grad()
    def __init__(self, model, encoded: list[tuple[list[int], int]], pad_id: int, layer: int, device=None,
                 batch_size: int = 64):
        t0 = time.time()
        self.encoded, self.pad_id = encoded, pad_id
        self.model_device = model.device_of(layer)  # where training steps start from these states
        self.offsets = [0, *itertools.accumulate(len(ids) for ids, _ in encoded)]  # plain ints: no tensor op per batch
        shape, dtype = (self.offsets[-1], model.args.dim), model.model.embed_tokens.weight.dtype
        if device == "disk":  # memory-mapped from a file in the temp dir ($TMPDIR), unlinked at once
            fd, path = tempfile.mkstemp(prefix="prefix-cache-")
            os.close(fd)
            self.h = torch.from_file(path, shared=True, size=shape[0] * shape[1], dtype=dtype).view(shape)
            os.unlink(path)  # the mapping stays; the file is gone when the process is, however it ends
        else:  # in host memory pageable, not pinned: each batch goes to a GPU through one pinned buffer
            self.h = torch.empty(shape, dtype=dtype, device=torch.device(device) if device else self.model_device)
        self.staging, self.staged = None, None
        device = self.h.device
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            b = collate([encoded[i] for i in idx], pad_id)
            h = model.hidden_states(b.ids, layer=layer)  # (B, T, D); no mask needed: right padding
            self.h[self.rows_of(idx).to(device)] = h[b.attention_mask.bool().to(h.device)].to(device)  # real tokens, in order
        self.seconds = time.time() - t0

    def rows_of(self, idx: list[int]) -> torch.Tensor:
        """The cache rows of sequences `idx`, one after the other (on the host)."""
        return torch.tensor([r for i in idx for r in range(self.offsets[i], self.offsets[i + 1])])

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Cache rows `rows` (on the host), on the model's device. From host memory to a GPU they
        are gathered into one reusable pinned buffer and copied from there without blocking: a
        pinned cache would lock memory in powers of two, a pageable copy would stall the GPU."""
        if not (self.h.device.type == "cpu" and self.model_device.type == "cuda"):
            return self.h[rows.to(self.h.device, non_blocking=True)].to(self.model_device, non_blocking=True)
        if self.staged is not None:
            self.staged.synchronize()  # the last batch's copy out of the buffer is done (long since)
        if self.staging is None or len(self.staging) < len(rows):  # sized by the first (largest) batch
            self.staging = torch.empty(len(rows), self.h.shape[1], dtype=self.h.dtype, pin_memory=True)
        part = torch.index_select(self.h, 0, rows, out=self.staging[:len(rows)])
        h = part.to(self.model_device, non_blocking=True)
        self.staged = torch.cuda.Event()
        self.staged.record(torch.cuda.current_stream(self.model_device))
        return h

    def batch(self, idx: list[int], packed: bool = True) -> tuple[torch.Tensor, Batch]:
        """Sequences `idx` on the model's device: packed back to back (no compute on padding), or
        right-padded to the longest of them."""
        seqs = [self.encoded[i] for i in idx]
        b = pack(seqs, self.row_tokens) if packed else collate(seqs, self.pad_id)
        b = b.to(self.model_device)
        h = torch.zeros(b.ids.numel(), self.h.shape[-1], dtype=self.h.dtype, device=self.model_device)
        h[b.real_at] = self.gather(self.rows_of(idx))  # the real tokens, in the order of rows_of(idx)
        return h.view(*b.ids.shape, -1), b
