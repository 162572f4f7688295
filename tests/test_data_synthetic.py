"""synthetic_math.py: families, exact answers, determinism, split by question hash."""
import math
import re
import sys
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import synthetic_math as sm  # noqa: E402
from data_file_utils import Split  # noqa: E402

PROBLEMS = [p for c in range(4) for p in sm.generate_chunk(1337, c)]


def test_all_families_present_and_answer_format():
    assert len(sm.FAMILIES) >= 8
    assert {p["family"] for p in PROBLEMS} == set(sm.FAMILIES)
    for p in PROBLEMS:
        assert set(p) == {"question", "answer", "final", "family"}
        lines = p["answer"].split("\n")
        assert len(lines) >= 2, p  # at least one worked step before the final line
        assert lines[-1] == f"#### {p['final']}"
        assert "####" not in p["question"]
        doc = sm.format_document(p)
        assert doc.startswith("Question: ") and "\nAnswer: " in doc


def test_deterministic_from_seed():
    assert sm.generate_chunk(7, 3) == sm.generate_chunk(7, 3)
    assert sm.generate_chunk(7, 3) != sm.generate_chunk(8, 3)
    assert sm.generate_chunk(7, 3) != sm.generate_chunk(7, 4)
    assert list(sm.documents(7, 1500)) == [sm.format_document(p) for p in
                                           sm.generate_chunk(7, 0) + sm.generate_chunk(7, 1)[:500]]


def _check_final(p):
    """Recompute the final answer from the question text alone; True if checked."""
    q, final, fam = p["question"], p["final"], p["family"]
    if fam == "order_of_operations":
        return eval(q[len("Evaluate "):-1].replace("/", "//")) == int(final)  # operands divide exactly
    if fam == "arithmetic":
        nums = [int(n) for n in re.findall(r"\d+", q)]
        if q.startswith("Divide"):
            return nums[0] % nums[1] == 0 and nums[0] // nums[1] == int(final)
        expr = re.search(r"(\d+ [-+*] \d+)", q).group(1)
        return eval(expr) == int(final)
    if fam == "fractions":
        if q.startswith("Simplify"):
            n, m = map(int, re.search(r"(\d+)/(\d+)", q).groups())
            return Fraction(n, m) == Fraction(final)
        a, b, op, c, d = re.search(r"(\d+)/(\d+) ([-+*]) (\d+)/(\d+)", q).groups()
        x, y = Fraction(int(a), int(b)), Fraction(int(c), int(d))
        return {"+": x + y, "-": x - y, "*": x * y}[op] == Fraction(final)
    if fam == "linear_equation":
        lhs, rhs = q[len("Solve for x: "):-1].split(" = ")
        x = int(final)
        ev = lambda s: eval(re.sub(r"(\d)x", r"\1*x", s).replace("-x", "-1*x"), {"x": x})  # noqa: E731
        return ev(lhs) == ev(rhs)
    if fam == "gcd_lcm_primes":
        nums = [int(n) for n in re.findall(r"\d+", q)]
        if "greatest common divisor" in q:
            return math.gcd(*nums) == int(final)
        if "least common multiple" in q:
            return math.lcm(*nums) == int(final)
        factors = [int(f) for f in final.split(" * ")]
        return math.prod(factors) == nums[0] and all(
            all(f % k for k in range(2, int(f ** 0.5) + 1)) for f in factors) and factors == sorted(factors)
    if fam == "decimals_percentages":
        m = re.match(r"What is (\d+)% of (\d+)\?", q)
        if m:
            return Decimal(m.group(1)) * Decimal(m.group(2)) / 100 == Decimal(final)
        m = re.match(r"Multiply ([\d.]+) by ([\d.]+)\.", q)
        if m:
            return Decimal(m.group(1)) * Decimal(m.group(2)) == Decimal(final)
        n, word, pct = re.match(r"A price of \$(\d+) is (increased|decreased) by (\d+)%", q).groups()
        change = Decimal(n) * Decimal(pct) / 100
        return (Decimal(n) + change if word == "increased" else Decimal(n) - change) == Decimal(final)
    return False


def test_final_answers_are_exact():
    checked = {}
    for p in PROBLEMS:
        if p["family"] in ("polynomial", "word_problem"):
            continue
        assert _check_final(p), p
        checked[p["family"]] = checked.get(p["family"], 0) + 1
    assert len(checked) == 6 and min(checked.values()) > 100


def test_polynomial_answers_by_evaluation():
    for p in PROBLEMS:
        if p["family"] != "polynomial":
            continue
        poly = re.search(r"p\(x\) = (.*?)\. Find", p["question"]).group(1)
        x0 = int(re.search(r"p'?\((-?\d+)\)\?*\.?$", p["question"].rstrip(".")).group(1))
        expr = re.sub(r"(\d)x", r"\1*x", poly).replace("^", "**")
        f = lambda x: eval(expr, {"x": x})  # noqa: E731
        if "p'(x)" in p["question"]:  # exact for a polynomial of degree <= 3: central difference with h=1 is off
            h = Fraction(1, 10 ** 6)    # by f'''/6 * h^2, tiny; round to the integer answer
            value = round((f(x0 + h) - f(x0 - h)) / (2 * h))
        else:
            value = f(x0)
        assert value == int(p["final"]), p


def test_split_is_by_question_hash_and_held_out_is_disjoint():
    split_of = {p["question"]: sm.problem_split(p["question"]) for p in PROBLEMS}
    counts = {s: sum(v == s for v in split_of.values()) for s in Split}
    assert counts[Split.TRAIN] > 0.95 * len(split_of) and counts[Split.VAL] > 0 and counts[Split.TEST] > 0
    val = sm.held_out_problems(Split.VAL, 40, seed=1337)
    test = sm.held_out_problems("test", 40, seed=1337)
    assert len(val) == 40 and len(test) == 40
    assert all(sm.problem_split(p["question"]) == Split.VAL for p in val)
    assert all(sm.problem_split(p["question"]) == Split.TEST for p in test)
    train_questions = {q for q, s in split_of.items() if s == Split.TRAIN}
    assert not train_questions & {p["question"] for p in val + test}
    assert not {p["question"] for p in val} & {p["question"] for p in test}
    assert all(p["answer"].endswith(f"#### {p['final']}") for p in val)
