"""
Evaluate a checkpoint: test loss and bits per byte, and exact-match accuracy on math problems.

    python evaluate.py --checkpoint runs/baseline_gpt2/checkpoint.pt                       # loss + bpb
    python evaluate.py --checkpoint runs/baseline_gpt2/checkpoint.pt --task synthetic-math --limit 200
    python evaluate.py --checkpoint runs/gsm8k/checkpoint.pt --task json:../shared/data/gsm8k/train.jsonl

Loss: the mean next-token loss over the --split (default test) of the checkpoint's own data (or --data), every
token, and bits per byte (tokenizer-independent). Data with a loss mask also get "answer_loss" (answer tokens
only, what --loss-on answer trains).

Accuracy (--task): for each problem the prompt "Question: {question}\\nAnswer:" (exactly how the data preparer
writes a document) is continued greedily (top_k=1, KV cache) until <|endoftext|>, the end of the "#### ..." line,
or --max-new-tokens (default: twice the longest reference solution). The rest of the first "####" line is the
answer; it is right when it equals the reference after normalisation ("1,234" == "1234", "3.50" == "3.5",
"$5" == "5", "6/8" == "3/4"; anything else compares with whitespace collapsed, e.g. "2 * 2 * 3"). No "####"
at all counts as wrong.
    synthetic-math   held-out problems of the split (synthetic_math.held_out_problems, the data seed of the
                     checkpoint's run), accuracy per problem family
    json:PATH        GSM8K format: JSON lines with "question" and "answer" ("... #### 42"). By default only the
                     records the data preparer puts in --split (a hash of the document), so a model trained on
                     the same file is not scored on its training data; --split all takes every record.
--limit N evaluates the first N problems.
"""

import json
import math
import re
import sys
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path

import torch
from tqdm import tqdm

import cli
import synthetic_math
from auto_regressive_model import AutoRegressiveModel, CheckpointError, masked_cross_entropy
from base_data_preparer import ensure_prepared, get_tokenizer
from data_file_utils import DataError, read_manifest, split_of_text
from dataloader import TokenDataLoader
from models import ModelConfigError

DEFAULT_LIMIT = {"synthetic-math": 200}  # json: every record of the split


class EvalError(Exception):
    """Bad input; printed as one line."""


# ---- answers ---------------------------------------------------------------------------------

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_FRACTION = re.compile(r"^[+-]?\d+/\d+$")


def normalize_answer(text):
    """A canonical string for comparing final answers: '1,234' -> '1234', '-3.50' -> '-3.5', '$5.' -> '5',
    '6/8' -> '3/4', '4/2' -> '2'; other text is stripped and its whitespace collapsed."""
    s = " ".join(text.strip().split())
    s = s.rstrip(".").strip()
    compact = s.replace(",", "").replace("$", "").replace(" ", "")
    if _NUMBER.match(compact):
        try:
            d = Decimal(compact).normalize()
        except InvalidOperation:
            return s
        out = format(d, "f")
        return "0" if out in ("-0", "+0") else out
    if _FRACTION.match(compact):
        num, den = compact.split("/")
        if int(den) != 0:
            f = Fraction(int(num), int(den))
            return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"
    return s


def extract_answer(text):
    """The final answer of a worked solution: the rest of the first '####' line, or None. (The first: what
    a model writes after its answer line, e.g. a next question of its own, does not count.)"""
    if "####" not in text:
        return None
    return text.split("####", 1)[1].split("\n", 1)[0].strip()


def is_correct(generated, reference):
    answer = extract_answer(generated)
    return answer is not None and normalize_answer(answer) == normalize_answer(reference)


# ---- problems --------------------------------------------------------------------------------

