"""smollm2/space.py: what an assembled Space folder holds (tests/test_app.py serves one in chromium)."""
import os
import subprocess
import sys

from conftest import ROOT
from smollm2 import space


def test_the_space_takes_every_module_the_app_reaches_function_level_imports_included(tmp_path):
    needed = space.repo_imports(os.path.join(space.SPACE_DIR, "app.py"))
    # model.py imports smollm2.weights inside from_pretrained; weights imports errors and tokenizer
    assert {"model.py", "smollm2/__init__.py", "smollm2/weights.py", "smollm2/errors.py",
            "smollm2/tokenizer.py", "smollm2/devices.py"} <= set(needed)
    assert not {"train.py", "smollm2/checkpoint.py", "smollm2/loaders.py"} & set(needed)
    (tmp_path / "smollm2").mkdir()
    for name in ("__init__.py", "b.py", "c.py", "unused.py"):
        (tmp_path / "smollm2" / name).write_text("")
    (tmp_path / "smollm2" / "b.py").write_text("def f():\n    from smollm2 import c\n")
    (tmp_path / "app.py").write_text("import os\nfrom smollm2.b import f\n")
    assert space.repo_imports(str(tmp_path / "app.py"), root=str(tmp_path)) == [
        "smollm2/__init__.py", "smollm2/b.py", "smollm2/c.py"]


def test_a_file_in_the_way_of_the_space_folder_is_one_clear_error_before_any_loading(tmp_path):
    (tmp_path / "space").write_text("not a folder")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), "missing.pt", "--space", "space"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "export.py: error: --space space exists and is not a directory\n"
