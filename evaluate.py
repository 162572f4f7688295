"""
Evaluate a checkpoint: test loss and bits per byte, or exact-match accuracy on math problems.

    python evaluate.py --checkpoint runs/baseline_gpt2/checkpoint.pt                       # loss + bpb
    python evaluate.py --checkpoint runs/baseline_gpt2/checkpoint.pt --task synthetic-math --limit 200
    python evaluate.py --checkpoint runs/gsm8k/checkpoint.pt --task json:../shared/data/gsm8k/train.jsonl

Loss (without --task, or with --loss): the mean next-token loss over the tokens of the first --eval-batches batches
(default: the run's own --eval-batches) of the --split (default test) of the checkpoint's own data (or --data), on
every token, and bits per byte (tokenizer-independent). These are the tokens, and the token mean, of the
trainer's final `test` row, so on one process the two numbers agree (with --loss-on answer the trainer's
"loss" is this script's "answer_loss" and its "loss_all" this "loss"); --eval-batches all takes the whole split.
Data with a loss mask also get "answer_loss" (answer tokens only, what --loss-on answer trains).

Accuracy (--task; no loss unless --loss): for each problem the prompt "Question: {question}\nAnswer:" (exactly
how the data preparer writes a document) is continued greedily, --batch-size problems at a time (one KV cache
per batch, AutoRegressiveModel.generate), each until <|endoftext|>, the end of its "####" line, the start of
a next "\nQuestion:", or --max-new-tokens (default: twice the longest reference solution). Two figures, as
lm-evaluation-harness reports for GSM8K:
    strict    (the headline) the answer on the first "####" line, compared with the reference (score_strict)
    flexible  the last number anywhere in the generated answer (score_flexible)
The rules are in the README's table ("How answers are scored"), each with a test in tests/test_evaluate.py.
    synthetic-math   held-out problems of the split (synthetic_math.held_out_problems, the data seed of the
                     checkpoint's run), accuracy per problem family
    json:PATH        GSM8K format: JSON lines with "question" and "answer" ("... #### 42"). By default only the
                     records the data preparer puts in --split (a hash of the document), so a model trained on
                     the same file is not scored on its training data; --split all takes every record.
--limit N evaluates the first N problems. The run ends with its time and the tokens generated per problem: the
cost is in generated tokens, and a model that never finishes its answer line generates --max-new-tokens for every
problem. On a busy CPU it uses one thread (trainer_console.set_threads_if_busy; docs/evaluation.md has timings).
"""

from plumbing import ctrl_c  # noqa: F401  (first: Ctrl-C during the imports below is one line, exit 130)

import argparse
import contextlib
import json
import math
import os
import re
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import torch
from tqdm import tqdm

from plumbing import cli, trainer_console
import synthetic_math
from auto_regressive_model import left_pad, masked_cross_entropy, scored_tokens
from checkpoint import CheckpointError, load_model, tokenizer_of
from base_data_preparer import ensure_prepared
from data_file_utils import (DataError, atomic_write_bytes, check_run_data, dataset_dir, qa_split_text, read_manifest,
                             same_question, split_of_text)
from dataloader import TokenDataLoader
from models import ModelConfigError

DEFAULT_LIMIT = {"synthetic-math": 200}  # json: every record of the split
# What the loss and json tasks read of the run's settings (its config.json, also in the checkpoint).
RUN_SETTINGS = {"data": str, "data_dir": str, "tokenizer": str, "seq_len": int, "micro_batch_size": int}


class EvalError(Exception):
    """Bad input; printed as one line."""


# ---- answers ---------------------------------------------------------------------------------
#
# A final answer means a number when it starts with one: GSM8K's own rule (grade-school-math's extract_answer:
# the text after "#### ", commas removed, the leading number) and lm-evaluation-harness's strict-match filter
# ("#### (\-?[0-9\.\,]+)") both read "#### 18 dollars" as 18, "#### 5%" as 5 and "#### 3 4" as 3 (never 34).
# Numbers compare exactly, as fractions of their digit strings (no float or 28-digit Decimal rounding), which
# adds what string matching misses: "5.00" = "5", "$5" = "5", "6/8" = "3/4", "4/2" = "2". A number followed by
# an operator ("2 * 2 * 3", "5 - 3") is an expression, compared as text with the spaces around operators
# removed; any other answer compares as text with whitespace collapsed and a final "." dropped.

