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


# ----------------------------------------------------------------------------- the reference and the engine
def read(rel):
    with open(os.path.join(ROOT, rel)) as f:
        return f.read()


def function_lengths(path):
    """{qualified name: lines} of every function and method in the file at path."""
    tree = ast.parse(read(path))
    lengths = {}

    def visit(node, prefix=""):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    lengths[name] = child.end_lineno - child.lineno + 1
                visit(child, name + ".")
    visit(tree)
    return lengths


def test_model_py_is_the_model_no_device_branch_no_compiler_no_cli_at_most_330_lines():
    source = read("model.py")
    assert len(source.splitlines()) <= 330
    for engine_code in (".device.type", "is_cuda", "torch.cuda", "torch.compiler", "torch._dynamo", "__main__",
                        "argparse", "is_compiling"):
        assert engine_code not in source, f"model.py holds engine code: {engine_code}"


def test_train_py_reads_top_to_bottom_at_most_300_lines_no_function_over_50():
    assert len(read("train.py").splitlines()) <= 300
    long = {name: n for name, n in function_lengths("train.py").items() if n > 50}
    assert not long, long


def test_no_function_over_60_lines_in_model_py_the_entry_points_or_the_package():
    modules = repo_modules()
    checked = [rel for name, rel in modules.items()
               if name == "model" or name in ENTRY_POINTS or name.startswith("smollm2")]
    assert len(checked) > 20
    long = {f"{os.path.relpath(path, ROOT)}:{name}": n for path in checked
            for name, n in function_lengths(path).items() if n > 60}
    assert not long, long


def class_rewrites(source):
    """Line numbers where source assigns an object's __class__."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        found += [node.lineno for t in targets if isinstance(t, ast.Attribute) and t.attr == "__class__"]
    return found


def test_no_module_rewrites_an_objects_class():
    for name, path in repo_modules().items():
        assert not class_rewrites(read(path)), f"{name} assigns __class__"


def test_the_checks_above_see_a_long_function_and_a_class_rewrite(tmp_path):
    path = tmp_path / "long.py"
    path.write_text("class A:\n    def f(self):\n" + "        x = 1\n" * 70 + "\n\ndef g():\n    a.__class__ = B\n")
    assert function_lengths(str(path)) == {"A.f": 71, "g": 2}
    assert class_rewrites(path.read_text()) == [76]
