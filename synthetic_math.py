"""
A built-in, offline generator of math problems with worked solutions, GSM8K style:

    {"question": "Evaluate 48 + 27 * 3.",
     "answer":   "27 * 3 = 81, so the expression becomes 48 + 81.\\n48 + 81 = 129.\\n#### 129",
     "final":    "129",
     "family":   "order_of_operations"}

Deterministic from a seed: problems come in chunks of CHUNK_SIZE, chunk c is drawn from
random.Random(f"{seed}:{c}"), so any worker can make any chunk and the stream never depends on how many
workers made it.

The split (train/val/test) of a problem is decided by what makes it the same problem, not by its wording:
problem_key() is the numbers of the question (in any order) and the final answer. Two problems that differ only
in a name, an item or a template have the same key, so they land in the same split: no val/test problem has a
training twin, and held_out_problems() can hand out val/test problems with their exact answers for accuracy
evaluation. (Every template writes every number of a problem as digits and no other number; a test checks it.)

Everything is exact integer / Fraction / Decimal arithmetic: the final answers are right, not rounded floats.
"""
import random
import re
from decimal import Decimal
from fractions import Fraction
from math import gcd

from data_file_utils import Split, split_of_text

VERSION = 2  # bump when the problems or the split change: prepared datasets of another version are rebuilt
CHUNK_SIZE = 1000
NAMES = ["Ava", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena",
         "Mateo", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Vera", "Wei", "Yusuf", "Zoe",
         "Amara", "Bruno", "Carmen", "Dmitri", "Elena", "Felix", "Grace", "Hugo", "Ines", "Jonas", "Keiko",
         "Luis", "Maya", "Noah", "Olga", "Pablo", "Ravi", "Sofia", "Theo", "Yara"]
ITEMS = [("notebook", "notebooks"), ("apple", "apples"), ("pencil", "pencils"), ("ticket", "tickets"),
         ("book", "books"), ("sandwich", "sandwiches"), ("plant", "plants"), ("marker", "markers"),
         ("cupcake", "cupcakes"), ("toy car", "toy cars"), ("orange", "oranges"), ("candle", "candles"),
         ("sticker", "stickers"), ("muffin", "muffins"), ("puzzle", "puzzles"), ("shirt", "shirts"),
         ("comic", "comics"), ("bracelet", "bracelets"), ("mug", "mugs"), ("kite", "kites")]
PRICED = ["bike", "laptop", "sofa", "camera", "jacket", "guitar", "phone", "desk", "lamp", "watch"]
PLACES = ["garden", "room", "field", "yard", "pool", "parking lot", "playground", "classroom"]
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def problem_key(question: str, final: str) -> str:
    """What makes two problems the same problem: the numbers of the question as a multiset (so neither the
    wording nor the order a template puts them in matters) and the final answer. Names, items and templates
    are not part of it. No family either: a word problem and a bare sum with the same numbers and the same
    answer are twins too, and go to the same split."""
    return " ".join(sorted(_NUMBER.findall(question))) + " => " + str(final)


def problem_split(question: str, final: str) -> Split:
    """The split of a problem (~98/1/1): a hash of its problem_key, never of its wording."""
    return split_of_text(problem_key(question, final))


def format_document(problem: dict) -> str:
    return f"Question: {problem['question']}\nAnswer: {problem['answer']}"


def _dec(x) -> str:
    """An exact decimal as people write it: 12.5, 3, -0.25 (no exponent, no trailing zeros)."""
    d = Decimal(x)
    s = format(d.normalize(), "f")
    return s if s != "-0" else "0"


