"""synthetic_math.py: families, exact answers, determinism, split by problem (not wording), few duplicates."""
import math
import re
import string
import sys
from collections import Counter
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import synthetic_math as sm  # noqa: E402
from data_file_utils import Split  # noqa: E402

PROBLEMS = [p for c in range(4) for p in sm.generate_chunk(1337, c)]
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def test_all_families_present_and_answer_format():
    assert len(sm.FAMILIES) >= 8
    assert {p["family"] for p in PROBLEMS} == set(sm.FAMILIES)
    for p in PROBLEMS:
        assert set(p) == {"question", "answer", "final", "family"}
        lines = p["answer"].split("\n")
        assert len(lines) >= 2, p  # at least one worked step before the final line
        assert lines[-1] == f"#### {p['final']}"
        assert "####" not in p["question"] and "\n" not in p["question"]
        doc = sm.format_document(p)
        assert doc == f"Question: {p['question']}\nAnswer: {p['answer']}"


def test_deterministic_from_seed():
    assert sm.generate_chunk(7, 3) == sm.generate_chunk(7, 3)
    assert sm.generate_chunk(7, 3) != sm.generate_chunk(8, 3)
    assert sm.generate_chunk(7, 3) != sm.generate_chunk(7, 4)
    assert list(sm.documents(7, 1500)) == [sm.format_document(p) for p in
                                           sm.generate_chunk(7, 0) + sm.generate_chunk(7, 1)[:500]]


def _fields(kind, question):
    """The fields of `question` if one of the templates of `kind` wrote it (numbers as str), else None."""
    for template in sm.TEMPLATES[kind]:
        pattern = ""
        for literal, field, _, _ in string.Formatter().parse(template):
            pattern += re.escape(literal)
            if field is not None:
                pattern += f"(?P<{field}>-?[\\d.]+)" if field in "abnmp" else f"(?P<{field}>.+?)"
        m = re.fullmatch(pattern, question)
        if m:
            return m.groupdict()
    return None


