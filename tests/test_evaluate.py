"""evaluate.py: the scorer (the table in docs/evaluation.md, row by row), batched greedy answers with their stop rule,
accuracy per family, the loss (the trainer's final test figure), the command line."""

import json
import os
import re
import subprocess

import pytest
import torch

from conftest import REPO, run_script
from test_train import assert_one_line_error

GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def readme_scorer_table():
    """The rows of the "How answers are scored" table in docs/evaluation.md: (rule, generated, reference, strict,
    flexible)."""
    text = (REPO / "docs" / "evaluation.md").read_text(encoding="utf-8")
    section = re.split(r"^#+ How answers are scored$", text, maxsplit=1, flags=re.M)[1]
    rows = []
    for line in section.splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or cells[0] in ("rule", "---"):
            continue
        code = [re.fullmatch(r"`(.*)`", c).group(1).replace("\\n", "\n") for c in cells[1:3]]
        rows.append((cells[0], *code, cells[3], cells[4]))
    return rows


ROWS = readme_scorer_table()


def test_the_readme_table_covers_the_rules_the_issue_names():
    generated = [r[1] for r in ROWS]
    for case in ("#### 3 4", "#### 18 dollars", "#### 5%", "#### $5", "#### 5.00", "#### 6/8", "#### 2 * 2 * 3"):
        assert case in generated, case
    assert any(len(re.sub(r"\D", "", g)) == 29 for g in generated)   # 29 digits, the last one differing
    assert len(ROWS) >= 15


@pytest.mark.parametrize("rule,generated,reference,strict,flexible", ROWS, ids=[r[0][:40] for r in ROWS])
def test_scorer_rule(rule, generated, reference, strict, flexible):
    from evaluate import answer_text, score_flexible, score_strict
    assert strict in ("right", "wrong") and flexible in ("right", "wrong")
    text = answer_text(generated)
    assert score_strict(text, reference) == (strict == "right"), rule
    assert score_flexible(text, reference) == (flexible == "right"), rule


@pytest.mark.parametrize("text,want", [
    ("#### 1,234", "1234"), ("#### -5", "-5"), ("#### 3.50", "3.5"), ("#### $1,000.00", "1000"), ("#### .5", "0.5"),
    ("#### -0", "0"), ("#### 18.", "18"), ("#### 6/8", "3/4"), ("#### 4/2", "2"), ("#### 2 * 2 * 3", "2*2*3"),
    ("#### 1/3", "1/3"), ("#### 18 dollars", "18"), ("#### 12345678901234567890123456789", "12345678901234567890123456789"),
    ("x = 4\n#### 7\nQuestion: more #### 9", "7"),   # the line after the first '####' is not the answer
])
def test_normalized_final_answer(text, want):
    from evaluate import extract_answer, normalize_answer
    assert normalize_answer(extract_answer(text)) == want


def test_numbers_compare_exactly_not_to_28_digits():
    from evaluate import answer_value, score_strict
    a, b = "1" * 28 + "2", "1" * 28 + "3"
    assert answer_value(a) != answer_value(b) and not score_strict(f"#### {a}", b)
    assert score_strict("#### 0.30000000000000000000000000001", "0.30000000000000000000000000001")
    assert not score_strict("#### 0.30000000000000000000000000001", "0.3")


def test_gsm8k_answers_parse_and_compare():
    from evaluate import extract_answer, score_flexible, score_strict
    records = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    finals = [extract_answer(r["answer"]) for r in records]
    assert finals[0] == "72" and any("," in f for f in finals)
    # every reference solution scores right against its own final answer, strict and flexible
    assert all(f and score_strict(r["answer"], f) and score_flexible(r["answer"], f) for r, f in zip(records, finals))
    # GSM8K's own rule (text after '#### ', commas removed, the leading number) agrees with ours on every record
    gsm8k_rule = [re.search(r"#### (\-?[0-9\.\,]+)", r["answer"]).group(1).replace(",", "") for r in records]
    from evaluate import answer_value
    assert all(answer_value(g) == answer_value(f) for g, f in zip(gsm8k_rule, finals))


# ---- batched answers -----------------------------------------------------------------------------

def scripted_model(enc, continuation, vocab=320):
    """A real tiny model whose sampler is replaced: at step k every row gets token k of `continuation`,
    then <|endoftext|>s. So the batched generate() and its stop rule run as in evaluation."""
    from models import create_model
    model = create_model("baseline_gpt2", preset="tiny", vocab_size=vocab, n_layer=1).eval()
    tokens = enc.encode(continuation, allowed_special="all")
    state = {"step": 0}

    def sample(logits, *args, **kwargs):
        k = state["step"]
        state["step"] += 1
        return torch.full((logits.size(0),), tokens[k] if k < len(tokens) else enc.eot_token)
    model.sample = sample
    return model, state


