"""Every command that README.md (and every .md under docs/, at any depth) shows uses options its script really has.

Users copy these commands, and a figure "measured by the command next to it" is only honest if that command
still runs. The commands are found in fenced and indented code blocks (`python X.py ...`, `torchrun ...
X.py ...`, with env-var prefixes, backslash continuations, `# comments`, `|`/`&&`/`;`, variables defined in the
same block such as `R="--causal ..."`, optional `[--flag ...]` parts, also in a trailing comment) and in inline
code spans (`python X.py ...`, or a span that starts with `X.py --flag ...`). `python -m`/`-c` and `bash`
scripts are skipped. Each script's real argparse parser is captured without running the script's work: one
subprocess runs every script with `--help` (runpy, argparse's print_help intercepted) and reports the parser's
option strings, their choices and subcommands. Every `--flag` / `--flag=value` of a command must be an option
string of its script (or of the chosen subcommand; abbreviations do not count), a literal value of an option with
choices one of them (placeholders such as `<loss>`, `PATH`, `$X` are skipped), and the script must exist.
Flags that a script hands on are checked against the train script that gets them (AFTER_DASHDASH,
UNKNOWN_TO_TRAIN).
"""

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import models

REPO = Path(__file__).resolve().parents[1]
# README.md and every page under docs/, at any depth (docs/results/*.md too).
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
# `train_<model>.py` in the README stands for every registered model's train script.
MODELS = sorted(models.MODELS)
LAUNCHERS = {"python", "python3", "torchrun"}
SEPARATORS = {"|", "||", "&&", ";", "&"}
FLAG = re.compile(r"--([A-Za-z][A-Za-z0-9_-]*)(?:=.*)?")
VAR = re.compile(r"\$(?:\{([A-Za-z_]\w*)\}|([A-Za-z_]\w*))")
ASSIGNMENT = re.compile(r"[A-Za-z_]\w*=.*", re.S)
# Scripts that pass flags on to a train script: dual_mask/sweep.py everything after `--`, bench/modern.py
# every flag it does not know itself (parse_known_args) to the train script of each of its --models.
AFTER_DASHDASH = {"dual_mask/sweep.py": ["train_dual_mask_gpt.py"]}
UNKNOWN_TO_TRAIN = {"bench/modern.py": ("--models", "baseline_gpt2")}


@dataclass
class Command:
    where: str          # "README.md:123"
    text: str           # the command as found (one line)
    script: str         # path relative to the repo
    args: list = field(default_factory=list)


# ---- reading the markdown -------------------------------------------------------------------------------

def markdown_parts(text):
    """(code blocks, prose): code blocks as (first line number, text); prose as one string with line numbers
    kept (code lines blanked), for the inline code spans."""
    blocks, prose = [], []
    lines = text.split("\n")
    fence, current, start = None, [], 0
    for i, line in enumerate(lines):
        stripped = line.strip()
        if fence is not None:
            if stripped.startswith(fence):
                blocks.append((start, "\n".join(current)))
                fence, current = None, []
            else:
                current.append(line)
            prose.append("")
            continue
        m = re.match(r"\s*(```+|~~~+)", line)
        if m:
            fence, current, start = m.group(1), [], i + 2
            prose.append("")
            continue
        # An indented code block: 4 spaces, after a blank line or another indented code line.
        if line.startswith("    ") and stripped and i > 0 and (not lines[i - 1].strip()
                                                                  or indented_code(lines, i - 1)):
            blocks.append((i + 1, line[4:]))
            prose.append("")
            continue
        prose.append(line)
    return blocks, "\n".join(prose)


def indented_code(lines, i):
    j = i
    while j >= 0 and lines[j].startswith("    ") and lines[j].strip():
        j -= 1
    return j < i and (j < 0 or not lines[j].strip())