_LEADING_NUMBER = re.compile(
    r"^(?P<sign>[+-]?)\s*\$?\s*(?P<sign2>[+-]?)(?P<int>\d[\d,]*)?(?P<frac>\.\d*)?"
    r"(?:\s*/\s*(?P<den>\d[\d,]*))?(?P<rest>.*)$")
_OPERATOR = "*×+-/^"
MINUS = "\u2212"  # the typographic minus sign (GPT-2's web text has it): read as "-", never dropped
_ANY_NUMBER = re.compile(r"[+-]?\$?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:/\d+)?")   # for the flexible figure


def _fraction(sign, integer, frac, den):
    """The exact value of a matched number: Fraction from the digit string, commas removed."""
    digits = (integer or "").replace(",", "") + (frac or "").rstrip(".")
    if not any(c.isdigit() for c in digits):
        return None
    value = Fraction(digits if not digits.startswith(".") else "0" + digits)
    if den is not None:
        den = int(den.replace(",", ""))
        if den == 0:
            return None
        value /= den
    return -value if sign == "-" else value


def answer_value(text):
    """What a final answer means: a Fraction when it starts with a number (the rest, e.g. "dollars" or "%",
    is ignored), else its text (an expression or words, normalised for comparison)."""
    s = " ".join(text.replace(MINUS, "-").split())
    m = _LEADING_NUMBER.match(s)
    if m and not m.group("rest").strip()[:1] in tuple(_OPERATOR):
        sign = "-" if (m.group("sign") + m.group("sign2")).count("-") % 2 else "+"
        value = _fraction(sign, m.group("int"), m.group("frac"), m.group("den"))
        if value is not None:
            return value
    s = s.rstrip(".").strip()
    return re.sub(r"\s*([" + re.escape(_OPERATOR) + r"])\s*", r"\1", s.replace("$", "")).lower()


def normalize_answer(text):
    """A canonical string of an answer, for reading: '1,234' -> '1234', '-3.50' -> '-3.5', '6/8' -> '3/4'."""
    value = answer_value(text)
    if not isinstance(value, Fraction):
        return value
    if value.denominator == 1:
        return str(value.numerator)
    decimal = None if "/" in text else _finite_decimal(value)
    return decimal if decimal is not None else f"{value.numerator}/{value.denominator}"


def _finite_decimal(value):
    """'3.5' for 7/2: the exact decimal of a fraction whose denominator has no prime but 2 and 5, else None."""
    den, twos, fives = value.denominator, 0, 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    if den != 1 or value.denominator == 1:
        return None
    places = max(twos, fives)
    scaled = abs(value.numerator) * 10 ** places // value.denominator
    sign = "-" if value < 0 else ""
    return f"{sign}{scaled // 10 ** places}.{str(scaled % 10 ** places).zfill(places)}".rstrip("0")


def extract_answer(text):
    """The final answer of a worked solution: the rest of the first '####' line, or None. (The first: what
    a model writes after its answer line, e.g. a next question of its own, does not count.)"""
    if "####" not in text:
        return None
    return text.split("####", 1)[1].split("\n", 1)[0].strip()


def same_answer(a, b):
    return answer_value(a) == answer_value(b)


def score_strict(generated, reference):
    """The headline figure: the answer on the first '####' line equals the reference. No '####': wrong."""
    answer = extract_answer(generated)
    return answer is not None and answer != "" and same_answer(answer, reference)


def score_flexible(generated, reference):
    """lm-evaluation-harness's flexible-extract: the last number anywhere in the generated answer equals the
    reference. A reference that is not a number (an expression such as '2 * 2 * 3') is scored as strict."""
    if not isinstance(answer_value(reference), Fraction):
        return score_strict(generated, reference)
    numbers = _ANY_NUMBER.findall(generated.replace(MINUS, "-"))
    return bool(numbers) and same_answer(numbers[-1], reference)



def answer_text(generated):
    """The generated answer, cut where the evaluation stops reading: at a next '\\nQuestion:' the model
    starts by itself, and after the end of the first '####' line."""
    text = generated.split("\nQuestion:", 1)[0]
    if "####" in text:
        head, tail = text.split("####", 1)
        if "\n" in tail:
            text = head + "####" + tail.split("\n", 1)[0] + "\n"
    return text


