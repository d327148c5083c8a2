"""Every entry point's command line: a bad flag or a user error is one line and exit status 2."""
import subprocess
import sys

import pytest

from conftest import ROOT
from smollm2.cli import POS_INT, OneLineParser, main_guard
from smollm2.errors import CheckpointError, DataError, ExportError, ModelLoadError, UsageError, UserError


def test_every_user_error_is_a_user_error_and_a_value_error():
    for kind in (UsageError, DataError, CheckpointError, ModelLoadError, ExportError):
        assert issubclass(kind, UserError) and issubclass(kind, ValueError)


def test_one_line_parser_raises_instead_of_printing_usage():
    p = OneLineParser()
    p.add_argument("--n", type=POS_INT)
    with pytest.raises(UsageError, match="--n: must be > 0, got 0"):
        p.parse_args(["--n", "0"])
    with pytest.raises(UsageError, match="unrecognized arguments: --nope"):
        p.parse_args(["--nope"])


def test_main_guard_prints_one_line_and_exits_2(capsys):
    codes = []
    def bad():
        raise DataError("input.txt is empty")
    main_guard(bad, "prog.py", exit=codes.append)
    assert codes == [2] and capsys.readouterr().err == "prog.py: error: input.txt is empty\n"
    main_guard(lambda: 0, "prog.py", exit=codes.append)
    assert codes == [2, 0]
    def interrupted():
        raise KeyboardInterrupt
    main_guard(interrupted, "prog.py", exit=codes.append, interrupted="nothing saved")
    assert codes[-1] == 130 and capsys.readouterr().err == "prog.py: nothing saved\n"
    with pytest.raises(RuntimeError):  # a bug is not a user error: its traceback stays
        main_guard(lambda: (_ for _ in ()).throw(RuntimeError("bug")), "prog.py", exit=codes.append)


@pytest.mark.parametrize("script, args", [("train.py", ["--steps", "-1"]), ("eval.py", ["x.pt"]),
                                          ("export.py", ["x.pt"])])
def test_each_entry_point_answers_bad_flags_in_one_line(script, args, tmp_path):
    proc = subprocess.run([sys.executable, f"{ROOT}/{script}", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith(f"{script}: error: ")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