def logical_lines(block):
    """Shell lines of a code block: backslash-newline joined, a quoted string may span lines. Yields
    (line offset, code, comment)."""
    out, code, comment, quote, offset, line_no = [], "", None, None, 0, 0
    i = 0
    while i < len(block):
        c = block[i]
        if comment is not None:
            if c == "\n":
                out.append((offset, code, comment))
                code, comment, offset = "", None, line_no + 1
                line_no += 1
            else:
                comment += c
        elif quote:
            if c == "\\" and quote == '"' and block[i + 1:i + 2] == "\n":  # continuation in "...": gone, as in bash
                i += 2
                line_no += 1
                continue
            code += c
            if c == "\\" and quote == '"' and i + 1 < len(block):
                code += block[i + 1]
                i += 1
            elif c == quote:
                quote = None
            if c == "\n":
                line_no += 1
        elif c == "\\" and block[i + 1:i + 2] == "\n":
            code += " "
            i += 1
            line_no += 1
        elif c in "'\"":
            quote = c
            code += c
        elif c == "#" and (not code or code[-1] in " \t"):
            comment = ""
        elif c == "\n":
            out.append((offset, code, ""))
            code, offset = "", line_no + 1
            line_no += 1
        else:
            code += c
        i += 1
    out.append((offset, code, comment or ""))
    return [(o, c, m) for o, c, m in out if c.strip() or m.strip()]


def split_words(code):
    try:
        return shlex.split(code)
    except ValueError:  # an unbalanced quote in prose: whitespace is good enough for finding flags
        return code.split()


def expand(code, variables):
    """$NAME / ${NAME} defined in the same block replaced by its value (word-split as the shell does);
    anything else stays, an opaque value."""
    def sub(m):
        name = m.group(1) or m.group(2)
        return variables.get(name, m.group(0))
    return VAR.sub(sub, code)


def commands_in_words(words, where, text, bare_script_ok=False):
    """The python/torchrun commands in a list of shell words (split at | && ; ...)."""
    segments, current = [], []
    for w in words:
        if w in SEPARATORS:
            segments.append(current)
            current = []
        elif w.endswith(";") and len(w) > 1:
            current.append(w[:-1])
            segments.append(current)
            current = []
        else:
            current.append(w)
    segments.append(current)
    found = []
    for seg in segments:
        script_at = None
        if bare_script_ok and seg and seg[0].endswith(".py") and flags(seg[1:]):  # not a file named in prose
            script_at = 0
        for i, w in enumerate(seg):
            if script_at is not None:
                break
            if os.path.basename(w) in LAUNCHERS:
                if os.path.basename(w).startswith("python") and i + 1 < len(seg) and seg[i + 1] in ("-m", "-c"):
                    break  # python -m pytest, python -c "...": not a script of this repo
                for j in range(i + 1, len(seg)):
                    if seg[j].endswith(".py"):
                        script_at = j
                        break
                    if not seg[j].startswith("-"):
                        break
                break
        if script_at is None:
            continue
        script, args = seg[script_at], seg[script_at + 1:]
        if script.startswith("./"):
            script = script[2:]
        if re.search(r"<(?!model>)[^>]*>", script):
            continue  # `train_<name>.py`: a script the reader is to write (Adding a model), not one of ours
        for s in ([script.replace("<model>", m) for m in MODELS] if "<model>" in script else [script]):
            found.append(Command(where, text, s, args))
    return found


def commands_in_block(block, first_line, name):
    variables, found = {}, []
    for offset, code, comment in logical_lines(block):
        words = split_words(code)
        if words and all(ASSIGNMENT.fullmatch(w) for w in words):  # G=json:..., R="--causal ...": definitions
            for w in words:
                k, v = w.split("=", 1)
                variables[k] = v
            continue
        code = expand(code, variables)
        words = split_words(code)
        # `# [--mask-rate 0.2]`: an optional part written as a comment belongs to the command too.
        for opt in re.findall(r"\[(--[^\]]*)\]", comment):
            words += split_words(opt)
        text = " ".join((code + (" #" + comment if comment else "")).split())
        found += commands_in_words(words, f"{name}:{first_line + offset}", text)
    return found


def commands_in_prose(prose, name):
    found = []
    for m in re.finditer(r"`([^`]+)`", prose):
        span = " ".join(m.group(1).split())
        if not re.search(r"\.py\b", span):
            continue
        line = prose.count("\n", 0, m.start()) + 1
        found += commands_in_words(split_words(span), f"{name}:{line}", span, bare_script_ok=True)
    return found