def test_greedy_answers_stop_at_the_answer_line_endoftext_or_a_next_question():
    from base_data_preparer import get_tokenizer
    from evaluate import greedy_answers
    enc = get_tokenizer("bytes")
    model, state = scripted_model(enc, " 2 + 3 = 5.\n#### 5\nQuestion: what next? #### 6" + "x" * 200)
    assert greedy_answers(model, enc, ["2 + 3?", "a longer question, padded less"], 500) == [" 2 + 3 = 5.\n#### 5\n"] * 2
    assert state["step"] == len(" 2 + 3 = 5.\n#### 5\n")   # stopped at the end of the '####' line
    model, state = scripted_model(enc, " 5<|endoftext|>Question: 1 + 1?")
    assert greedy_answers(model, enc, ["2 + 3?"], 500) == [" 5"] and state["step"] == 3  # " ", "5", eot
    model, state = scripted_model(enc, " 5\nQuestion: 1 + 1?\nAnswer: 2")
    assert greedy_answers(model, enc, ["2 + 3?"], 500) == [" 5"]      # the model's next question is cut
    model, state = scripted_model(enc, " 5 5 5 5 5 5 5 5")
    assert greedy_answers(model, enc, ["q"], 10) == [" 5 5 5 5 5"] and state["step"] == 10  # --max-new-tokens


def test_greedy_answers_batched_equal_one_at_a_time():
    """A real (untrained) model: batch sizes 1 and 4 over prompts of different lengths give the same texts."""
    import synthetic_math
    from base_data_preparer import get_tokenizer
    from evaluate import greedy_answers
    from models import create_model
    enc = get_tokenizer("bytes")
    torch.manual_seed(0)
    model = create_model("baseline_gpt2", preset="tiny", vocab_size=320).eval()
    questions = [p["question"] for p in synthetic_math.held_out_problems("test", 6)]
    assert len({len(q) for q in questions}) > 3
    one = greedy_answers(model, enc, questions, 25, batch_size=1)
    assert greedy_answers(model, enc, questions, 25, batch_size=4) == one


def test_accuracy_per_family_strict_and_flexible():
    from fractions import Fraction

    import synthetic_math
    from base_data_preparer import get_tokenizer
    from evaluate import accuracy, answer_value
    enc = get_tokenizer("bytes")
    problems = synthetic_math.held_out_problems("test", 8)
    wrong_family = problems[0]["family"]

    class Oracle(torch.nn.Module):  # answers right except one family (there: the number without '####')
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, idx, max_new_tokens, prompt_lengths=None, eos_token=None, **kw):
            rows = []
            for row, n in zip(idx.tolist(), prompt_lengths.tolist()):
                prompt = enc.decode(row[len(row) - n:])
                p = next(p for p in problems if f"Question: {p['question']}\n" in prompt)
                text = " " + (p["answer"] if p["family"] != wrong_family else f"so {p['final']}") + "<|endoftext|>"
                rows.append(enc.encode(text, allowed_special="all"))
            n = max(map(len, rows))
            new = torch.tensor([r + [eos_token] * (n - len(r)) for r in rows])
            return torch.cat([idx, new], dim=1)

    per_family, outputs = accuracy(Oracle(), enc, problems, 400, batch_size=3, show_progress=False)
    assert [o["question"] for o in outputs] == [p["question"] for p in problems]   # the problems' order
    assert sum(c["total"] for c in per_family.values()) == 8
    for p, o in zip(problems, outputs):
        right = p["family"] != wrong_family
        assert o["correct"] == right
        # flexible reads the last number: right everywhere, except where the reference is no number
        assert o["correct_flexible"] == (right or isinstance(answer_value(p["final"]), Fraction))
    for family, c in per_family.items():
        assert c["strict"] == sum(o["correct"] for o in outputs if o["family"] == family)
        assert c["flexible"] == sum(o["correct_flexible"] for o in outputs if o["family"] == family)


def test_json_task_takes_the_requested_split(tmp_path):
    from data_file_utils import split_of_text
    from evaluate import EvalError, task_problems
    problems = task_problems(f"json:{GSM8K}", "test", None, 1337)
    assert 40 < len(problems) < 100  # ~1% of 7,473
    records = {json.loads(line)["question"]: json.loads(line) for line in GSM8K.read_text().splitlines()}
    for p in problems[:10]:
        r = records[p["question"]]
        assert split_of_text(f"Question: {r['question']}\nAnswer: {r['answer']}").value == "test"
        assert p["final"] == r["answer"].rsplit("#### ", 1)[1]
    assert len(task_problems(f"json:{GSM8K}", "all", 25, 1337)) == 25
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "no marker"}\n')
    with pytest.raises(EvalError, match="line 1"):
        task_problems(f"json:{bad}", "all", None, 1337)