def task_problems(task, split, limit, data_seed):
    """[{"question", "final", "family", "solution"}] of --task (solution: the reference worked answer)."""
    if task == "synthetic-math":
        if split == "all":
            raise EvalError("--task synthetic-math needs --split val or test (train problems are endless)")
        return [dict(p, solution=p["answer"]) for p in
                synthetic_math.held_out_problems(split, limit or DEFAULT_LIMIT["synthetic-math"], seed=data_seed)]
    kind, _, path = task.partition(":")
    if kind != "json" or not path:
        raise EvalError(f"unknown --task {task!r}; choose synthetic-math or json:PATH (GSM8K format)")
    if not Path(path).is_file():
        raise EvalError(f"--task {task}: no such file")
    problems = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
            q, a = (record.get("question"), record.get("answer")) if isinstance(record, dict) else (None, None)
            if not (isinstance(q, str) and isinstance(a, str)) or extract_answer(a) is None:
                raise EvalError(f"{path}: line {lineno} is not a GSM8K record (string 'question' and 'answer' "
                                f"ending in '#### <number>')")
            # the data preparer's split of this record: a hash of the document text it writes
            if split != "all" and split_of_text(f"Question: {q}\nAnswer: {a}").value != split:
                continue
            problems.append({"question": q, "final": extract_answer(a), "family": "all", "solution": a})
            if limit and len(problems) == limit:
                break
    if not problems:
        raise EvalError(f"{path}: no GSM8K records in split {split!r}; try --split all")
    return problems


# ---- generation ------------------------------------------------------------------------------

@torch.no_grad()
def greedy_answer(model, enc, question, max_new_tokens, chunk=16):
    """Greedy continuation of the question's prompt, stopped at <|endoftext|> or the end of the '####' line.
    Generates `chunk` tokens per model.generate() call (KV cache inside) and checks the stop after each."""
    prompt = [enc.eot_token] + enc.encode(f"Question: {question}\nAnswer:")
    device = next(model.parameters()).device
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    new = []
    while len(new) < max_new_tokens:
        n = min(chunk, max_new_tokens - len(new))
        idx = model.generate(idx, n, top_k=1, vocab_limit=enc.n_vocab)
        new = idx[0, len(prompt):].tolist()
        if enc.eot_token in new:
            new = new[:new.index(enc.eot_token)]
            break
        text = enc.decode(new)
        if "####" in text and "\n" in text.split("####", 1)[1]:
            break
    return enc.decode(new)


def accuracy(model, enc, problems, max_new_tokens, show_progress=True):
    """Exact-match accuracy per family: {family: (correct, total)}, plus the generated answers."""
    per_family, outputs, correct = {}, [], 0
    bar = tqdm(problems, desc="problems", unit="problem", disable=not show_progress)
    for i, p in enumerate(bar):
        text = greedy_answer(model, enc, p["question"], max_new_tokens)
        ok = is_correct(text, p["final"])
        c, t = per_family.get(p["family"], (0, 0))
        per_family[p["family"]] = (c + ok, t + 1)
        correct += ok
        outputs.append({"question": p["question"], "reference": p["final"], "generated": text, "correct": ok})
        bar.set_postfix(acc=f"{correct / (i + 1):.3f}")
    return per_family, outputs


# ---- loss ------------------------------------------------------------------------------------

@torch.no_grad()
def test_loss(model, loader, max_batches=None, show_progress=True):
    """Mean next-token loss over the split (whole chunks; at most max_batches), its bpb, and the answer-only
    loss when the data have a loss mask."""
    n = loader.chunks_per_epoch if max_batches is None else min(max_batches, loader.chunks_per_epoch)
    total, answer_sum, answer_count = 0.0, 0.0, 0.0
    for _ in tqdm(range(n), desc="loss", unit="batch", disable=not show_progress):
        x, y, *mask = loader.next_batch()
        logits, _ = model(x)
        total += float(masked_cross_entropy(logits, y)) / n
        if mask:
            answer_sum += float(masked_cross_entropy(logits, y, mask[0])) * float(mask[0].sum())
            answer_count += float(mask[0].sum())
    out = {"loss": total, "bpb": total / math.log(2) * loader.tokens / max(1, loader.bytes), "batches": n}
    if answer_count:
        out["answer_loss"] = answer_sum / answer_count
    return out


# ---- command line ----------------------------------------------------------------------------

