"""A self-contained Hugging Face Space folder, assembled from the repo (export.py --space DIR): the app
and its Space README and requirements (hf_files/), the weights (model.safetensors + config.json in
bf16 by default, and the training step in training_info.json), model.py, the smollm2 modules the app
imports (followed through every import, function-level ones included) and tokenizer/. Pushed alone,
it runs: nothing else of the repo is needed."""
import ast
import os
import shutil

from model import SmolLM2
from smollm2.errors import ExportError
from smollm2.tokenizer import TOKENIZER_DIR
from smollm2.weights import write_training_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPACE_DIR = os.path.join(ROOT, "hf_files")  # what git holds of the Space
SPACE_FILES = ("app.py", "README.md", "requirements.txt")


def repo_imports(path, root=ROOT):
    """The repo's .py files (relative to root) that the file at path imports, directly or through
    each other: model.py and smollm2/*.py, found by reading every import statement."""
    found, todo = set(), [path]
    while todo:
        with open(todo.pop()) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                rel = os.path.join(*name.split(".")) + ".py"
                if os.path.isfile(os.path.join(root, rel)) and rel not in found:
                    found.add(rel)
                    todo.append(os.path.join(root, rel))
                package = os.path.join(*name.split(".")[:1], "__init__.py")
                if os.path.isfile(os.path.join(root, package)) and package not in found:
                    found.add(package)
    return sorted(found)


def assemble(source, out_dir, dtype):
    """Write the Space folder out_dir (created, or updated in place) with the weights of source
    (anything SmolLM2.from_pretrained reads) saved in dtype; returns the files written."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"--space {out_dir} exists and is not a directory")
    model = SmolLM2.from_pretrained(source)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for rel in (*SPACE_FILES, *repo_imports(os.path.join(SPACE_DIR, "app.py"))):
        origin = os.path.join(SPACE_DIR if rel in SPACE_FILES else ROOT, rel)
        os.makedirs(os.path.dirname(os.path.join(out_dir, rel)), exist_ok=True)
        shutil.copyfile(origin, os.path.join(out_dir, rel))
        written.append(rel)
    shutil.copytree(TOKENIZER_DIR, os.path.join(out_dir, "tokenizer"), dirs_exist_ok=True)
    written.append("tokenizer/")
    model.save_pretrained(out_dir, dtype=dtype, tokenizer_dir=None)  # the app reads tokenizer/
    write_training_info(out_dir, source, model.source_info)  # with "conversations": the Space then chats
    return written + ["model.safetensors", "config.json", "generation_config.json", "training_info.json"]
