"""
How fast evaluate.py answers math problems: problems per second, batched (today's evaluate.py) against one at a
time, side by side in one run; and the wall time of a whole GSM8K-sized task with a GPT-2-BPE model.

    python bench/eval_speed.py                                   # synthetic-math, tiny byte model (random weights)
    python bench/eval_speed.py --checkpoint runs/tiny/checkpoint.pt   # a trained model (answers stop by themselves)
    python bench/eval_speed.py --gsm8k ../shared/data/gsm8k/train.jsonl --gsm8k-checkpoint runs/gsm8k/checkpoint.pt
    python bench/eval_speed.py --tiny                            # seconds (tests/test_bench.py runs it)

Part 1, the same --problems held-out synthetic-math problems answered three ways, in interleaved order:
    old        evaluate.py before batched generation: one problem at a time, model.generate() called for 16 tokens at a
               time with the stop rule checked in between; every call builds a new KV cache from the whole
               context (greedy_answer_16_token_chunks below keeps that loop)
    1 x        evaluate.greedy_answers with --batch-size 1: one KV cache per answer, per-row stop
    B x        evaluate.greedy_answers with --batch-size B (the default 32)
The answers of "1 x" and "B x" must be identical (checked), except where a float near-tie flips (a padded
batch sums in another order: logits move by ~1e-6); such answers are counted and their top-2 gap printed. With random weights (no --checkpoint) no answer
stops early: every problem generates --max-new-tokens tokens in every path, so the paths do the same work.

Part 2 (--gsm8k PATH): evaluate.greedy_answers on the first --gsm8k-limit (1,319, GSM8K test's size) records of
a GSM8K-format file, with --gsm8k-checkpoint or a random tiny GPT-2-BPE baseline_gpt2 (vocab 50,304, context
128), at evaluate.py's default --max-new-tokens (twice the longest reference solution, in tokens). A random model
never stops, so that is the worst case: every problem runs to the limit.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.machine import describe as describe_machine  # noqa: E402


def greedy_answer_16_token_chunks(model, enc, question, max_new_tokens, chunk=16):
    """evaluate.py's loop before batched generation, kept for this comparison: one problem, 16 tokens per generate()
    call (a fresh KV cache built from the whole context at every call), the stop rule checked after each."""
    prompt = [enc.eot_token] + enc.encode(f"Question: {question}\nAnswer:")
    idx = torch.tensor([prompt], dtype=torch.long, device=next(model.parameters()).device)
    new = []
    while len(new) < max_new_tokens:
        idx = model.generate(idx, min(chunk, max_new_tokens - len(new)), top_k=1, vocab_limit=enc.n_vocab)
        new = idx[0, len(prompt):].tolist()
        if enc.eot_token in new:
            new = new[:new.index(enc.eot_token)]
            break
        text = enc.decode(new)
        if "####" in text and "\n" in text.split("####", 1)[1]:
            break
    return enc.decode(new)


@torch.no_grad()
def first_difference_gap(model, enc, question, a, b):
    """The gap between the two best logits where answers a and b first differ, in a's context (generate()'s
    window: the last block_size tokens, restarting from the last block_size // 2 when it overflows)."""
    from evaluate import question_prompt
    prompt, a_tokens, b_tokens = question_prompt(enc, question), enc.encode(a), enc.encode(b)
    k = next((j for j, (x, y) in enumerate(zip(a_tokens, b_tokens)) if x != y), min(len(a_tokens), len(b_tokens)))
    W, tokens = model.config.block_size, prompt + a_tokens
    start = max(0, len(prompt) - W)
    for t in range(len(prompt), len(prompt) + k + 1):
        start = t - W // 2 if t - start > W else start
    logits = model(torch.tensor([tokens[start:len(prompt) + k]]))[0][0, -1, :enc.n_vocab]
    top = logits.topk(2).values
    return float(top[0] - top[1])


