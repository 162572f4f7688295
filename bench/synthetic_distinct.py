"""
How many different problems synthetic-math really holds, and whether val/test are really held out
(a script, not a test): one table, a row per family, over the first problems of the stream that fill a
token budget (the preparer's default, 10M tokens).

  questions       problems in the budget
  distinct q      distinct question texts; dup q = the share that repeats an earlier question word for word
  distinct p      distinct problems (synthetic_math.problem_key: the numbers and the final answer, wording
                  ignored); dup p = the share that is an earlier problem again, perhaps reworded
  val+test        problems that the split puts in val or test
  train twins     of those, how many have a train problem of the same family with the same numbers in the
                  same order and the same final answer (a paraphrase: other name, item or template). Must be 0.

    python bench/synthetic_distinct.py                      # 10M bytes tokens (~60k problems, ~15 s)
    python bench/synthetic_distinct.py --tokenizer gpt2     # 10M GPT-2 tokens (more problems)
    python bench/synthetic_distinct.py --tiny               # 2,000 problems, for the tests
"""
import argparse
import os
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = ROOT.parent / "shared" / "tiktoken-cache"
if CACHE.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(CACHE))

import synthetic_math as sm  # noqa: E402
from data_file_utils import Split  # noqa: E402

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def twin_key(problem):
    """The held-out test's definition of a twin, kept apart from problem_key on purpose: same family, same numbers
    in the same order, same final answer."""
    return problem["family"], tuple(NUMBER.findall(problem["question"])), problem["final"]


def problems_in_budget(seed, tokens, tokenizer, limit=None):
    """The first problems of the stream whose documents (+ one <|endoftext|> each) fill `tokens`."""
    if tokenizer == "gpt2":
        import tiktoken
        enc = tiktoken.get_encoding("gpt2")
        size = lambda doc: len(enc.encode_ordinary(doc)) + 1  # noqa: E731
    else:
        size = lambda doc: len(doc.encode("utf-8")) + 1  # noqa: E731
    out, used = [], 0
    for p in sm.problems(seed):
        if (limit is not None and len(out) >= limit) or used >= tokens:
            return out
        used += size(sm.format_document(p))
        out.append(p)


def count(problems):
    """Per family (and 'all'): [questions, distinct q, distinct p, val+test, train twins]."""
    split = [sm.problem_split(p["question"], p["final"]) for p in problems]
    train_twins = {twin_key(p) for p, s in zip(problems, split) if s == Split.TRAIN}
    rows = defaultdict(lambda: [0, set(), set(), 0, 0])
    for p, s in zip(problems, split):
        for fam in (p["family"], "all"):
            r = rows[fam]
            r[0] += 1
            r[1].add(p["question"])
            r[2].add(sm.problem_key(p["question"], p["final"]) if fam == "all" else
                     (fam, sm.problem_key(p["question"], p["final"])))
            if s != Split.TRAIN:
                r[3] += 1
                r[4] += twin_key(p) in train_twins
    return {fam: [r[0], len(r[1]), len(r[2]), r[3], r[4]] for fam, r in rows.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--tokens", type=float, default=10e6, help="token budget (default 10M, the preparer's)")
    p.add_argument("--tokenizer", choices=["bytes", "gpt2"], default="bytes")
    p.add_argument("--tiny", action="store_true", help="the first 2,000 problems only (for the tests)")
    args = p.parse_args()
    problems = problems_in_budget(args.seed, args.tokens, args.tokenizer, limit=2000 if args.tiny else None)
    rows = count(problems)
    print(f"synthetic-math seed {args.seed}: the first {len(problems):,} problems"
          + ("" if args.tiny else f" ({args.tokens / 1e6:g}M {args.tokenizer} tokens)"))
    header = ["family", "questions", "distinct q", "dup q", "distinct p", "dup p", "val+test", "train twins"]
    table = [header]
    for fam in sorted(set(rows) - {"all"}) + ["all"]:
        n, dq, dp, held, twins = rows[fam]
        table.append([fam, f"{n:,}", f"{dq:,}", f"{1 - dq / n:.1%}", f"{dp:,}", f"{1 - dp / n:.1%}", f"{held:,}",
                      f"{twins:,}"])
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        print("| " + " | ".join(x.ljust(w) if j == 0 else x.rjust(w) for j, (x, w) in enumerate(zip(r, widths))) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) if j == 0 else "-" * (w + 1) + ":" for j, w in enumerate(widths)) + "|")


if __name__ == "__main__":
    main()