def _check_final(p):
    """Recompute the final answer from the question text alone; True if checked."""
    q, final, fam = p["question"], p["final"], p["family"]
    if fam == "order_of_operations":
        return eval(q[len("Evaluate "):-1].replace("/", "//")) == int(final)  # operands divide exactly
    if fam == "arithmetic":
        for kind, op in (("add", "+"), ("sub", "-"), ("mul", "*"), ("div", "/")):
            if f := _fields(kind, q):
                a, b = int(f["a"]), int(f["b"])
                return (a % b == 0 and a // b == int(final)) if op == "/" else eval(f"{a} {op} {b}") == int(final)
        return False
    if fam == "fractions":
        if f := _fields("simplify", q):
            return Fraction(int(f["n"]), int(f["m"])) == Fraction(final)
        a, b, op, c, d = re.search(r"(\d+)/(\d+) ([-+*]) (\d+)/(\d+)", q).groups()
        x, y = Fraction(int(a), int(b)), Fraction(int(c), int(d))
        return {"+": x + y, "-": x - y, "*": x * y}[op] == Fraction(final)
    if fam == "linear_equation":
        lhs, rhs = q[len("Solve for x: "):-1].split(" = ")
        x = int(final)
        ev = lambda s: eval(re.sub(r"(\d)x", r"\1*x", s).replace("-x", "-1*x"), {"x": x})  # noqa: E731
        return ev(lhs) == ev(rhs)
    if fam == "gcd_lcm_primes":
        if f := _fields("gcd", q):
            return math.gcd(int(f["a"]), int(f["b"])) == int(final)
        if f := _fields("lcm", q):
            return math.lcm(int(f["a"]), int(f["b"])) == int(final)
        n = int(_fields("factor", q)["n"])
        factors = [int(f) for f in final.split(" * ")]
        return math.prod(factors) == n and len(factors) >= 2 and factors == sorted(factors) and all(
            all(f % k for k in range(2, int(f ** 0.5) + 1)) for f in factors)
    if fam == "decimals_percentages":
        if f := _fields("percent_of", q):
            return Decimal(f["p"]) * Decimal(f["n"]) / 100 == Decimal(final)
        if f := _fields("times_decimal", q):
            return Decimal(f["a"]) * Decimal(f["b"]) == Decimal(final)
        f = _fields("price_change", q)
        change = Decimal(f["n"]) * Decimal(f["p"]) / 100
        return (Decimal(f["n"]) + change if f["word"] == "increased" else Decimal(f["n"]) - change) == Decimal(final)
    if fam == "word_problem":
        n = [int(x) for x in NUMBER.findall(q)]
        if "change" in q:  # n X at $p each and m Y at $q each, pays with $bill
            return n[4] - n[0] * n[1] - n[2] * n[3] == int(final) >= 0
        if "drives" in q:  # h1 hours at s1, then h2 hours at s2
            return n[0] * n[1] + n[2] * n[3] == int(final)
        if "shares" in q:
            return n[0] // n[1] == int(final)
        if "years old" in q:
            return sum(n) == int(final)
        if "saves" in q:
            return n[0] + n[1] * n[2] - n[3] == int(final) >= 0
        if "square meters" in q:
            return n[0] * n[1] == int(final)
        if "fence" in q:
            return 2 * (n[0] + n[1]) == int(final)
        if "per hour" in q:
            return n[0] * n[1] * n[2] == int(final)
        if "shop" in q:
            return n[0] - n[1] - n[2] + n[3] == int(final) and n[1] + n[2] <= n[0]
    return False


def test_final_answers_are_exact():
    checked = Counter()
    for p in PROBLEMS:
        if p["family"] == "polynomial":
            continue
        assert _check_final(p), p
        checked[p["family"]] += 1
    assert len(checked) == 7 and min(checked.values()) > 100


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


def test_order_of_operations_has_two_to_four_operations():
    with_division = 0
    for p in PROBLEMS:
        if p["family"] == "order_of_operations":
            ops = re.findall(r" [-+*/] ", p["question"])
            assert 2 <= len(ops) <= 4, p  # a division used to drop the rest of its expression
            assert len(p["answer"].split("\n")) == len(ops) + 1  # one worked step per operation
            with_division += " / " in p["question"]
    assert with_division > 50


def test_every_wording_of_a_problem_has_the_same_key():
    """Templates write every number of a problem, as digits, and no other number; names and items none."""
    values = dict(a=11, b=23, n=37, m=41, p=53, word="increased", thing="bike")
    for kind, templates in sm.TEMPLATES.items():
        keys = {sm.problem_key(t.format(**values), "7") for t in templates}
        assert len(keys) == 1, (kind, keys)
        for t in templates:
            assert not re.search(r"\d", "".join(literal for literal, *_ in string.Formatter().parse(t))), t
    for word in sm.NAMES + [w for pair in sm.ITEMS for w in pair] + sm.PRICED + sm.PLACES:
        assert not re.search(r"\d", word)
    assert sm.problem_key("Ava buys 3 apples at $4 each.", "12") == sm.problem_key("Zoe buys 3 kites at $4 each.", "12")
    assert sm.problem_key("Subtract 3 from 10.", "7") == sm.problem_key("Compute 10 - 3.", "7")
    assert sm.problem_key("Compute 10 - 3.", "7") != sm.problem_key("Compute 10 - 4.", "6")


_LARGE = []


def large_sample():
    """The first 50,000 problems (about 9M of the 10M default bytes budget); made once."""
    if not _LARGE:
        _LARGE.extend(p for c in range(50) for p in sm.generate_chunk(1337, c))
    return _LARGE


def test_no_val_or_test_problem_has_a_train_twin():
    """Twin (the definition the held-out test uses, kept apart from problem_key on purpose): same family, same numbers in
    the same order, same final answer, i.e. a rewording with another name, item or template."""
    def twin(p):
        return p["family"], tuple(NUMBER.findall(p["question"])), p["final"]
    split = [sm.problem_split(p["question"], p["final"]) for p in large_sample()]
    train = {twin(p) for p, s in zip(large_sample(), split) if s == Split.TRAIN}
    held = [p for p, s in zip(large_sample(), split) if s != Split.TRAIN]
    assert len(held) > 700 and {p["family"] for p in held} == set(sm.FAMILIES)
    assert [p for p in held if twin(p) in train] == []


def test_few_duplicates():
    by_family = {}
    for p in large_sample():
        by_family.setdefault(p["family"], []).append(p)
    for family, ps in by_family.items():
        distinct_questions = len({p["question"] for p in ps})
        distinct_problems = len({sm.problem_key(p["question"], p["final"]) for p in ps})
        assert distinct_questions >= 0.98 * len(ps), (family, distinct_questions, len(ps))
        assert distinct_problems >= 0.97 * len(ps), (family, distinct_problems, len(ps))


def test_split_is_by_problem_and_held_out_is_disjoint():
    split_of = {sm.problem_key(p["question"], p["final"]): sm.problem_split(p["question"], p["final"])
                for p in PROBLEMS}
    counts = Counter(split_of.values())
    assert counts[Split.TRAIN] > 0.95 * len(split_of) and counts[Split.VAL] > 0 and counts[Split.TEST] > 0
    val = sm.held_out_problems(Split.VAL, 40, seed=1337)
    test = sm.held_out_problems("test", 40, seed=1337)
    assert len(val) == 40 and len(test) == 40
    assert all(sm.problem_split(p["question"], p["final"]) == Split.VAL for p in val)
    assert all(sm.problem_split(p["question"], p["final"]) == Split.TEST for p in test)
    assert len({sm.problem_key(p["question"], p["final"]) for p in val}) == 40  # distinct problems, not wordings
    train_keys = {k for k, s in split_of.items() if s == Split.TRAIN}
    assert not train_keys & {sm.problem_key(p["question"], p["final"]) for p in val + test}
    assert not {p["question"] for p in val} & {p["question"] for p in test}
    assert all(p["answer"].endswith(f"#### {p['final']}") for p in val)