def readme_commands(paths=DOCS):
    found = []
    for path in paths:
        name = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else path.name
        blocks, prose = markdown_parts(path.read_text(encoding="utf-8"))
        for first_line, block in blocks:
            found += commands_in_block(block, first_line, name)
        found += commands_in_prose(prose, name)
    return found


def flags(words):
    """The --flag names among words (brackets of optional parts stripped; `...` and placeholders ignored)."""
    out = []
    for w in words:
        m = FLAG.fullmatch(w.strip("[]"))
        if m:
            out.append("--" + m.group(1))
    return out


# ---- the scripts' parsers -------------------------------------------------------------------------------

# Runs in one subprocess: each script as __main__ with `--help`; argparse's print_help records the parser that
# would print its help and exits, so no help is printed and no script does any work. Torch is imported once.
COLLECT = r"""
import argparse, contextlib, io, json, os, runpy, sys
scripts = json.loads(sys.argv[1])
out = {}
class Done(BaseException):
    pass
seen = []
def record(self, file=None):
    seen.append(self)
    raise Done()
argparse.ArgumentParser.print_help = record
def opts(p):
    return {s: {"choices": None if a.choices is None else [str(c) for c in a.choices],
                "nargs": a.nargs if a.nargs is None or isinstance(a.nargs, (int, str)) else str(a.nargs)}
            for s, a in p._option_string_actions.items()}
def options(p):
    subs = {}
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            subs.update({name: opts(sp) for name, sp in a.choices.items()})
    return {"options": opts(p), "subcommands": subs}
real_path = list(sys.path)
for script in scripts:
    seen.clear()
    sys.argv = [script, "--help"]
    sys.path[:] = [os.path.dirname(os.path.abspath(script))] + real_path
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            runpy.run_path(script, run_name="__main__")
    except Done:
        pass
    except BaseException as e:
        out[script] = {"error": f"{type(e).__name__}: {e} {err.getvalue()[-500:]}"}
        continue
    out[script] = options(seen[-1]) if seen else {"error": "no argparse help was printed"}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def parsers():
    # Only commands with flags need their script's parser (and a script without argparse would do its work).
    scripts = sorted({c.script for c in readme_commands() if (REPO / c.script).is_file() and flags(c.args)}
                     | {t for ts in AFTER_DASHDASH.values() for t in ts} | {f"train_{m}.py" for m in MODELS})
    found = collect_parsers(scripts)
    # A script that failed beside the others gets a process of its own (one script cannot then disturb another).
    for script in [s for s, info in found.items() if "error" in info]:
        found.update(collect_parsers([script]))
    return found


def collect_parsers(scripts):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", COLLECT, json.dumps(scripts)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def placeholder(value):
    """A value the README leaves to the reader: <loss>, $X, PATH, N, T, ..."""
    return bool(re.search(r"[<>$\[\]{}]|\.\.\.", value)) or value.isupper()


def option_problems(args, options, label):
    """(problems, unknown flags) of the flags in args against one parser's options: every flag must be one of
    its option strings, and a literal value of an option with choices one of the choices."""
    problems, unknown = [], []
    for i, word in enumerate(args):
        word = word.strip("[]")
        m = FLAG.fullmatch(word)
        if not m:
            continue
        flag = "--" + m.group(1)
        if flag not in options:
            unknown.append(flag)
            continue
        choices, nargs = options[flag]["choices"], options[flag]["nargs"]
        if choices is None or nargs == 0:
            continue
        if "=" in word:
            values = [word.split("=", 1)[1]]
        else:
            values = []
            for v in args[i + 1:]:
                if v.startswith("-") and not re.fullmatch(r"-[\d.]+", v):
                    break
                values.append(v.strip("[]"))
                if nargs in (None, "?") or len(values) == nargs:
                    break
        problems += [f"{label}: {flag} {v!r} is not one of its choices {choices}" for v in values
                     if not placeholder(v) and v not in choices]
    return problems, unknown


def check(command, parsers):
    """The problems of one command: a list of strings, empty when every flag is known."""
    if not flags(command.args):
        return []  # nothing to check (and its parser was not collected)
    info = parsers.get(command.script)
    if info is None or "error" in info:
        return [f"cannot read the options of {command.script}: {info and info['error']}"]
    args, after, problems, script = list(command.args), [], [], command.script
    if script in AFTER_DASHDASH and "--" in args:
        i = args.index("--")
        args, after = args[:i], args[i + 1:]
    elif "--" in args:
        args = args[:args.index("--")]  # argparse reads what follows as positionals
    options, subs = info["options"], info["subcommands"]
    if subs:
        positional = [a for a in args if not a.startswith("-")]
        sub = positional[0] if positional else None
        if sub not in subs:
            return [f"{script}: {sub!r} is not one of its subcommands {sorted(subs)}"]
        i = args.index(sub)
        p, unknown = option_problems(args[:i], options, script)
        problems += p + [f"{script}: no option {f}" for f in unknown]
        args, options, script = args[i + 1:], subs[sub], f"{script} {sub}"
    p, unknown = option_problems(args, options, script)
    problems += p
    if script in UNKNOWN_TO_TRAIN:
        opt, default = UNKNOWN_TO_TRAIN[script]
        models = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == opt), default).split(",")
        for m in models:
            target = f"train_{m}.py"
            handed_on = [a for a in args if not flags([a]) or flags([a])[0] not in options]
            p, still = option_problems(handed_on, parsers[target]["options"], target)
            problems += p + [f"{script}: no option {f} (nor has {target}, which gets the flags {script} does "
                             f"not know)" for f in still]
    else:
        problems += [f"{script}: no option {f}" for f in unknown]
    for target in AFTER_DASHDASH.get(command.script, []) if after else []:
        p, unknown = option_problems(after, parsers[target]["options"], target)
        problems += p + [f"{target} (after `--`): no option {f}" for f in unknown]
    return problems


# ---- the tests ------------------------------------------------------------------------------------------

def test_the_extractor_reads_shell_as_the_readme_writes_it(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("\n".join([
        "Run `OMP_NUM_THREADS=1 python a.py --inline 3` or `b.py --bare` (not `models/c.py`).",
        "```bash",
        'R="--one x \\',
        '   --two y"',
        "G=json:data.jsonl",
        "python d.py $R --data $G --opaque $UNSET \\",
        "    --cont 1 [--opt 2 --opt2 3]   # a comment --not-this [--from-comment 4]",
        "python -m pytest -q --skip-me && torchrun --nproc_per_node=2 e.py --t | tee log; python f.py --f=1",
        "bash bench/x.sh --nope",
        "python3 train_<model>.py --each ${G}",
        "python train_<name>.py --new-model-placeholder",
        "```",
        "",
        "    OUT=o python g.py --indented",
    ]) + "\n", encoding="utf-8")
    got = {(c.script, tuple(flags(c.args))) for c in readme_commands([md])}
    assert got == {("a.py", ("--inline",)), ("b.py", ("--bare",)),
                   ("d.py", ("--one", "--two", "--data", "--opaque", "--cont", "--opt", "--opt2", "--from-comment")),
                   ("e.py", ("--t",)), ("f.py", ("--f",)), ("g.py", ("--indented",))} | {
                  (f"train_{m}.py", ("--each",)) for m in MODELS}
    from models import MODELS as REGISTRY
    assert MODELS == sorted(REGISTRY), (MODELS, sorted(REGISTRY))   # every registered model has its train script
    d = next(c for c in readme_commands([md]) if c.script == "d.py")
    assert "json:data.jsonl" in d.args and "$UNSET" in d.args


def test_readme_commands_name_scripts_that_exist():
    commands = readme_commands()
    # The README has dozens of commands; far fewer means the extractor broke, not that the README shrank.
    assert len(commands) >= 60, len(commands)
    for must in ("convert_hf.py", "bench/retrieval.py", "dual_mask/sweep.py", "finetune.py", "train_mntp.py"):
        assert any(c.script == must for c in commands), must
    missing = sorted({f"{c.where}: {c.script} ({c.text})" for c in commands if not (REPO / c.script).is_file()})
    assert not missing, "README commands name scripts that do not exist:\n" + "\n".join(missing)


def test_readme_commands_use_only_options_their_scripts_have(parsers):
    commands = readme_commands()
    problems = [f"{c.where}: {p}\n    {c.text}" for c in commands if (REPO / c.script).is_file()
                for p in check(c, parsers)]
    assert not problems, "README commands with options their scripts do not have:\n" + "\n".join(problems)