def test_a_json_task_asking_questions_again_holds_out_what_the_preparer_held_out(tmp_path):
    """A question asked again takes the split of its first record, in evaluate.py as in the preparer; a run
    whose dataset of that file was prepared before the rule (answers split apart) is refused for val/test."""
    import numpy as np
    from base_data_preparer import get_tokenizer, prepare
    from data_file_utils import read_manifest, write_manifest
    from evaluate import EvalError, run_dataset, task_problems
    lines = GSM8K.read_text().splitlines()[:300]
    again = [json.dumps(dict(r, answer="Let us solve it.\n" + r["answer"])) for r in map(json.loads, lines)]
    src = tmp_path / "qa.jsonl"
    src.write_text("\n".join(lines + again) + "\n")
    d = prepare(f"json:{src}", "bytes", tmp_path / "data", num_workers=1, quiet=True)
    enc, manifest = get_tokenizer("bytes"), read_manifest(d)
    for split in ("val", "test"):
        toks = np.concatenate([np.fromfile(d / n, dtype=np.uint16) for n in manifest["splits"][split]["shards"]])
        docs = enc.decode(toks.tolist()).split("<|endoftext|>")[1:]
        prepared = sorted(t.split("\nAnswer:")[0][len("Question: "):] for t in docs)
        got = sorted(p["question"] for p in task_problems(f"json:{src}", split, None, 1337))
        assert got == prepared and len(got) == 2 * len(set(got))  # each held-out question with both answers
    cfg = dict(data=f"json:{src}", data_dir=str(tmp_path / "data"), tokenizer="bytes", max_tokens=None)
    assert run_dataset(f"json:{src}", cfg) == d and run_dataset(f"json:{GSM8K}", cfg) is None
    assert task_problems(f"json:{src}", "test", None, 1337, trained_on=d)
    del manifest["qa_split"]  # as a dataset prepared before the rule
    write_manifest(d, manifest)
    with pytest.raises(EvalError, match="asks some questions more than once.*prepared before"):
        task_problems(f"json:{src}", "test", None, 1337, trained_on=d)
    assert len(task_problems(f"json:{src}", "all", None, 1337, trained_on=d)) == 600


@pytest.mark.parametrize("tokenizer", ["bytes", "gpt2"])
def test_a_question_holding_the_text_endoftext_is_prompted_as_the_preparer_wrote_it(tokenizer):
    """The preparer encodes the text '<|endoftext|>' inside a document as text; evaluate.py's prompt did
    enc.encode(), which raises on it (a traceback), and would otherwise differ from what the model saw."""
    from base_data_preparer import _encode_pieces, get_tokenizer
    from evaluate import question_prompt
    enc = get_tokenizer(tokenizer)
    q = "A file ends with <|endoftext|>. What is 2 + 2?"
    assert question_prompt(enc, q) == _encode_pieces(enc, [f"Question: {q}\nAnswer:"]).tolist()


# ---- the command line and the loss ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(data_dir, tmp_path_factory):
    from test_answer_loss import trainer
    out = tmp_path_factory.mktemp("eval") / "run"
    assert trainer(data_dir, out, "--max-steps", 2, "--eval-interval", 2, "--eval-batches", 3,
                   "--data-dir", data_dir).train() == 0
    return out


def final_row(run, split):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split][-1]