def answer_is_complete(generated):
    """True once the generated text holds a finished '####' line or the start of a next question."""
    if "\nQuestion:" in generated:
        return True
    return "####" in generated and "\n" in generated.split("####", 1)[1]


# ---- problems --------------------------------------------------------------------------------

def task_problems(task, split, limit, data_seed, trained_on=None):
    """[{"question", "final", "family", "solution"}] of --task (solution: the reference worked answer).
    trained_on: the prepared dataset of the run, when it trained on this json file (see run_dataset)."""
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
    problems, first_of_question, repeated = [], {}, False
    for lineno, line in enumerate(_task_lines(path), 1):
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
        if any("\ud800" <= c <= "\udfff" for c in q + a):  # "\ud800" in JSON: not text, no tokenizer takes it
            raise EvalError(f"{path}: line {lineno} holds a lone surrogate escape (such as \"\\ud800\"), which is "
                            f"not text; fix or remove that record")
        # the data preparer's split of this record: that of the first record with its question
        key = first_of_question.setdefault(same_question(q), qa_split_text(q, a))
        repeated = repeated or key != qa_split_text(q, a)
        if split != "all" and split_of_text(key).value != split:
            continue
        problems.append({"question": q, "final": extract_answer(a), "family": "all", "solution": a})
        if limit and len(problems) == limit:
            break
    if repeated and split != "all" and trained_on is not None and "qa_split" not in _manifest_or_none(trained_on):
        raise EvalError(f"{path} asks some questions more than once, and the run's data ({trained_on}) was prepared "
                        f"before all answers to one question were kept in one split: some {split} questions were "
                        f"trained on; prepare it again (base_data_preparer.py --replace) and retrain, or --split all")
    if not problems:
        raise EvalError(f"{path}: no GSM8K records in split {split!r}; try --split all")
    return problems


def _task_lines(path):
    """The lines of a --task file, one at a time (read as far as --limit needs); EvalError for a line that is not
    UTF-8 text or a file that cannot be read."""
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise EvalError(f"{path}: line {lineno} is not valid UTF-8; convert the file to UTF-8") from None
    except OSError as e:
        raise EvalError(f"--task {path} cannot be read ({e.strerror or e})") from None


def _manifest_or_none(directory):
    try:
        return read_manifest(directory)
    except DataError:
        return {}


def check_run_settings(cfg, checkpoint):
    """EvalError unless the run settings a checkpoint records (its config.json) hold what the loss and json tasks
    read, with the right types: a checkpoint edited by hand or written by another program fails here, in one line."""
    for key, kind in RUN_SETTINGS.items():
        if not isinstance(cfg.get(key), kind):
            raise EvalError(f"checkpoint {checkpoint} has no usable '{key}' (a {kind.__name__}) in its run settings, "
                            f"which the loss and json tasks read; use a checkpoint written by an lmsmall training script")


def run_dataset(task, cfg, data_dir=None):
    """The folder of the run's prepared data if the run trained on the json file of --task, else None."""
    if not task.startswith("json:"):
        return None
    kind, _, path = cfg["data"].partition(":")
    same = kind == "json" and Path(path).expanduser().resolve() == Path(task[5:]).expanduser().resolve()
    return dataset_dir(data_dir or cfg["data_dir"], cfg["data"], cfg["tokenizer"], max_tokens=cfg.get("max_tokens")) \
        if same else None


# ---- generation ------------------------------------------------------------------------------

def question_prompt(enc, question):
    return [enc.eot_token] + enc.encode_ordinary(f"Question: {question}\nAnswer:")  # as the preparer: never special


def greedy_answers(model, enc, questions, max_new_tokens, batch_size=32, show_progress=False):
    """Greedy answers to the questions (answer_text of each), in the order of the questions."""
    return generate_answers(model, enc, questions, max_new_tokens, batch_size, show_progress)[0]