def main(argv=None):
    p = cli.ArgumentParser(description="Test loss, bits per byte and math accuracy of an lmsmall checkpoint.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", help="data for the loss (default: the checkpoint's own)")
    p.add_argument("--data-dir", help="where prepared data live (default: the run's)")
    p.add_argument("--split", default="test", choices=["val", "test", "all"],
                   help="which split (all: every record of a json --task; the loss then uses test)")
    p.add_argument("--eval-batches", type=cli.positive_int, help="at most this many loss batches (default: the whole split)")
    p.add_argument("--no-loss", action="store_true", help="skip the loss")
    p.add_argument("--task", help="synthetic-math | json:PATH (GSM8K format): exact-match accuracy")
    p.add_argument("--limit", type=cli.positive_int, help="evaluate the first N problems (default: synthetic-math 200, json all)")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=None,
                   help="longest generated answer (default: twice the longest reference solution, in tokens)")
    p.add_argument("--device", type=cli.device, default="auto", help="auto (cuda if available, else cpu), cpu, "
                   "cuda, cuda:N, mps")
    p.add_argument("--out", type=cli.output_file, help="write every figure (and the generated answers) to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = p.parse_args(argv)
    args.device = cli.pick_device(args.device)
    try:
        if args.limit is not None and args.limit < 1:
            raise EvalError("--limit must be >= 1")
        if args.out and Path(args.out).exists() and not args.overwrite:
            raise EvalError(f"{args.out} already exists; add --overwrite to replace it or choose another --out")
        model, ckpt = AutoRegressiveModel.from_checkpoint(args.checkpoint, device=args.device)
        if getattr(model.config, "attention", "causal") != "causal":
            raise EvalError(f"{args.checkpoint} is an encoder ({model.config.attention} attention, e.g. MNTP): it "
                            f"predicts no next token; embed with embed.py instead")
        cfg = ckpt["config"]
        enc = get_tokenizer(cfg["tokenizer"])
        result = {"checkpoint": str(args.checkpoint), "model": ckpt["model_name"], "step": ckpt.get("step")}
        if not args.no_loss:
            data = args.data or cfg["data"]
            same = data == cfg["data"]
            directory = ensure_prepared(data, cfg["tokenizer"], data_dir=args.data_dir or cfg["data_dir"],
                                        max_tokens=cfg.get("max_tokens") if same else None,
                                        seed=cfg.get("data_seed", 1337), quiet=True)
            split = "test" if args.split == "all" else args.split
            offset = getattr(model.config, "target_offset", 1)
            masked = bool(read_manifest(directory).get("has_loss_mask"))
            loader = TokenDataLoader(directory, split, cfg["micro_batch_size"], cfg["seq_len"], target_offset=offset,
                                     with_loss_mask=masked, device=args.device, score_answer_end=True)
            result["loss"] = {"data": data, "split": split, **test_loss(model, loader, args.eval_batches,
                                                                        not args.quiet)}
            r = result["loss"]
            extra = f" | answer loss {r['answer_loss']:.4f}" if "answer_loss" in r else ""
            print(f"{split} loss {r['loss']:.4f} | bpb {r['bpb']:.4f}{extra} | {r['batches']} batches of {data}")
        if args.task:
            problems = task_problems(args.task, args.split, args.limit, cfg.get("data_seed", 1337))
            max_new = args.max_new_tokens or 2 * max(len(enc.encode(" " + p["solution"])) for p in problems)
            per_family, outputs = accuracy(model, enc, problems, max_new, not args.quiet)
            correct = sum(c for c, _ in per_family.values())
            result["accuracy"] = {"task": args.task, "split": args.split, "correct": correct,
                                  "total": len(problems), "accuracy": correct / len(problems),
                                  "per_family": {f: {"correct": c, "total": t, "accuracy": c / t}
                                                 for f, (c, t) in sorted(per_family.items())},
                                  "answers": outputs}
            print("\n| family | problems | correct | exact match |\n|---|---|---|---|")
            if len(per_family) > 1:
                for family, (c, t) in sorted(per_family.items()):
                    print(f"| {family} | {t} | {c} | {c / t:.1%} |")
            print(f"| **all** | {len(problems)} | {correct} | {correct / len(problems):.1%} |")
    except (EvalError, CheckpointError, DataError, ModelConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