def test_loss_is_the_trainers_final_test_loss(tiny_run, tmp_path):
    out = tmp_path / "loss.json"
    result = run_script("evaluate.py", "--checkpoint", tiny_run / "checkpoint.pt", "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "test loss" in result.stdout and "every token" in result.stdout and "the first 3 batches" in result.stdout
    loss, row = json.loads(out.read_text())["loss"], final_row(tiny_run, "test")
    assert loss["batches"] == 3
    assert loss["loss"] == pytest.approx(row["loss"], abs=1e-5) and loss["bpb"] == pytest.approx(row["bpb"], abs=1e-5)


def test_out_is_replaced_by_rename_never_written_in_place(tiny_run, tmp_path, monkeypatch):
    """--out was written in place: a kill or a full disk mid-write left half a JSON file under the name. Now
    the whole file goes to a temporary file in the same folder, then os.replace puts it under the name."""
    from pathlib import Path

    from evaluate import main
    out = tmp_path / "result.json"
    out.write_text("old\n")
    seen, real_replace = [], os.replace

    def replace(src, dst):
        if os.path.abspath(dst) == str(out):  # the old file is still whole, the new one complete beside it
            seen.append((os.path.dirname(os.path.abspath(src)), out.read_text(), json.loads(Path(src).read_text())))
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    assert main(["--checkpoint", str(tiny_run / "checkpoint.pt"), "--eval-batches", "1", "--out", str(out),
                 "--overwrite", "--quiet"]) == 0
    assert [(folder, old) for folder, old, _ in seen] == [(str(tmp_path), "old\n")]
    assert json.loads(out.read_text()) == seen[0][2] and seen[0][2]["loss"]["batches"] == 1
    assert os.listdir(tmp_path) == ["result.json"]  # no temporary file left


def test_loss_of_an_answer_only_run_names_both_figures(data_dir, tmp_path):
    from test_answer_loss import trainer
    run = tmp_path / "answer"
    assert trainer(data_dir, run, "--max-steps", 1, "--eval-interval", 1, "--eval-batches", 2, "--loss-on", "answer",
                   "--data-dir", data_dir).train() == 0
    from evaluate import main
    out = tmp_path / "loss.json"
    assert main(["--checkpoint", str(run / "checkpoint.pt"), "--out", str(out), "--quiet"]) == 0
    loss, row = json.loads(out.read_text())["loss"], final_row(run, "test")
    assert loss["answer_loss"] == pytest.approx(row["loss"], abs=1e-5)        # what the run trains on
    assert loss["loss"] == pytest.approx(row["loss_all"], abs=1e-5)           # every token


def test_loss_reads_the_trainers_tokens_when_the_micro_batch_is_not_the_base_one(data_dir, tmp_path, monkeypatch):
    """--eval-batches counts batches of the base micro batch (8, the tiny preset's) whatever micro batch the run
    trained with (here auto picks 16 with a fake memory budget): evaluate.py read 2 x 16 rows, twice the
    trainer's tokens, and so gave another figure than the final test row."""
    from plumbing import speed
    from test_answer_loss import trainer
    monkeypatch.setattr(speed, "device_measures_memory", lambda device: True)
    monkeypatch.setattr(speed, "memory_budget", lambda device, cap: 20_000)
    monkeypatch.setattr(speed, "measure_function", lambda *probe: (lambda b: 1000 * b))
    run = tmp_path / "auto"
    t = trainer(data_dir, run, "--micro-batch-size", "auto", "--seq-len", 32, "--total-batch-size", 512,
                "--max-steps", 1, "--eval-batches", 2, "--data-dir", data_dir)
    assert t.cfg["micro_batch_size"] == 16 and t.cfg["base_micro_batch_size"] == 8
    assert t.train() == 0
    from evaluate import main
    out = tmp_path / "loss.json"
    assert main(["--checkpoint", str(run / "checkpoint.pt"), "--out", str(out), "--quiet"]) == 0
    loss, row = json.loads(out.read_text())["loss"], final_row(run, "test")
    assert loss["tokens"] == 2 * 8 * 32 and loss["loss"] == pytest.approx(row["loss"], abs=1e-5)


def test_evaluate_command_line(tiny_run, tmp_path, capsys):
    out = tmp_path / "result.json"
    result = run_script("evaluate.py", "--checkpoint", tiny_run / "checkpoint.pt", "--task", "synthetic-math",
                        "--limit", 3, "--max-new-tokens", 20, "--batch-size", 2, "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "loss" not in result.stdout                      # an accuracy task computes no loss by default
    assert "| **all** | 3 |" in result.stdout and "strict" in result.stdout and "flexible" in result.stdout
    data = json.loads(out.read_text())
    assert "loss" not in data and data["accuracy"]["total"] == 3 and len(data["accuracy"]["answers"]) == 3
    assert data["accuracy"]["accuracy"] == data["accuracy"]["strict"]["accuracy"]
    assert sum(f["total"] for f in data["accuracy"]["per_family"].values()) == 3
    from evaluate import main
    ckpt = str(tiny_run / "checkpoint.pt")
    assert main(["--checkpoint", ckpt, "--task", "synthetic-math", "--limit", "2", "--max-new-tokens", "5", "--loss",
                 "--eval-batches", "1", "--quiet"]) == 0
    assert "test loss" in capsys.readouterr().out
    for args, words in [(["--no-loss", "--task", "wikipedia"], "--task"), (["--no-loss"], "nothing to do"),
                        (["--out", str(out)], "--overwrite"), (["--task", "synthetic-math", "--batch-size", "0"],
                                                               "--batch-size")]:
        try:  # argparse's one-line errors exit (SystemExit 2), evaluate.py's own checks return 2
            code = main(["--checkpoint", ckpt, *args])
        except SystemExit as e:
            code = e.code
        assert code == 2
        err = capsys.readouterr().err
        assert_one_line_error(subprocess.CompletedProcess([], 2, "", err), words)
    assert json.loads(out.read_text()) == data   # an existing --out is kept
    assert_one_line_error(run_script("evaluate.py", "--checkpoint", tmp_path / "missing.pt"), "missing.pt")
