"""Greedy evaluation decoding: generate.greedy against transformers' generate.

    python bench/eval_speed.py [--ckpt weights/smollm2-135m] [--edits zsre_2k.json] [--n 100] [--repeat 2] [--threads T]

The prompts are those of the first n edits (edit prompt, rephrases, locality prompts). Both
sides decode the same token ids, prefilled in the same length-sorted batches, left-padded,
greedy, at most 32 new tokens, stopping a row at EOS or at a token whose text holds "." or "\\n"
(a StoppingCriteria for transformers); the answers are then cut the same way
(generate.cut_at_stop). transformers decodes each batch until its longest row stops; ours lets
the unfinished rows of consecutive batches share decoding steps (see generate.greedy), which is
the design difference being measured.
Prints the seconds of each, the ratio, and how many answers differ. A script, not a test.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import generate as G  # noqa: E402
from data import load_edits  # noqa: E402
from model import load  # noqa: E402


def hf_generate_ids(hf, tok, prompts, max_new_tokens, batch_size):
    """transformers' greedy generate over the same batches generate.greedy forms."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    def is_stop(t):  # the token just produced ends the row: "." and "\n" are single bytes
        return t in tok.eos_ids or t == tok.eos_id or any(s in tok.decode([t]) for s in G.EDIT_STOP)

    class StopAtStopToken(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return torch.tensor([is_stop(t) for t in input_ids[:, -1].tolist()], dtype=torch.bool)

    encoded = [tok.encode(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        T = max(len(encoded[i]) for i in rows)
        ids = torch.tensor([[tok.pad_id] * (T - len(encoded[i])) + encoded[i] for i in rows])
        mask = torch.tensor([[0] * (T - len(encoded[i])) + [1] * len(encoded[i]) for i in rows])
        with torch.inference_mode():
            gen = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                              eos_token_id=tok.eos_ids, pad_token_id=tok.pad_id,
                              stopping_criteria=StoppingCriteriaList([StopAtStopToken()]))
        for r, i in enumerate(rows):
            new = []
            for t in gen[r, T:].tolist():  # up to and including the stop token; padding after it
                new.append(t)
                if is_stop(t):
                    break
            out[i] = new
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default=str(ROOT / "weights" / "smollm2-135m"))
    ap.add_argument("--edits", default=str(ROOT.parent / "shared" / "data" / "zsre_2k.json"))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per side, interleaved; the best counts")
    ap.add_argument("--threads", type=int, help="torch threads for both sides (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    edits = load_edits(args.edits, n=args.n)
    prompts = [e.prompt for e in edits] + [r for e in edits for r in e.rephrases] + [p for e in edits for p, _ in e.locality]
    model, tok = load(args.ckpt)
    hf = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32).eval()
    print(f"{len(prompts)} prompts from {args.n} edits of {Path(args.edits).name}; {Path(args.ckpt).name} fp32; "
          f"batch {args.batch_size}, max {args.max_new_tokens} new tokens; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    G.greedy(model, tok, prompts[:4], 4, batch_size=args.batch_size)  # warm-up, both sides
    hf_generate_ids(hf, tok, prompts[:4], 4, args.batch_size)

    # interleaved repeats, best of each: the machine is shared, and a busy moment should not
    # decide the ratio
    t_ours = t_hf = float("inf")
    for _ in range(args.repeat):
        t = time.perf_counter()
        ours = G.greedy(model, tok, prompts, args.max_new_tokens, batch_size=args.batch_size)
        t_ours = min(t_ours, time.perf_counter() - t)
        t = time.perf_counter()
        theirs = hf_generate_ids(hf, tok, prompts, args.max_new_tokens, args.batch_size)
        t_hf = min(t_hf, time.perf_counter() - t)

    a = [G.cut_at_stop(tok.decode(x)) for x in ours]
    b = [G.cut_at_stop(tok.decode(x)) for x in theirs]
    differ = [i for i in range(len(prompts)) if a[i] != b[i]]
    print(f"best of {args.repeat} interleaved runs each")
    print(f"generate.greedy        {t_ours:8.2f} s")
    print(f"transformers generate  {t_hf:8.2f} s")
    print(f"speed-up               {t_hf / t_ours:8.2f}x")
    print(f"answers that differ    {len(differ):5d} of {len(prompts)}")
    print(f"token lists that differ{sum(x != y for x, y in zip(ours, theirs)):6d} of {len(prompts)}")
    for i in differ[:5]:
        print(f"  {prompts[i]!r}: ours {a[i]!r}, transformers {b[i]!r}")


if __name__ == "__main__":
    main()