@torch.no_grad()
def generate_answers(model, enc, questions, max_new_tokens, batch_size=32, show_progress=False):
    """Greedy answers to the questions, batch_size at a time (shortest prompts batched together, so that
    little padding is computed); each row stops at <|endoftext|> or once answer_is_complete. Returns the
    answer texts (answer_text) and the number of tokens generated for each (what the answers cost: a model
    that never finishes its answer line generates max_new_tokens), both in the order of the questions."""
    device = next(model.parameters()).device
    prompts = [question_prompt(enc, q) for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers, lengths = [None] * len(prompts), [0] * len(prompts)
    bar = tqdm(total=len(prompts), desc="problems", unit="problem", disable=not show_progress)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        idx, key_mask = left_pad([prompts[i] for i in batch], device)
        out = model.generate(idx, max_new_tokens, top_k=1, vocab_limit=enc.n_vocab,
                             prompt_lengths=key_mask.sum(dim=1), eos_token=enc.eot_token,
                             stop=lambda new: answer_is_complete(enc.decode(new)))
        for i, row in zip(batch, out[:, idx.size(1):].tolist()):
            lengths[i] = len(row)
            if enc.eot_token in row:
                row = row[:row.index(enc.eot_token)]
                # a row that finished its answer is filled with <|endoftext|>; one the model ended wrote it
                lengths[i] = len(row) + (not answer_is_complete(enc.decode(row)))
            answers[i] = answer_text(enc.decode(row))
        bar.update(len(batch))
    bar.close()
    return answers, lengths


def accuracy(model, enc, problems, max_new_tokens, batch_size=32, show_progress=True):
    """Exact match per family: {family: {"strict": n, "flexible": n, "total": n}}, and every answer."""
    texts, lengths = generate_answers(model, enc, [p["question"] for p in problems], max_new_tokens, batch_size,
                                     show_progress)
    per_family, outputs = {}, []
    for p, text, n_new in zip(problems, texts, lengths):
        strict, flexible = score_strict(text, p["final"]), score_flexible(text, p["final"])
        counts = per_family.setdefault(p["family"], {"strict": 0, "flexible": 0, "total": 0})
        counts["strict"] += strict
        counts["flexible"] += flexible
        counts["total"] += 1
        outputs.append({"question": p["question"], "family": p["family"], "reference": p["final"],
                        "generated": text, "new_tokens": n_new, "correct": strict, "correct_flexible": flexible})
    return per_family, outputs


# ---- loss ------------------------------------------------------------------------------------

@torch.no_grad()
def test_loss(model, loader, n_batches, filler_id=None, show_progress=True):
    """The trainer's evaluation (base_trainer.evaluate on one process): the mean loss over the tokens of the
    first n_batches batches, on every token ("loss", and its bpb) and, when the data have a loss mask, on
    answer tokens only ("answer_loss"; a batch weighs as many answer tokens as it holds). With the run's
    --filler-token, filler keys are masked and filler targets not scored, as in training. n_batches past the
    split's end wraps around, as the trainer's loader does."""
    sums, counts = {}, {}
    for _ in tqdm(range(n_batches), desc="loss", unit="batch", disable=not show_progress):
        x, y, *rest = loader.next_batch()
        answer_mask, key_mask, scored = (rest[0] if rest else None), None, None
        if filler_id is not None:
            key_mask, scored = x != filler_id, (y != filler_id).float()
            answer_mask = None if answer_mask is None else answer_mask * scored
        logits, _ = model(x) if key_mask is None else model(x, key_mask=key_mask)
        losses = {"loss": (masked_cross_entropy(logits, y, scored), scored)}
        if answer_mask is not None:
            losses["answer_loss"] = (masked_cross_entropy(logits, y, answer_mask), answer_mask)
        for k, (v, mask) in losses.items():  # token means: each batch weighs the tokens it scored
            n = float(scored_tokens(y, mask))
            sums[k] = sums.get(k, 0.0) + float(v) * n
            counts[k] = counts.get(k, 0.0) + n
    means = {k: sums[k] / max(1.0, counts[k]) for k in sums}
    means["bpb"] = means["loss"] / math.log(2) * loader.tokens / max(1, loader.bytes)
    return {**means, "batches": n_batches, "tokens": n_batches * loader.B * loader.T}


def eval_batches(text):
    if text == "all":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'all', got {text!r}")
    return int(text)


# ---- command line ----------------------------------------------------------------------------

def main(argv=None):
    p = cli.ArgumentParser(description="Test loss, bits per byte and math accuracy of an lmsmall checkpoint.")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint file, a run folder (its checkpoint.pt) or hf:NAME_OR_DIR")
    p.add_argument("--data", type=cli.data_spec, help="data for the loss (default: the checkpoint's own)")
    p.add_argument("--data-dir", help="where prepared data live (default: the run's)")
    p.add_argument("--split", default="test", choices=["val", "test", "all"],
                   help="which split (all: every record of a json --task; the loss then uses test)")
    p.add_argument("--eval-batches", type=eval_batches,
                   help="loss batches: N or all (one pass over the split); default: the run's --eval-batches, "
                        "so the figure is the trainer's final test loss")
    p.add_argument("--loss", action="store_true", help="also compute the loss when a --task is given")
    p.add_argument("--no-loss", action="store_true", help="skip the loss")
    p.add_argument("--task", help="synthetic-math | json:PATH (GSM8K format): exact-match accuracy (no loss "
                                  "unless --loss)")
    p.add_argument("--limit", type=cli.positive_int, help="evaluate the first N problems (default: synthetic-math 200, json all)")
    p.add_argument("--batch-size", type=cli.positive_int, default=None,
                   help="problems generated at once (default: 32 on a CPU, 128 on a GPU)")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=None,
                   help="longest generated answer (default: twice the longest reference solution, in tokens)")
    p.add_argument("--device", type=cli.device, default="auto", help="auto (cuda if available, else cpu), cpu, "
                   "cuda, cuda:N, mps")
    p.add_argument("--out", type=cli.output_file, help="write every figure (and the generated answers) to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = p.parse_args(argv)
    args.device = cli.pick_device(args.device)
    batch_size = args.batch_size if args.batch_size is not None else (32 if args.device == "cpu" else 128)
    try:
        if args.limit is not None and args.limit < 1:
            raise EvalError("--limit must be >= 1")
        if batch_size < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
            raise EvalError("--batch-size and --max-new-tokens must be >= 1")
        do_loss = (args.loss or not args.task) and not args.no_loss
        if not do_loss and not args.task:
            raise EvalError("nothing to do: --no-loss without a --task")
        if args.out and os.path.exists(args.out) and not args.overwrite:
            raise EvalError(f"{args.out} already exists; add --overwrite to replace it or choose another --out")
        model, ckpt = load_model(args.checkpoint, device=args.device)
        if getattr(model.config, "attention", "causal") != "causal":
            raise EvalError(f"{args.checkpoint} is an encoder ({model.config.attention} attention, e.g. MNTP): it "
                            f"predicts no next token; embed with embed.py instead")
        cfg = ckpt["config"]
        enc = tokenizer_of(model, ckpt, args.checkpoint)
        if do_loss or (args.task or "").startswith("json:"):
            check_run_settings(cfg, args.checkpoint)
        problems = None
        if args.task:  # validated before any loss is computed
            problems = task_problems(args.task, args.split, args.limit, cfg.get("data_seed", 1337),
                                     run_dataset(args.task, cfg, args.data_dir))
        if args.out:  # now, not after the whole evaluation
            check_output(args.out)
        threads = trainer_console.set_threads_if_busy(torch.device(args.device).type)
        if threads:
            print(threads)
        result = {"checkpoint": str(args.checkpoint), "model": ckpt["model_name"], "step": ckpt.get("step")}
        if do_loss:
            result["loss"] = run_loss(args, model, cfg)
            r = result["loss"]
            extra = f" | answer loss {r['answer_loss']:.4f}" if "answer_loss" in r else ""
            print(f"{r['split']} loss {r['loss']:.4f} (every token){extra} | bpb {r['bpb']:.4f} | the first "
                  f"{r['batches']} batches ({r['tokens']:,} tokens) of {r['data']}")
        if problems:
            max_new = args.max_new_tokens or 2 * max(len(enc.encode_ordinary(" " + p["solution"])) for p in problems)
            started = time.perf_counter()
            per_family, outputs = accuracy(model, enc, problems, max_new, batch_size, not args.quiet)
            seconds = time.perf_counter() - started
            result["accuracy"] = accuracy_summary(args, problems, per_family, outputs)
            result["accuracy"].update(generation_cost(outputs, max_new, seconds))
            print_accuracy(per_family)
            print(cost_line(result["accuracy"], batch_size))
    except (EvalError, CheckpointError, DataError, ModelConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode("utf-8"))  # never half a file
        except OSError as e:  # e.g. a full disk
            print(f"error: could not write {args.out} ({e.strerror or e}); the figures are printed above: free some "
                  f"space or choose another --out", file=sys.stderr)
            return 1
    return 0


def check_output(path):
    """EvalError unless a file can be created where --out goes, found before a long evaluation: its missing
    folders are made and a nameless file is opened there; then the folders made here are removed again (the
    result and its folders are written at the end)."""
    folder = os.path.dirname(os.path.abspath(path))
    made, parent = [], folder
    while not os.path.isdir(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise EvalError(f"--out {path} cannot be written ({e.strerror or e}); choose another --out") from None
    finally:
        for d in made:  # deepest first; only the folders made here, and only while empty
            with contextlib.suppress(OSError):
                os.rmdir(d)


def run_loss(args, model, cfg):
    """The loss of the checkpoint on its own data (or --data), as the trainer's final evaluation computes it."""
    from base_trainer import TrainError, filler_token_id
    data = args.data or cfg["data"]
    same = cli.data_spec(data) == cli.data_spec(cfg["data"])  # older runs recorded json:/text: paths as typed
    directory = ensure_prepared(data, cfg["tokenizer"], data_dir=args.data_dir or cfg["data_dir"],
                                max_tokens=cfg.get("max_tokens") if same else None,
                                seed=cfg.get("data_seed", 1337), quiet=True,
                                run_data_hash=cfg.get("data_hash") if same else None)
    if same:  # the run's own data: it must not have changed since training
        check_run_data(directory, cfg)
    split = "test" if args.split == "all" else args.split
    offset = getattr(model.config, "target_offset", 1)
    masked = bool(read_manifest(directory).get("has_loss_mask"))
    # --eval-batches counts batches of the run's base micro batch (speed.eval_batches), not of the micro batch it
    # trained with (auto on a GPU, or another one given to --resume): so these are the trainer's tokens.
    rows = cfg.get("base_micro_batch_size", cfg["micro_batch_size"])
    loader = TokenDataLoader(directory, split, rows, cfg["seq_len"], target_offset=offset,
                             with_loss_mask=masked, device=args.device, score_answer_end=True)
    n = args.eval_batches or cfg.get("eval_batches", "all")
    n = loader.chunks_per_epoch if n == "all" else n
    try:
        filler_id = filler_token_id(cfg["tokenizer"], cfg["filler_token"]) if cfg.get("filler_token") else None
    except TrainError as e:
        raise EvalError(str(e)) from None
    return {"data": data, "split": split, **test_loss(model, loader, n, filler_id, not args.quiet)}


def accuracy_summary(args, problems, per_family, outputs):
    total = len(problems)
    strict = sum(c["strict"] for c in per_family.values())
    flexible = sum(c["flexible"] for c in per_family.values())
    return {"task": args.task, "split": args.split, "total": total,
            "correct": strict, "accuracy": strict / total,              # the headline: strict
            "strict": {"correct": strict, "accuracy": strict / total},
            "flexible": {"correct": flexible, "accuracy": flexible / total},
            "per_family": {f: {**c, "accuracy": c["strict"] / c["total"],
                               "accuracy_flexible": c["flexible"] / c["total"]}
                           for f, c in sorted(per_family.items())},
            "answers": outputs}


def generation_cost(outputs, max_new_tokens, seconds):
    """What the answers cost: most of the time goes into generated tokens, and a model that never writes its
    answer line generates max_new_tokens for every problem."""
    lengths = [o["new_tokens"] for o in outputs]
    return {"seconds": round(seconds, 2), "max_new_tokens": max_new_tokens,
            "new_tokens_mean": sum(lengths) / len(lengths),
            "reached_max_new_tokens": sum(n >= max_new_tokens for n in lengths)}


def cost_line(acc, batch_size):
    n, s = acc["total"], acc["seconds"]
    return (f"{n} problems in {s:.1f} s ({s / n:.2f} s a problem, batch {batch_size}): "
            f"{acc['new_tokens_mean']:.0f} tokens generated per problem on average; {acc['reached_max_new_tokens']} "
            f"of {n} used all --max-new-tokens ({acc['max_new_tokens']}): no answer line finished before")


def print_accuracy(per_family):
    print("\n| family | problems | exact match (strict) | flexible |\n|---|---|---|---|")
    rows = sorted(per_family.items()) if len(per_family) > 1 else []
    total = {k: sum(c[k] for c in per_family.values()) for k in ("strict", "flexible", "total")}
    for family, c in rows + [("**all**", total)]:
        print(f"| {family} | {c['total']} | {c['strict']} ({c['strict'] / c['total']:.1%}) | "
              f"{c['flexible']} ({c['flexible'] / c['total']:.1%}) |")


if __name__ == "__main__":
    sys.exit(main())
