"""The repo's shape: a few entry points at the top, one package below them, imports one way down."""
import ast
import os
import subprocess

from conftest import ROOT

ENTRY_POINTS = {"train", "eval", "export", "sample", "hf_files.app"}  # what a user runs (model.py is also the spec)


def repo_modules():
    """{module name: path} of every Python file git holds, tests aside."""
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    modules = {}
    for rel in files:
        if rel.startswith("tests/"):
            continue
        name = rel[:-3].replace("/", ".").removesuffix(".__init__")
        modules[name] = os.path.join(ROOT, rel)
    return modules


def imports(path, modules):
    """[(imported repo module, names taken from it, at module level?)] of one file, function-level
    imports included; `from package import module` counts as importing that module."""
    with open(path) as f:
        tree = ast.parse(f.read())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], id(node) in top_level) for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                if f"{node.module}.{a.name}" in modules:
                    found.append((f"{node.module}.{a.name}", [], id(node) in top_level))
                elif node.module in modules:
                    found.append((node.module, [a.name], id(node) in top_level))
    return found


def graph():
    modules = repo_modules()
    return modules, {name: imports(path, modules) for name, path in modules.items()}


def test_at_most_six_python_files_at_the_top_level():
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    top = [f for f in files if "/" not in f]
    assert len(top) <= 6, top
    assert {"model.py", "train.py", "eval.py", "export.py"} <= set(top)


def find_circle(edges):
    """The first import circle in edges ({module: imports(...)}) as a list of names, or None."""
    done, path = set(), []

    def visit(name):
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return None
        path.append(name)
        for target, _, _ in edges.get(name, []):
            if circle := visit(target):
                return circle
        path.pop()
        done.add(name)
        return None

    return next((circle for name in edges if (circle := visit(name))), None)


def test_no_import_circle_among_the_repos_modules():
    _, edges = graph()
    circle = find_circle(edges)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_imports_run_one_way_entry_points_then_the_package_then_model_py():
    _, edges = graph()
    for name, found in edges.items():
        targets = {target for target, _, _ in found}
        if name.startswith("smollm2") or name == "model":
            assert not targets & ENTRY_POINTS, f"{name} imports an entry point: {targets & ENTRY_POINTS}"
        if name == "model":  # the spec a learner reads: its one package import is the weights reader, lazily
            assert all(not top for _, _, top in found), f"model.py imports {targets} at module level"
            assert targets <= {"smollm2", "smollm2.weights"}, targets


def test_no_module_takes_another_modules_underscore_names():
    _, edges = graph()
    for name, found in edges.items():
        private = [f"{target}.{n}" for target, names, _ in found for n in names
                   if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{name} imports private names {private}"
    modules = repo_modules()
    for name, path in modules.items():  # nor reaches into them as attributes (module._name)
        with open(path) as f:
            tree = ast.parse(f.read())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases.update({(a.asname or a.name): a.name for a in node.names if a.name in modules})
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                aliases.update({(a.asname or a.name): f"{node.module}.{a.name}" for a in node.names
                                if f"{node.module}.{a.name}" in modules})
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                raise AssertionError(f"{name} reaches into {aliases[node.value.id]}.{node.attr}")


def test_the_circle_check_sees_a_circle(tmp_path, monkeypatch):
    """The checks above would fail on today's kind of circle (a.py <-> b.py, one import in a function)."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import g\n")
    modules = {"a": str(tmp_path / "a.py"), "b": str(tmp_path / "b.py")}
    edges = {name: imports(path, modules) for name, path in modules.items()}
    assert edges == {"a": [("b", [], True)], "b": [("a", ["g"], False)]}
    assert find_circle(edges) in (["a", "b", "a"], ["b", "a", "b"])


def test_readme_is_at_most_250_lines():
    with open(os.path.join(ROOT, "README.md")) as f:
        assert len(f.read().splitlines()) <= 250
