"""evaluate.py: the answer parser, greedy answers with their stop rule, accuracy per family, the command line."""

import json

import pytest
import torch

from conftest import REPO, run_script
from test_train import assert_one_line_error

GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


@pytest.mark.parametrize("text,want", [
    ("#### 1,234", "1234"), ("#### 1234", "1234"), ("#### -5", "-5"), ("#### 3.50", "3.5"), ("#### 3.5", "3.5"),
    ("#### $1,000.00", "1000"), ("#### 0.50", "0.5"), ("#### .5", "0.5"), ("#### -0", "0"), ("#### 18.", "18"),
    ("#### 6/8", "3/4"), ("#### 4/2", "2"), ("#### 2 * 2 * 3", "2 * 2 * 3"),
    ("x = 4\n#### 7\nQuestion: more #### 9", "7"),   # the line after the first '####' is not the answer
])
def test_normalized_final_answer(text, want):
    from evaluate import extract_answer, normalize_answer
    assert normalize_answer(extract_answer(text)) == want


def test_gsm8k_answers_parse_and_compare():
    from evaluate import extract_answer, is_correct
    assert is_correct("She pays 2 * 617 = 1234.\n#### 1,234", "1234")
    assert is_correct("#### 1234", "1,234")
    assert is_correct("#### -12.50", "-12.5") and not is_correct("#### 12.5", "-12.5")
    assert not is_correct("the answer is 72", "72")           # no '####': wrong
    assert not is_correct("#### 720", "72") and not is_correct("####", "72")
    records = [json.loads(line) for line in GSM8K.read_text().splitlines()[:300]]
    finals = [extract_answer(r["answer"]) for r in records]
    assert all(f and is_correct(r["answer"], f) for r, f in zip(records, finals))
    assert finals[0] == "72"
    assert any("," in f for f in [extract_answer(json.loads(line)["answer"])
                                  for line in GSM8K.read_text().splitlines()])


class ScriptedModel(torch.nn.Module):
    """Stands in for a model: generate() appends the tokens of a fixed continuation, whatever the prompt
    (and then <|endoftext|>s), so that the stop rule and the scoring can be checked exactly."""

    def __init__(self, enc, continuation, block_size=512):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tokens = enc.encode(continuation, allowed_special="all")
        self.eot = enc.eot_token
        self.config = type("Config", (), {"block_size": block_size})()
        self.calls = 0

    def generate(self, idx, max_new_tokens, top_k=None, vocab_limit=None, **kw):
        assert top_k == 1  # greedy
        self.calls += 1
        done = idx.size(1) - self.prompt_len
        more = (self.tokens + [self.eot] * 1000)[done:done + max_new_tokens]
        return torch.cat([idx, torch.tensor([more])], dim=1)


def scripted(enc, continuation, question):
    model = ScriptedModel(enc, continuation)
    model.prompt_len = len(enc.encode(f"Question: {question}\nAnswer:")) + 1
    return model


def test_greedy_answer_stops_at_the_answer_line_or_endoftext():
    from base_data_preparer import get_tokenizer
    from evaluate import greedy_answer
    enc = get_tokenizer("bytes")
    m = scripted(enc, " 2 + 3 = 5.\n#### 5\nQuestion: what next? #### 6" + "x" * 200, "2 + 3?")
    assert greedy_answer(m, enc, "2 + 3?", 500, chunk=8).startswith(" 2 + 3 = 5.\n#### 5\n")
    assert m.calls < 6  # stopped early, not after 500 tokens
    m = scripted(enc, " 5<|endoftext|>Question: 1 + 1?", "2 + 3?")
    assert greedy_answer(m, enc, "2 + 3?", 500) == " 5"
    m = scripted(enc, " 5 5 5 5 5 5 5 5", "q")
    assert len(enc.encode(greedy_answer(m, enc, "q", 10, chunk=4))) == 10  # --max-new-tokens


def test_accuracy_per_family():
    import synthetic_math
    from base_data_preparer import get_tokenizer
    from evaluate import accuracy
    enc = get_tokenizer("bytes")
    problems = synthetic_math.held_out_problems("test", 6)

    class Oracle(ScriptedModel):  # answers every problem right except those of one family
        def generate(self, idx, max_new_tokens, **kw):
            prompt = enc.decode(idx[0].tolist())
            p = next(p for p in problems if p["question"] in prompt)
            right = p["family"] != problems[0]["family"]
            text = " " + (p["answer"] if right else "#### 123456789") + "<|endoftext|>"
            return torch.cat([idx, torch.tensor([enc.encode(text, allowed_special="all")])], dim=1)

    per_family, outputs = accuracy(Oracle(enc, ""), enc, problems, 400, show_progress=False)
    assert sum(t for _, t in per_family.values()) == 6 and len(outputs) == 6
    for family, (correct, total) in per_family.items():
        assert correct == (0 if family == problems[0]["family"] else total)


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


@pytest.fixture(scope="module")
def tiny_run(data_dir, tmp_path_factory):
    from test_answer_loss import trainer
    out = tmp_path_factory.mktemp("eval") / "run"
    assert trainer(data_dir, out, "--max-steps", 2, "--eval-interval", 2, "--data-dir", data_dir).train() == 0
    return out


def test_evaluate_command_line(tiny_run, tmp_path):
    out = tmp_path / "result.json"
    result = run_script("evaluate.py", "--checkpoint", tiny_run / "checkpoint.pt", "--task", "synthetic-math",
                        "--limit", 3, "--max-new-tokens", 20, "--eval-batches", 3, "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "test loss" in result.stdout and "bpb" in result.stdout and "| **all** | 3 |" in result.stdout
    data = json.loads(out.read_text())
    assert data["loss"]["batches"] == 3 and data["loss"]["answer_loss"] > 0
    assert data["accuracy"]["total"] == 3 and len(data["accuracy"]["answers"]) == 3
    assert sum(f["total"] for f in data["accuracy"]["per_family"].values()) == 3
    assert_one_line_error(run_script("evaluate.py", "--checkpoint", tiny_run / "checkpoint.pt", "--no-loss",
                                     "--task", "wikipedia"), "--task")
    assert_one_line_error(run_script("evaluate.py", "--checkpoint", tiny_run / "checkpoint.pt", "--out", out),
                          "--overwrite")  # an existing --out is kept
    assert json.loads(out.read_text()) == data
    assert_one_line_error(run_script("evaluate.py", "--checkpoint", tmp_path / "missing.pt"), "missing.pt")