def _frac(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _problem(family, question, steps, final):
    final = str(final)
    return {"question": question, "answer": "\n".join(steps) + f"\n#### {final}", "final": final, "family": family}


# Wordings of one problem: str.format templates with named fields. Every template of a list uses the same
# fields and writes no digit of its own, so that all wordings of a problem have the same problem_key.
TEMPLATES = {
    "add": ["What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}.", "Find the sum of {a} and {b}."],
    "sub": ["Compute {a} - {b}.", "What is {a} - {b}?", "Subtract {b} from {a}.", "What is {a} minus {b}?"],
    "mul": ["What is {a} * {b}?", "Compute {a} * {b}.", "Multiply {a} by {b}.", "Find the product of {a} and {b}."],
    "div": ["Divide {a} by {b}.", "What is {a} / {b}?", "Compute {a} / {b}.", "How many times does {b} go into {a}?"],
    "simplify": ["Simplify the fraction {n}/{m}.", "Write {n}/{m} in lowest terms.", "Reduce {n}/{m} to lowest terms."],
    "percent_of": ["What is {p}% of {n}?", "Find {p}% of {n}.", "Compute {p}% of {n}.", "How much is {p}% of {n}?"],
    "price_change": ["A price of ${n} is {word} by {p}%. What is the new price in dollars?",
                     "A {thing} costs ${n}. Its price is {word} by {p}%. What is the new price in dollars?",
                     "The price of a {thing} was ${n} and is {word} by {p}%. How many dollars does it cost now?"],
    "times_decimal": ["Multiply {a} by {b}.", "What is {a} * {b}?", "Compute the product {a} * {b}."],
    "gcd": ["Find the greatest common divisor of {a} and {b}.", "What is the greatest common divisor of {a} and {b}?",
            "Compute gcd({a}, {b})."],
    "lcm": ["Find the least common multiple of {a} and {b}.", "What is the least common multiple of {a} and {b}?",
            "Compute lcm({a}, {b})."],
    "factor": ["Write {n} as a product of prime factors.", "Find the prime factorization of {n}.",
               "Factor {n} into primes."],
}


def _say(rng, kind, **fields):
    return rng.choice(TEMPLATES[kind]).format(**fields)


# ----------------------------------------------------------------------------- 1. integer arithmetic

def arithmetic(rng: random.Random) -> dict:
    op = rng.randrange(4)
    if op == 0:
        a, b = rng.randint(100, 99999), rng.randint(100, 99999)
        high = b - b % 100
        steps = [f"Split {b} into {high} + {b - high}.", f"{a} + {high} = {a + high}.",
                 f"{a + high} + {b - high} = {a + b}."] if high and b - high else [f"{a} + {b} = {a + b}."]
        return _problem("arithmetic", _say(rng, "add", a=a, b=b), steps, a + b)
    if op == 1:
        a, b = rng.randint(1000, 99999), rng.randint(100, 9999)
        a, b = max(a, b), min(a, b)
        high = b - b % 100
        steps = [f"Split {b} into {high} + {b - high}.", f"{a} - {high} = {a - high}.",
                 f"{a - high} - {b - high} = {a - b}."] if high and b - high else [f"{a} - {b} = {a - b}."]
        return _problem("arithmetic", _say(rng, "sub", a=a, b=b), steps, a - b)
    if op == 2:
        a, b = rng.randint(12, 999), rng.randint(12, 99)
        tens, ones = b - b % 10, b % 10
        steps = [f"Split {b} into {tens} + {ones}.", f"{a} * {tens} = {a * tens}.", f"{a} * {ones} = {a * ones}.",
                 f"Add the parts: {a * tens} + {a * ones} = {a * b}."]
        return _problem("arithmetic", _say(rng, "mul", a=a, b=b), steps, a * b)
    q, b = rng.randint(12, 999), rng.randint(3, 99)
    a = q * b
    steps = [f"We need the number that, multiplied by {b}, gives {a}.", f"{b} * {q} = {a}.", f"So {a} / {b} = {q}."]
    return _problem("arithmetic", _say(rng, "div", a=a, b=b), steps, q)


# ----------------------------------------------------------------------------- 2. order of operations

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _apply(op, a, b):
    return a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a // b


def _render(node, parent_prec=0, right=False):
    if isinstance(node, int):
        return str(node)
    op, left, rgt = node
    s = f"{_render(left, _PREC[op])} {op} {_render(rgt, _PREC[op], True)}"
    # parentheses when the parent binds tighter, or equally on the right of - and / (a - (b + c))
    return f"({s})" if _PREC[op] < parent_prec or (right and _PREC[op] == parent_prec) else s


def _value(node):
    return node if isinstance(node, int) else _apply(node[0], _value(node[1]), _value(node[2]))


def _random_expr(rng, n_ops):
    """A random expression with exactly n_ops operations, every value a non-negative integer."""
    if n_ops == 0:
        return rng.randint(2, 60)
    op = rng.choice("+-**/")
    if op == "/":  # exact division by a small number: the divisor is a number, the left side gets every operation
        left = _random_expr(rng, n_ops - 1)
        divisors = [d for d in range(2, 13) if _value(left) % d == 0] if _value(left) > 0 else []
        if divisors:
            return ("/", left, rng.choice(divisors))
        op, right = rng.choice("+-"), rng.randint(2, 60)  # no exact divisor: another operation, same count
    else:
        n_left = rng.randint(0, n_ops - 1)
        left, right = _random_expr(rng, n_left), _random_expr(rng, n_ops - 1 - n_left)
    if op == "-" and _value(left) < _value(right):
        left, right = right, left  # stay with non-negative numbers
    if op == "*" and _value(left) * _value(right) > 5000:
        op = "+"
    return (op, left, right)


def _reduce_once(node):
    """One step of evaluation: the first operation, in reading order, whose operands are numbers
    and that has the highest precedence among those. Returns (new tree, 'a op b = c')."""
    ready = []

    def collect(n, path):
        if isinstance(n, int):
            return
        if isinstance(n[1], int) and isinstance(n[2], int):
            ready.append((n, path))
        collect(n[1], path + (1,))
        collect(n[2], path + (2,))

    collect(node, ())
    n, path = max(ready, key=lambda t: _PREC[t[0][0]])  # max() keeps the first of equals: left to right
    value = _apply(*n)

    def replace(tree, p):
        if not p:
            return value
        parts = list(tree)
        parts[p[0]] = replace(tree[p[0]], p[1:])
        return tuple(parts)

    return replace(node, path), f"{n[1]} {n[0]} {n[2]} = {value}"


def order_of_operations(rng: random.Random) -> dict:
    tree = _random_expr(rng, rng.randint(2, 4))
    question = f"Evaluate {_render(tree)}."
    steps = []
    while not isinstance(tree, int):
        tree, step = _reduce_once(tree)
        steps.append(f"{step}, so the expression becomes {_render(tree)}." if not isinstance(tree, int) else f"{step}.")
    return _problem("order_of_operations", question, steps, tree)


# ----------------------------------------------------------------------------- 3. fractions

def fractions(rng: random.Random) -> dict:
    a, b = rng.randint(1, 29), rng.randint(2, 30)
    c, d = rng.randint(1, 29), rng.randint(2, 30)
    x, y = Fraction(a, b), Fraction(c, d)
    kind = rng.randrange(4)
    if kind == 3:  # simplify a fraction made by scaling one in lowest terms
        a, b, k = rng.randint(1, 99), rng.randint(2, 50), rng.randint(2, 30)
        n, m = a * k, b * k
        g = gcd(n, m)
        steps = [f"The greatest common divisor of {n} and {m} is {g}.",
                 f"Divide both by {g}: {n}/{m} = {n // g}/{m // g}." if m // g != 1 else f"{n}/{m} = {n // g}."]
        return _problem("fractions", _say(rng, "simplify", n=n, m=m), steps, _frac(Fraction(n, m)))
    if kind == 2:  # multiply
        num, den = a * c, b * d
        result = Fraction(num, den)
        steps = [f"Multiply the numerators: {a} * {c} = {num}.", f"Multiply the denominators: {b} * {d} = {den}."]
        if result.denominator != den:
            steps.append(f"Simplify {num}/{den} by {gcd(num, den)}: {_frac(result)}.")
        return _problem("fractions", f"What is {a}/{b} * {c}/{d}?", steps, _frac(result))
    op = "+" if kind == 0 else "-"
    if op == "-" and x < y:
        a, b, c, d, x, y = c, d, a, b, y, x
    common = b * d // gcd(b, d)
    n1, n2 = a * common // b, c * common // d
    num = n1 + n2 if op == "+" else n1 - n2
    result = Fraction(num, common)
    steps = [f"The least common denominator of {b} and {d} is {common}.",
             f"{a}/{b} = {n1}/{common} and {c}/{d} = {n2}/{common}.",
             f"{n1}/{common} {op} {n2}/{common} = {num}/{common}."]
    if result.denominator != common:
        steps.append(f"Simplify: {num}/{common} = {_frac(result)}.")
    return _problem("fractions", f"Compute {a}/{b} {op} {c}/{d}.", steps, _frac(result))


# ----------------------------------------------------------------------------- 4. decimals and percentages

_NOT_MULTIPLE_OF_10 = [k for k in range(11, 1000) if k % 10]


def decimals_percentages(rng: random.Random) -> dict:
    kind = rng.randrange(3)
    if kind == 0:
        p, n = rng.randint(1, 99), rng.randint(2, 2000)
        result = Decimal(n) * p / 100
        steps = [f"{p}% means {p}/100.", f"{n} * {p} = {n * p}.", f"{n * p} / 100 = {_dec(result)}."]
        return _problem("decimals_percentages", _say(rng, "percent_of", p=p, n=n), steps, _dec(result))
    if kind == 1:
        p, n = rng.randrange(5, 100, 5), rng.randint(10, 5000)
        up = rng.random() < 0.5
        change = Decimal(n) * p / 100
        result = n + change if up else n - change
        word = "increased" if up else "decreased"
        steps = [f"{p}% of {n} is {n} * {p} / 100 = {_dec(change)}.",
                 f"{n} {'+' if up else '-'} {_dec(change)} = {_dec(result)}."]
        q = _say(rng, "price_change", n=n, p=p, word=word, thing=rng.choice(PRICED))
        return _problem("decimals_percentages", q, steps, _dec(result))
    a = Decimal(rng.choice(_NOT_MULTIPLE_OF_10)) / 10 ** rng.randint(1, 2)  # so that it really has decimals
    b = Decimal(rng.randint(2, 99)) / 10 ** rng.randint(0, 1)
    da, db = -a.as_tuple().exponent, -b.as_tuple().exponent
    ia, ib = int(a * 10 ** da), int(b * 10 ** db)
    steps = [f"Ignore the decimal points: {ia} * {ib} = {ia * ib}.",
             f"There are {da} + {db} = {da + db} decimal places in total, so the product is {_dec(a * b)}."]
    return _problem("decimals_percentages", _say(rng, "times_decimal", a=_dec(a), b=_dec(b)), steps, _dec(a * b))


# ----------------------------------------------------------------------------- 5. linear equations

def _lin(a, b, var="x"):
    """a*x + b as people write it."""
    head = var if a == 1 else f"-{var}" if a == -1 else f"{a}{var}"
    return head if b == 0 else f"{head} + {b}" if b > 0 else f"{head} - {-b}"


def linear_equation(rng: random.Random) -> dict:
    x = rng.randint(-30, 30)
    a = rng.choice([k for k in range(-12, 16) if k not in (0,)])
    b = rng.randint(-99, 99)
    if rng.random() < 0.5:
        c = a * x + b
        steps = [f"Subtract {b} from both sides: {_lin(a, 0)} = {c} - {b} = {c - b}." if b > 0 else
                 f"Add {-b} to both sides: {_lin(a, 0)} = {c} + {-b} = {c - b}." if b < 0 else f"{_lin(a, 0)} = {c}."]
        if a != 1:
            steps.append(f"Divide both sides by {a}: x = {c - b} / {a} = {x}.")
        return _problem("linear_equation", f"Solve for x: {_lin(a, b)} = {c}.", steps, x)
    c = rng.choice([k for k in range(-12, 16) if k not in (0, a)])
    d = (a - c) * x + b
    steps = [f"Move the x terms to the left: {_lin(a, 0)} - {_lin(c, 0)} = {_lin(a - c, 0)}, so {_lin(a - c, b)} = {d}.",
             f"Move the constant to the right: {_lin(a - c, 0)} = {d} - ({b}) = {d - b}."]
    if a - c != 1:
        steps.append(f"Divide both sides by {a - c}: x = {d - b} / {a - c} = {x}.")
    return _problem("linear_equation", f"Solve for x: {_lin(a, b)} = {_lin(c, d)}.", steps, x)


# ----------------------------------------------------------------------------- 6. GCD, LCM, prime factors

_PRIMES_BELOW_200 = [p for p in range(2, 200) if all(p % d for d in range(2, int(p ** 0.5) + 1))]


def _factorize(n):
    """The prime factors of n in increasing order, or None if one of them is 200 or more."""
    factors = []
    for p in _PRIMES_BELOW_200:
        while n % p == 0:
            factors.append(p)
            n //= p
    return factors if n == 1 else None


def number_theory(rng: random.Random) -> dict:
    kind = rng.randrange(3)
    if kind == 2:
        while True:  # a number below a million whose prime factors are all below 200, at least two of them
            n = rng.randint(12, 999_999)
            factors = _factorize(n)
            if factors and len(factors) >= 2:
                break
        steps, m = [], n
        for p in factors:
            steps.append(f"{m} / {p} = {m // p}.")
            m //= p
        final = " * ".join(map(str, factors))
        return _problem("gcd_lcm_primes", _say(rng, "factor", n=n), steps + [f"So {n} = {final}."], final)
    g = rng.randint(2, 99)
    a, b = g * rng.randint(2, 99), g * rng.randint(2, 99)
    if a == b:
        b += g
    steps, x, y = [], max(a, b), min(a, b)
    while y:  # Euclid's algorithm, one line per division
        steps.append(f"{x} = {x // y} * {y} + {x % y}.")
        x, y = y, x % y
    steps.append(f"The last non-zero remainder is {x}, so gcd({a}, {b}) = {x}.")
    if kind == 0:
        return _problem("gcd_lcm_primes", _say(rng, "gcd", a=a, b=b), steps, x)
    lcm = a * b // x
    steps.append(f"lcm({a}, {b}) = {a} * {b} / {x} = {a * b} / {x} = {lcm}.")
    return _problem("gcd_lcm_primes", _say(rng, "lcm", a=a, b=b), steps, lcm)


# ----------------------------------------------------------------------------- 7. polynomials

def _poly(coeffs):
    """[c0, c1, c2, ...] -> '3x^2 - 2x + 5'."""
    terms = []
    for k in range(len(coeffs) - 1, -1, -1):
        c = coeffs[k]
        if c == 0:
            continue
        mag = abs(c)
        body = str(mag) if k == 0 else ("" if mag == 1 else str(mag)) + ("x" if k == 1 else f"x^{k}")
        terms.append(("- " if c < 0 else "+ ") + body)
    if not terms:
        return "0"
    s = " ".join(terms)
    return s[2:] if s.startswith("+ ") else "-" + s[2:]


def polynomial(rng: random.Random) -> dict:
    degree = rng.randint(2, 3)
    coeffs = [rng.randint(-12, 12) for _ in range(degree)] + [rng.choice([k for k in range(-7, 9) if k])]
    x = rng.randint(-5, 6)
    if rng.random() < 0.5:
        parts = [f"{c} * ({x})^{k} = {c * x ** k}" for k, c in enumerate(coeffs) if c and k]
        value = sum(c * x ** k for k, c in enumerate(coeffs))
        steps = [f"Substitute x = {x} term by term: " + "; ".join(parts) + ".",
                 f"Add them and the constant {coeffs[0]}: p({x}) = {value}."]
        return _problem("polynomial", f"Let p(x) = {_poly(coeffs)}. Find p({x}).", steps, value)
    deriv = [k * c for k, c in enumerate(coeffs)][1:]
    value = sum(c * x ** k for k, c in enumerate(deriv))
    steps = [f"Use the power rule d/dx(c * x^k) = k * c * x^(k-1) on each term: p'(x) = {_poly(deriv)}.",
             f"Substitute x = {x}: p'({x}) = " + " + ".join(f"({c} * ({x})^{k})" for k, c in enumerate(deriv) if c)
             + f" = {value}."]
    return _problem("polynomial", f"Let p(x) = {_poly(coeffs)}. Find p'(x) and then p'({x}).", steps, value)


# ----------------------------------------------------------------------------- 8. word problems

def word_problem(rng: random.Random) -> dict:
    name, other = rng.sample(NAMES, 2)
    (item, items), (_, items2) = rng.sample(ITEMS, 2)
    kind = rng.randrange(8)
    if kind == 0:
        n, price, m, price2 = rng.randint(2, 20), rng.randint(2, 40), rng.randint(2, 20), rng.randint(2, 40)
        cost = n * price + m * price2
        bill = next(b for b in (20, 50, 100, 200, 500, 1000, 2000) if b >= cost)
        q = (f"{name} buys {n} {items} at ${price} each and {m} {items2} at ${price2} each, and pays with ${bill}. "
             f"How much change does {name} get?")
        steps = [f"The {items} cost {n} * ${price} = ${n * price}.", f"The {items2} cost {m} * ${price2} = ${m * price2}.",
                 f"Together: ${n * price} + ${m * price2} = ${cost}.", f"The change is ${bill} - ${cost} = ${bill - cost}."]
        return _problem("word_problem", q, steps, bill - cost)
    if kind == 1:
        s1, h1, s2, h2 = rng.randint(20, 120), rng.randint(2, 9), rng.randint(20, 120), rng.randint(2, 9)
        q = (f"{name} drives for {h1} hours at {s1} km per hour, then for {h2} hours at {s2} km per hour. "
             f"How many kilometers does {name} drive in all?")
        steps = [f"First part: {s1} * {h1} = {s1 * h1} km.", f"Second part: {s2} * {h2} = {s2 * h2} km.",
                 f"In all: {s1 * h1} + {s2 * h2} = {s1 * h1 + s2 * h2} km."]
        return _problem("word_problem", q, steps, s1 * h1 + s2 * h2)
    if kind == 2:
        people, each = rng.randint(2, 30), rng.randint(2, 150)
        left = rng.randint(0, people - 1)
        total = people * each + left
        q = f"{name} shares {total} {items} equally among {people} friends. How many {items} does each friend get?"
        steps = [f"{total} / {people} = {each} with remainder {left}." if left else f"{total} / {people} = {each}.",
                 f"Each friend gets {each} {items}."]
        return _problem("word_problem", q, steps, each)
    if kind == 3:
        age, diff, years = rng.randint(5, 70), rng.randint(2, 45), rng.randint(2, 40)
        q = f"{name} is {age} years old. {other} is {diff} years older than {name}. How old will {other} be in {years} years?"
        steps = [f"{other} is {age} + {diff} = {age + diff} years old now.",
                 f"In {years} years {other} will be {age + diff} + {years} = {age + diff + years}."]
        return _problem("word_problem", q, steps, age + diff + years)
    if kind == 4:
        start, weekly, weeks = rng.randint(0, 300), rng.randint(5, 90), rng.randint(2, 30)
        total = start + weekly * weeks
        spent = rng.randint(0, total)
        q = (f"{name} has ${start} and saves ${weekly} every week for {weeks} weeks, then spends ${spent} on {items}. "
             f"How many dollars does {name} have left?")
        steps = [f"Savings: {weekly} * {weeks} = ${weekly * weeks}.",
                 f"Total before spending: {start} + {weekly * weeks} = ${total}.",
                 f"After spending: {total} - {spent} = ${total - spent}."]
        return _problem("word_problem", q, steps, total - spent)
    if kind == 5:
        length, width, place = rng.randint(3, 300), rng.randint(2, 200), rng.choice(PLACES)
        if rng.random() < 0.5:
            q = f"A rectangular {place} is {length} meters long and {width} meters wide. What is its area in square meters?"
            return _problem("word_problem", q, [f"Area = length * width = {length} * {width} = {length * width}."],
                            length * width)
        q = f"A rectangular {place} is {length} meters long and {width} meters wide. How many meters of fence go around it?"
        steps = [f"Perimeter = 2 * (length + width) = 2 * ({length} + {width}) = 2 * {length + width} = "
                 f"{2 * (length + width)}."]
        return _problem("word_problem", q, steps, 2 * (length + width))
    if kind == 6:
        rate, hours, weeks = rng.randint(8, 75), rng.randint(4, 48), rng.randint(2, 16)
        q = f"{name} earns ${rate} per hour and works {hours} hours a week. How many dollars does {name} earn in {weeks} weeks?"
        steps = [f"In one week: {rate} * {hours} = ${rate * hours}.",
                 f"In {weeks} weeks: {rate * hours} * {weeks} = ${rate * hours * weeks}."]
        return _problem("word_problem", q, steps, rate * hours * weeks)
    stock = rng.randint(50, 999)
    morning, afternoon, delivery = rng.randint(1, stock // 2), rng.randint(1, stock // 2), rng.randint(10, 500)
    q = (f"A shop has {stock} {items}. It sells {morning} in the morning and {afternoon} in the afternoon, then gets "
         f"a delivery of {delivery} more. How many {items} does the shop have now?")
    steps = [f"Sold: {morning} + {afternoon} = {morning + afternoon}.",
             f"Left after selling: {stock} - {morning + afternoon} = {stock - morning - afternoon}.",
             f"After the delivery: {stock - morning - afternoon} + {delivery} = {stock - morning - afternoon + delivery}."]
    return _problem("word_problem", q, steps, stock - morning - afternoon + delivery)


FAMILIES = {
    "arithmetic": arithmetic,
    "order_of_operations": order_of_operations,
    "fractions": fractions,
    "decimals_percentages": decimals_percentages,
    "linear_equation": linear_equation,
    "gcd_lcm_primes": number_theory,
    "polynomial": polynomial,
    "word_problem": word_problem,
}
_GENERATORS = list(FAMILIES.values())


# ----------------------------------------------------------------------------- streams

def generate_chunk(seed: int, chunk_index: int, size: int = CHUNK_SIZE) -> list[dict]:
    """Problems chunk_index*size ... (chunk_index+1)*size - 1 of the stream of `seed`."""
    rng = random.Random(f"{seed}:{chunk_index}")  # str seeds are hashed with sha512: same on every machine
    return [rng.choice(_GENERATORS)(rng) for _ in range(size)]


def problems(seed: int = 1337, start_chunk: int = 0):
    """The endless problem stream of `seed`."""
    chunk = start_chunk
    while True:
        yield from generate_chunk(seed, chunk)
        chunk += 1


def documents(seed: int = 1337, count: int = 1000):
    """The first `count` problems of the stream as training documents ('Question: ...\\nAnswer: ...')."""
    for i, problem in enumerate(problems(seed)):
        if i >= count:
            return
        yield format_document(problem)


def held_out_problems(split, n: int, seed: int = 1337) -> list[dict]:
    """n distinct problems of `split` (val or test) with exact answers, in stream order: distinct by problem_key,
    so a rewording of a problem already chosen is skipped. With the seed the data was prepared with, these are
    problems of that split's shards; neither they nor any rewording of them occur in train."""
    split = Split(split)
    out, seen = [], set()
    for problem in problems(seed):
        key = problem_key(problem["question"], problem["final"])
        if key not in seen and problem_split(problem["question"], problem["final"]) == split:
            seen.add(key)
            out.append(problem)
            if len(out) == n:
                return out
