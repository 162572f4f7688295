"""
How heavy is the house? Figures of the code's layout, for the redesign's before/after.

    python bench/layout.py                 # this working tree
    python bench/layout.py --root OTHER    # another checkout (e.g. a git worktree of an older commit)

Prints: .py files at the root; the import graph between the project's own modules (imports inside functions
count), its circles (strongly connected components) and floors (the longest chain of imports); the lines of
the BaseTrainer class; README.md lines; the learner's path (a model file, the components, the model core, the
training loop, the loader) in files and lines. Reads files only (ast), imports nothing of the project.
"""

import argparse
import ast
import os
import sys
from pathlib import Path

SKIP = {"tests", "bench", ".venv", ".git", "docs", "data", "runs", "__pycache__", ".ci"}
LEARNER_PATH = ["models/baseline_gpt2.py", "components.py", "auto_regressive_model.py", "base_trainer.py",
                "dataloader.py"]


def project_modules(root):
    """{module name: path} of every .py of the project (the root and its code folders, not tests or benches)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in SKIP or any(part.startswith(".") for part in rel.parts):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(path, name, modules):
    """The project modules that module `name` imports anywhere in its file (top level or inside functions)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package
                pkg = package.split(".")[: len(package.split(".")) - node.level + 1] if package else []
                base = ".".join([*pkg, base] if base else pkg)
            targets = [base] + [f"{base}.{a.name}" if base else a.name for a in node.names]
        for t in targets:
            while t and t not in modules:  # `import a.b.c` counts as a.b.c, else a.b, else a
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def strongly_connected(graph):
    """Tarjan's algorithm: the components with more than one module (import circles)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def floors(graph, circles):
    """The longest import chain, counted in modules (a circle counts as one floor)."""
    rep = {m: c[0] for c in circles for m in c}
    g = {}
    for v, ws in graph.items():
        g.setdefault(rep.get(v, v), set()).update(rep.get(w, w) for w in ws if rep.get(w, w) != rep.get(v, v))
    memo = {}

    def depth(v):
        if v not in memo:
            memo[v] = 1 + max((depth(w) for w in g.get(v, ())), default=0)
        return memo[v]

    return max((depth(v) for v in g), default=0)


def class_lines(path, class_name):
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return node.end_lineno - node.lineno + 1, sum(isinstance(n, ast.FunctionDef) for n in node.body)
    return None, None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="the checkout to measure")
    root = Path(p.parse_args(argv).root).resolve()
    modules = project_modules(root)
    graph = {name: imports_of(path, name, modules) for name, path in modules.items()}
    circles = strongly_connected(graph)
    root_py = sorted(f for f in os.listdir(root) if f.endswith(".py"))
    trainer_lines, trainer_methods = class_lines(root / "base_trainer.py", "BaseTrainer")
    readme = (root / "README.md").read_text().count("\n")
    path_lines = {f: (root / f).read_text().count("\n") for f in LEARNER_PATH if (root / f).exists()}
    print(f"root .py files          {len(root_py)}")
    print(f"project modules         {len(modules)}")
    print(f"import floors           {floors(graph, circles)}")
    print(f"import circles          {len(circles)}" + "".join(f"\n    {' <-> '.join(c)}" for c in circles))
    print(f"BaseTrainer             {trainer_lines} lines, {trainer_methods} methods")
    print(f"README.md               {readme} lines")
    print(f"learner's path          {len(path_lines)} files, {sum(path_lines.values())} lines: "
          + ", ".join(f"{f} {n}" for f, n in path_lines.items()))


if __name__ == "__main__":
    main()