def load_model(checkpoint, tokenizer, block_size, n_layer=None):
    from checkpoint import load_model
    from base_data_preparer import get_tokenizer
    from models import create_model
    if checkpoint:
        model, ckpt = load_model(checkpoint)
        return model, get_tokenizer(ckpt["config"]["tokenizer"]), f"{checkpoint} (step {ckpt.get('step')})"
    enc = get_tokenizer(tokenizer)
    torch.manual_seed(0)
    overrides = {"n_layer": n_layer} if n_layer else {}
    model = create_model("baseline_gpt2", preset="tiny", vocab_size=-(-(enc.n_vocab) // 64) * 64,
                         block_size=block_size, **overrides).eval()
    return model, enc, f"random baseline_gpt2 tiny ({tokenizer}, context {block_size})"


def part1(args):
    import synthetic_math
    from evaluate import greedy_answers
    model, enc, what = load_model(args.checkpoint, "bytes", 128, 1 if args.tiny else None)
    problems = synthetic_math.held_out_problems("test", args.problems)
    questions = [p["question"] for p in problems]
    max_new = args.max_new_tokens
    print(f"Part 1: {len(questions)} synthetic-math test problems, {what}, --max-new-tokens {max_new}")
    paths = {
        "old (1 at a time, 16-token calls)": lambda: [greedy_answer_16_token_chunks(model, enc, q, max_new)
                                                     for q in questions],
        "batch 1": lambda: greedy_answers(model, enc, questions, max_new, batch_size=1),
        f"batch {args.batch_size}": lambda: greedy_answers(model, enc, questions, max_new,
                                                          batch_size=args.batch_size),
    }
    times, answers = {name: [] for name in paths}, {}
    for _ in range(args.rounds):  # interleaved rounds: machine noise hits every path alike
        for name, run in paths.items():
            t0 = time.perf_counter()
            answers[name] = run()
            times[name].append(time.perf_counter() - t0)
    one, many = answers["batch 1"], answers[f"batch {args.batch_size}"]
    differ = [i for i in range(len(one)) if one[i] != many[i]]
    gaps = [first_difference_gap(model, enc, questions[i], one[i], many[i]) for i in differ]
    # a padded batch sums in another order, so logits move by ~1e-6: only a near-tie may flip
    assert all(g < 1e-4 for g in gaps), f"batched answers differ from one-at-a-time answers (top-2 gaps {gaps})"
    n_tokens = sum(len(enc.encode(a, allowed_special="all")) for a in many)
    base = min(times["old (1 at a time, 16-token calls)"])
    print(f"{'path':36s} {'seconds':>8s} {'problems/s':>11s} {'speedup':>8s}")
    for name, ts in times.items():
        t = min(ts)
        print(f"{name:36s} {t:8.2f} {len(questions) / t:11.2f} {base / t:7.1f}x")
    same = f"{len(one) - len(differ)} of {len(one)}" + ("" if not differ else f"; the others first differ at a "
                                                          f"float near-tie, top-2 logit gap {max(gaps):.1e}")
    print(f"batched answers == one-at-a-time answers: {same} ({n_tokens:,} answer tokens in all; best of "
          f"{args.rounds} round(s))")


def part2(args):
    from evaluate import greedy_answers, task_problems
    model, enc, what = load_model(args.gsm8k_checkpoint, "gpt2", 128, 1 if args.tiny else None)
    problems = task_problems(f"json:{args.gsm8k}", "all", args.gsm8k_limit, 1337)
    max_new = args.gsm8k_max_new_tokens or 2 * max(len(enc.encode(" " + p["solution"])) for p in problems)
    print(f"\nPart 2: {len(problems)} records of {args.gsm8k}, {what}, batch {args.batch_size}, "
          f"--max-new-tokens {max_new}")
    t0 = time.perf_counter()
    answers = greedy_answers(model, enc, [p["question"] for p in problems], max_new, args.batch_size)
    dt = time.perf_counter() - t0
    n_tokens = sum(len(enc.encode(a, allowed_special="all")) for a in answers)
    print(f"wall time {dt:.1f} s for {len(problems)} problems ({len(problems) / dt:.2f} problems/s, "
          f"{n_tokens:,} answer tokens, {n_tokens / dt:,.0f} tokens/s)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--checkpoint", help="part 1: a trained byte-level checkpoint (default: random weights)")
    p.add_argument("--problems", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=112, help="part 1 (default: the mean answer length)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (default 1)")
    p.add_argument("--gsm8k", help="part 2: a GSM8K-format JSON-lines file")
    p.add_argument("--gsm8k-checkpoint", help="part 2: a trained GPT-2-BPE checkpoint (default: random weights)")
    p.add_argument("--gsm8k-limit", type=int, default=1319)
    p.add_argument("--gsm8k-max-new-tokens", type=int, default=None)
    p.add_argument("--tiny", action="store_true", help="a few problems and tokens, one layer (for the tests)")
    args = p.parse_args(argv)
    if args.tiny:
        args.problems, args.batch_size, args.max_new_tokens = 6, 4, 12
        args.gsm8k_limit, args.gsm8k_max_new_tokens = min(args.gsm8k_limit, 8), 6
    torch.set_num_threads(args.threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    print(f"machine: {describe_machine('cpu')}; load average {' '.join(f'{x:.2f}' for x in load)}")
    part1(args)
    if args.gsm8k:
        part2(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
