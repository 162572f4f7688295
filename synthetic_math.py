"""
A built-in, offline generator of math problems with worked solutions, GSM8K style:

    {"question": "Evaluate 48 + 27 * 3.",
     "answer":   "27 * 3 = 81, so the expression becomes 48 + 81.\\n48 + 81 = 129.\\n#### 129",
     "final":    "129",
     "family":   "order_of_operations"}

Deterministic from a seed: problems come in chunks of CHUNK_SIZE, chunk c is drawn from
random.Random(f"{seed}:{c}"), so any worker can make any chunk and the stream never depends on how many
workers made it. The split (train/val/test) of a problem is a hash of its question text, so the same
question can never be in two splits (disjoint by construction), and held_out_problems() can hand out
val/test problems with their exact answers for accuracy evaluation.

Everything is exact integer / Fraction / Decimal arithmetic: the final answers are right, not rounded floats.
"""
import random
from decimal import Decimal
from fractions import Fraction
from math import gcd

from data_file_utils import Split, split_of_text

CHUNK_SIZE = 1000
NAMES = ["Ava", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena",
         "Mateo", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Vera", "Wei", "Yusuf", "Zoe"]
ITEMS = [("notebook", "notebooks"), ("apple", "apples"), ("pencil", "pencils"), ("ticket", "tickets"),
         ("book", "books"), ("sandwich", "sandwiches"), ("plant", "plants"), ("marker", "markers"),
         ("cupcake", "cupcakes"), ("toy car", "toy cars")]


def problem_split(question: str) -> Split:
    """The split of a problem: a hash of its question text (~98/1/1)."""
    return split_of_text(question)


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


# ----------------------------------------------------------------------------- 1. integer arithmetic

def arithmetic(rng: random.Random) -> dict:
    op = rng.randrange(4)
    if op == 0:
        a, b = rng.randint(100, 99999), rng.randint(100, 99999)
        high = b - b % 100
        steps = [f"Split {b} into {high} + {b - high}.", f"{a} + {high} = {a + high}.",
                 f"{a + high} + {b - high} = {a + b}."] if high and b - high else [f"{a} + {b} = {a + b}."]
        return _problem("arithmetic", f"What is {a} + {b}?", steps, a + b)
    if op == 1:
        a, b = rng.randint(1000, 99999), rng.randint(100, 9999)
        a, b = max(a, b), min(a, b)
        high = b - b % 100
        steps = [f"Split {b} into {high} + {b - high}.", f"{a} - {high} = {a - high}.",
                 f"{a - high} - {b - high} = {a - b}."] if high and b - high else [f"{a} - {b} = {a - b}."]
        return _problem("arithmetic", f"Compute {a} - {b}.", steps, a - b)
    if op == 2:
        a, b = rng.randint(12, 999), rng.randint(12, 99)
        tens, ones = b - b % 10, b % 10
        steps = [f"Split {b} into {tens} + {ones}.", f"{a} * {tens} = {a * tens}.", f"{a} * {ones} = {a * ones}.",
                 f"Add the parts: {a * tens} + {a * ones} = {a * b}."]
        return _problem("arithmetic", f"What is {a} * {b}?", steps, a * b)
    q, b = rng.randint(12, 999), rng.randint(3, 49)
    a = q * b
    steps = [f"We need the number that, multiplied by {b}, gives {a}.", f"{b} * {q} = {a}.", f"So {a} / {b} = {q}."]
    return _problem("arithmetic", f"Divide {a} by {b}.", steps, q)


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
    if n_ops == 0:
        return rng.randint(2, 20)
    n_left = rng.randint(0, n_ops - 1)
    left, right = _random_expr(rng, n_left), _random_expr(rng, n_ops - 1 - n_left)
    op = rng.choice("+-**/")
    if op == "/":  # only exact division of a sub-expression by a small number
        right = rng.choice([d for d in (2, 3, 4, 5, 6) if _value(left) % d == 0] or [1])
        if right == 1:
            op = "+"
            right = rng.randint(2, 20)
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
    a, b = rng.randint(1, 11), rng.randint(2, 12)
    c, d = rng.randint(1, 11), rng.randint(2, 12)
    x, y = Fraction(a, b), Fraction(c, d)
    kind = rng.randrange(4)
    if kind == 3:  # simplify
        k = rng.randint(2, 9)
        n, m = a * k, b * k
        g = gcd(n, m)
        steps = [f"The greatest common divisor of {n} and {m} is {g}.",
                 f"Divide both by {g}: {n}/{m} = {n // g}/{m // g}." if m // g != 1 else f"{n}/{m} = {n // g}."]
        return _problem("fractions", f"Simplify the fraction {n}/{m}.", steps, _frac(Fraction(n, m)))
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
        p, n = rng.choice([5, 10, 12, 15, 20, 25, 30, 35, 40, 45, 50, 60, 75, 80, 90]), rng.randint(2, 400) * 4
        result = Decimal(n) * p / 100
        steps = [f"{p}% means {p}/100.", f"{n} * {p} = {n * p}.", f"{n * p} / 100 = {_dec(result)}."]
        return _problem("decimals_percentages", f"What is {p}% of {n}?", steps, _dec(result))
    if kind == 1:
        p, n = rng.choice([10, 20, 25, 30, 40, 50]), rng.randint(4, 250) * 10
        up = rng.random() < 0.5
        change = Decimal(n) * p / 100
        result = n + change if up else n - change
        word = "increased" if up else "decreased"
        steps = [f"{p}% of {n} is {n} * {p} / 100 = {_dec(change)}.",
                 f"{n} {'+' if up else '-'} {_dec(change)} = {_dec(result)}."]
        return _problem("decimals_percentages", f"A price of ${n} is {word} by {p}%. What is the new price in dollars?",
                        steps, _dec(result))
    a = Decimal(rng.choice(_NOT_MULTIPLE_OF_10)) / 10 ** rng.randint(1, 2)  # so that it really has decimals
    b = Decimal(rng.randint(2, 99)) / 10 ** rng.randint(0, 1)
    da, db = -a.as_tuple().exponent, -b.as_tuple().exponent
    ia, ib = int(a * 10 ** da), int(b * 10 ** db)
    steps = [f"Ignore the decimal points: {ia} * {ib} = {ia * ib}.",
             f"There are {da} + {db} = {da + db} decimal places in total, so the product is {_dec(a * b)}."]
    return _problem("decimals_percentages", f"Multiply {_dec(a)} by {_dec(b)}.", steps, _dec(a * b))


# ----------------------------------------------------------------------------- 5. linear equations

def _lin(a, b, var="x"):
    """a*x + b as people write it."""
    head = var if a == 1 else f"-{var}" if a == -1 else f"{a}{var}"
    return head if b == 0 else f"{head} + {b}" if b > 0 else f"{head} - {-b}"


def linear_equation(rng: random.Random) -> dict:
    x = rng.randint(-20, 20)
    a = rng.choice([k for k in range(-9, 13) if k not in (0,)])
    b = rng.randint(-50, 50)
    if rng.random() < 0.5:
        c = a * x + b
        steps = [f"Subtract {b} from both sides: {_lin(a, 0)} = {c} - {b} = {c - b}." if b > 0 else
                 f"Add {-b} to both sides: {_lin(a, 0)} = {c} + {-b} = {c - b}." if b < 0 else f"{_lin(a, 0)} = {c}."]
        if a != 1:
            steps.append(f"Divide both sides by {a}: x = {c - b} / {a} = {x}.")
        return _problem("linear_equation", f"Solve for x: {_lin(a, b)} = {c}.", steps, x)
    c = rng.choice([k for k in range(-9, 13) if k not in (0, a)])
    d = (a - c) * x + b
    steps = [f"Move the x terms to the left: {_lin(a, 0)} - {_lin(c, 0)} = {_lin(a - c, 0)}, so {_lin(a - c, b)} = {d}.",
             f"Move the constant to the right: {_lin(a - c, 0)} = {d} - ({b}) = {d - b}."]
    if a - c != 1:
        steps.append(f"Divide both sides by {a - c}: x = {d - b} / {a - c} = {x}.")
    return _problem("linear_equation", f"Solve for x: {_lin(a, b)} = {_lin(c, d)}.", steps, x)


# ----------------------------------------------------------------------------- 6. GCD, LCM, prime factors

def _factorize(n):
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return factors


def number_theory(rng: random.Random) -> dict:
    kind = rng.randrange(3)
    if kind == 2:
        n = 1
        while n < 12:
            n = 1
            for _ in range(rng.randint(2, 6)):
                n *= rng.choice([2, 2, 2, 3, 3, 5, 7, 11, 13])
        steps, m = [], n
        for p in _factorize(n):
            steps.append(f"{m} / {p} = {m // p}.")
            m //= p
        final = " * ".join(map(str, _factorize(n)))
        return _problem("gcd_lcm_primes", f"Write {n} as a product of prime factors.", steps + [f"So {n} = {final}."], final)
    g = rng.randint(2, 30)
    a, b = g * rng.randint(2, 40), g * rng.randint(2, 40)
    if a == b:
        b += g
    steps, x, y = [], max(a, b), min(a, b)
    while y:  # Euclid's algorithm, one line per division
        steps.append(f"{x} = {x // y} * {y} + {x % y}.")
        x, y = y, x % y
    steps.append(f"The last non-zero remainder is {x}, so gcd({a}, {b}) = {x}.")
    if kind == 0:
        return _problem("gcd_lcm_primes", f"Find the greatest common divisor of {a} and {b}.", steps, x)
    lcm = a * b // x
    steps.append(f"lcm({a}, {b}) = {a} * {b} / {x} = {a * b} / {x} = {lcm}.")
    return _problem("gcd_lcm_primes", f"Find the least common multiple of {a} and {b}.", steps, lcm)


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
    coeffs = [rng.randint(-9, 9) for _ in range(degree)] + [rng.choice([-5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 6])]
    x = rng.randint(-4, 5)
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
    item, items = rng.choice(ITEMS)
    kind = rng.randrange(5)
    if kind == 0:
        n, price = rng.randint(2, 15), rng.randint(2, 25)
        bill = next(b for b in (20, 50, 100, 200, 500) if b >= n * price)
        q = f"{name} buys {n} {items} at ${price} each and pays with a ${bill} bill. How much change does {name} get?"
        steps = [f"The {items} cost {n} * ${price} = ${n * price}.", f"The change is ${bill} - ${n * price} = ${bill - n * price}."]
        return _problem("word_problem", q, steps, bill - n * price)
    if kind == 1:
        speed, hours = rng.randint(3, 90), rng.randint(2, 9)
        q = f"{name} travels at {speed} km per hour for {hours} hours. How many kilometers does {name} travel?"
        return _problem("word_problem", q, [f"Distance = speed * time = {speed} * {hours} = {speed * hours} km."], speed * hours)
    if kind == 2:
        people, each, left = rng.randint(2, 12), rng.randint(2, 20), rng.randint(0, 9)
        left = left % people
        total = people * each + left
        q = f"{name} shares {total} {items} equally among {people} friends. How many {items} does each friend get?"
        steps = [f"{total} / {people} = {each} with remainder {left}." if left else f"{total} / {people} = {each}.",
                 f"Each friend gets {each} {items}."]
        return _problem("word_problem", q, steps, each)
    if kind == 3:
        age, diff, years = rng.randint(5, 40), rng.randint(2, 30), rng.randint(2, 15)
        q = f"{name} is {age} years old. {other} is {diff} years older than {name}. How old will {other} be in {years} years?"
        steps = [f"{other} is {age} + {diff} = {age + diff} years old now.",
                 f"In {years} years {other} will be {age + diff} + {years} = {age + diff + years}."]
        return _problem("word_problem", q, steps, age + diff + years)
    start, weekly, weeks = rng.randint(0, 200), rng.randint(5, 60), rng.randint(2, 20)
    spent = rng.randint(0, start + weekly * weeks)
    total = start + weekly * weeks
    q = (f"{name} has ${start} and saves ${weekly} every week for {weeks} weeks, then spends ${spent} on {items}. "
         f"How many dollars does {name} have left?")
    steps = [f"Savings: {weekly} * {weeks} = ${weekly * weeks}.", f"Total before spending: {start} + {weekly * weeks} = ${total}.",
             f"After spending: {total} - {spent} = ${total - spent}."]
    return _problem("word_problem", q, steps, total - spent)


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
    """n distinct problems of `split` (val or test) with exact answers, in stream order. With the seed the
    data was prepared with, these are the problems in that split's shards; they never occur in train."""
    split = Split(split)
    out, seen = [], set()
    for problem in problems(seed):
        q = problem["question"]
        if q not in seen and problem_split(q) == split:
            seen.add(q)
            out.append(problem)
            if len(out) == n:
                return out
