"""Bad input and resource bounds (issue 12): each is one clear message and exit 2 (or a non-zero exit where
the problem is the environment), in bounded time and memory, never a traceback."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tdxdbg.cli import main
from tdxdbg.engine import vm
from tdxdbg.scenario import loader

PYTHON = sys.executable
BASE = textwrap.dedent("""\
    title = "t"
    [td]
    gpaw = 48
    [[memslot]]
    id = 0
    gpa = 0x0
    size = "16M"
    guest_memfd = true
    [attributes]
    private = [[0x0, "16M"]]
    [[vcpu]]
    program = ["accept 0x1000"]
    [[host]]
    program = ["punch_hole 0x1000 4K"]
""")
DEC = "9" * 5000                      # past Python's 4300-digit limit for int(str)
HEX = "0x" + "f" * 5000               # 20000 bits: int() converts it, str() of it would fail


def problems(tmp_path: Path, text: str, *args: str) -> list[str]:
    p = tmp_path / "s.toml"
    p.write_text(text)
    out, err = io.StringIO(), io.StringIO()
    assert main(["validate", str(p), *args], out, err) == 2, out.getvalue()
    return [line.removeprefix("error: ").replace(str(p), "FILE") for line in err.getvalue().splitlines()]


def one(tmp_path: Path, text: str) -> str:
    lines = problems(tmp_path, text)
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(("old", "new", "message"), [
    ("gpa = 0x0", f"gpa = {HEX}",
     "FILE:6: memslot[0].gpa: expected a GPA between 0 and 2^64-1, found an integer of 20000 bits"),
    ("gpa = 0x0", f"gpa = {DEC}",
     "FILE:6: expected a number that fits in 64 bits, found a decimal integer of more than 4300 digits"),
    ('size = "16M"', f"size = {HEX}", "FILE:7: memslot[0].size: expected a size below 2^64, found an integer of "
                                      "20000 bits"),
    ('size = "16M"', f'size = "{DEC}"', "FILE:7: memslot[0].size: expected a size that fits in 64 bits, found "
                                        f"'{'9' * 59}... (5000 characters)"),
    ('size = "16M"', 'size = "1__6M"', 'FILE:7: memslot[0].size: expected a size (an integer or a number with K, '
                                       "M or G, like \"2M\"), found '1__6M'"),
    ('size = "16M"', 'size = "0x1__000"', 'FILE:7: memslot[0].size: expected a size (an integer or a number with '
                                          "K, M or G, like \"2M\"), found '0x1__000'"),
    ("id = 0", f"id = {HEX}", "FILE:5: memslot[0].id: expected an integer memslot id, found an integer of 20000 "
                              "bits"),
    ("id = 0", "id = 32764", "FILE:5: memslot[0].id: expected a memslot id from 0 to 32763, found 32764"),
    ("gpaw = 48", f"gpaw = {HEX}", "FILE:3: td.gpaw: expected 48 or 52, found an integer of 20000 bits"),
    ('title = "t"', f"title = {HEX}", "FILE:1: title: expected a string, found an integer of 20000 bits"),
    ('"accept 0x1000"', '"read 0x1_0000_0000_0000_0000"',
     "FILE:12: vcpu[0].program[0]: expected a GPA that fits in 64 bits, found '0x1_0000_0000_0000_0000'"),
    ('"accept 0x1000"', f'"read {"9" * 30}"',
     f"FILE:12: vcpu[0].program[0]: expected a GPA that fits in 64 bits, found '{'9' * 30}'"),
    ('"accept 0x1000"', '"read 010"', "FILE:12: vcpu[0].program[0]: expected a GPA, found '010'"),
    ('"accept 0x1000"', f'"write 0x1000 {DEC}"',
     "FILE:12: vcpu[0].program[0]: expected an operation of at most 200 characters, found 'write 0x1000 "
     f"{'9' * 46}... (5013 characters)"),
    ('"punch_hole 0x1000 4K"', f'"delete_memslot {"9" * 40}"',
     f"FILE:14: host[0].program[0]: expected a memslot ID that fits in 64 bits, found '{'9' * 40}'"),
])
def test_numbers_too_long_are_one_problem(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in BASE
    assert problems(tmp_path, BASE.replace(old, new))[0] == message


@pytest.mark.parametrize(("extra", "message"), [
    (f"[schedule]\nseed = {HEX}\n", "FILE:16: schedule.seed: expected an integer seed, found an integer of 20000 "
                                    "bits"),
    ("[schedule]\nseed = -1\n", "FILE:16: schedule.seed: expected a seed between 0 and 2^64-1, found -1"),
    (f'[schedule]\norder = ["vcpu0*{DEC}"]\n',
     "FILE:16: schedule.order[0]: expected an order of at most 1000000 turns in all (repeat counts included), "
     f"found more by 'vcpu0*{'9' * 53}... (5006 characters)"),
    ('[schedule]\norder = ["vcpu0*600000", "host0*600000"]\n',
     "FILE:16: schedule.order[1]: expected an order of at most 1000000 turns in all (repeat counts included), "
     "found more by 'host0*600000'"),
    (f'[[inject]]\nseamcall = "TDH.MEM.PAGE.AUG"\noccurrence = 1\nstatus = {HEX}\n',
     "FILE:18: inject[0].status: expected a 64-bit status, found an integer of 20000 bits"),
    (f'[[inject]]\nseamcall = "TDH.MEM.PAGE.AUG"\noccurrence = 1\nstatus = "TDX_OPERAND_BUSY|{DEC}"\n',
     'FILE:18: inject[0].status: expected a status name like TDX_OPERAND_BUSY (optionally |OPERAND) or an '
     f"integer, found 'TDX_OPERAND_BUSY|{'9' * 42}... (5017 characters)"),
    (f'[[expect]]\nread = {{ task = "vcpu0", gpa = 0, value = {HEX} }}\n',
     "FILE:16: expect[0].read.value: expected a 64-bit value between 0 and 2^64-1, found an integer of 20000 bits"),
    (f'[[expect]]\nfault = {{ task = "vcpu0", gpa = 0, ret = {HEX} }}\n',
     'FILE:16: expect[0].fault.ret: expected a RET_PF_* name or an errno like "-EFAULT", found an integer of '
     "20000 bits"),
    (f'[[expect]]\nvm_dead = {HEX}\n', "FILE:16: expect[0].vm_dead: expected a boolean, found an integer of 20000 "
                                       "bits"),
])
def test_huge_values_elsewhere_are_one_problem(tmp_path: Path, extra: str, message: str) -> None:
    assert one(tmp_path, BASE + extra) == message


def test_an_empty_memslot_list(tmp_path: Path) -> None:
    text = 'memslot = []\n[td]\n[[vcpu]]\nprogram = ["fetch 0x1000"]\n'
    assert problems(tmp_path, text) == [
        "FILE:1: memslot: expected at least one [[memslot]], found an empty array",
        "FILE:4: vcpu[0].program[0]: address outside every memslot: expected a range inside a memslot (none), "
        "found [0x1000, 0x1008)"]


def test_problems_past_the_bound_are_counted(tmp_path: Path) -> None:
    text = BASE.replace("gpaw = 48", "gpaw = 48\n" + "".join(f"k{i} = 1\n" for i in range(loader.MAX_PROBLEMS + 50)))
    lines = problems(tmp_path, text)
    assert len(lines) == loader.MAX_PROBLEMS + 1
    assert lines[-1] == "FILE: 50 more problems not listed"


def _special_file_message(tmp_path: Path, path: str) -> tuple[int, str]:
    p = subprocess.run([PYTHON, "-m", "tdxdbg.cli", "validate", path], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    return p.returncode, p.stderr


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "s.toml"
    os.mkfifo(fifo)
    assert _special_file_message(tmp_path, str(fifo)) == (2, f"error: {fifo}: expected a regular file, found a "
                                                            "FIFO\n")


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_devices_are_refused(tmp_path: Path, device: str) -> None:
    assert _special_file_message(tmp_path, device) == (2, f"error: {device}: expected a regular file, found a "
                                                          "character device\n")


def test_a_file_past_the_size_bound_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "big.toml"
    p.write_text(BASE + "# " + "x" * loader.MAX_FILE_BYTES + "\n")
    out, err = io.StringIO(), io.StringIO()
    assert main(["validate", str(p)], out, err) == 2
    assert err.getvalue() == (f"error: {p}: expected a scenario file of at most {loader.MAX_FILE_BYTES} bytes, "
                              "found a larger file\n")


VARIANT_OK = "from tdxdbg.engine.variants.upstream import Upstream\n\nclass Mine(Upstream):\n    pass\n"


@pytest.mark.parametrize(("body", "message"), [
    ("import sys\nsys.exit(3)\n", "the file called sys.exit(3) while being imported"),
    ("import sys\nsys.exit(10 ** 5000)\n", "the file called sys.exit(<int>) while being imported"),
    ("raise SystemError('x' * 1000)\n", f"SystemError: {'x' * 200}..."),
    ("class Boom(BaseException):\n    pass\nraise Boom('no')\n", "Boom: no"),
    ("while True:\n    try:\n        pass\n    except Exception:\n        pass\n",
     "importing the file did not finish within 0.5 seconds"),
])
def test_a_variant_that_fails_on_import_is_one_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       body: str, message: str) -> None:
    monkeypatch.setattr(vm, "VARIANT_IMPORT_SECONDS", 0.5)
    (tmp_path / "bad.py").write_text(body + VARIANT_OK)
    monkeypatch.chdir(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    assert main(["run", "first_private_fault", "--variant", "bad.py:Mine"], out, err) == 2
    scenario = loader.resolve("first_private_fault")
    assert err.getvalue() == f"error: {scenario}: --variant: {tmp_path}/bad.py: cannot load variant: {message}\n"
    assert out.getvalue() == ""


def test_a_variant_is_imported_once_for_the_check_and_the_build(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "count.py").write_text("import builtins\nbuiltins.tdxdbg_imports = "
                                       "getattr(builtins, 'tdxdbg_imports', 0) + 1\n" + VARIANT_OK)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "first_private_fault", "--variant", "count.py:Mine"], io.StringIO(), io.StringIO()) == 0
    import builtins
    assert builtins.tdxdbg_imports == 1  # type: ignore[attr-defined]
    del builtins.tdxdbg_imports  # type: ignore[attr-defined]


def _shell(command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_json_to_a_closed_stdout() -> None:
    p = _shell(f"exec {PYTHON} -m tdxdbg.cli run first_private_fault --json - >&-")
    assert (p.returncode, p.stderr.splitlines()[-1]) == (2, "error: cannot write to standard output: it is closed")


def test_json_to_a_full_stdout() -> None:
    p = _shell(f"exec {PYTHON} -m tdxdbg.cli run first_private_fault --json - >/dev/full")
    assert (p.returncode, p.stderr.splitlines()[-1]) == (2, "error: cannot write to standard output: No space left "
                                                            "on device")
    assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr


def test_summary_to_a_full_stdout() -> None:
    p = _shell(f"exec {PYTHON} -m tdxdbg.cli run first_private_fault >/dev/full")
    assert (p.returncode, p.stderr) == (2, "error: cannot write to standard output: No space left on device\n")


def test_a_closed_pipe_is_quiet() -> None:
    p = _shell(f"{PYTHON} -m tdxdbg.cli scenarios | head -c 1 >/dev/null; echo \"rc=$?\"",
               env={"PYTHONUNBUFFERED": "1"})
    assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr


def test_unicode_title_on_an_ascii_stdout(tmp_path: Path) -> None:
    p = tmp_path / "u.toml"
    p.write_text(BASE.replace('title = "t"', 'title = "Café ✓"'), encoding="utf-8")
    r = subprocess.run([PYTHON, "-m", "tdxdbg.cli", "run", str(p)], capture_output=True, timeout=120,
                       env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode("ascii").splitlines()
    assert lines[0] == "u: Caf\\xe9 \\u2713"
    assert lines[-1] == "OK"


def test_a_long_line_inside_a_string_is_read_in_linear_time(tmp_path: Path) -> None:
    """The line finder scans every line, those inside multi-line strings too: a header-like line with a long run
    of spaces once made its regular expression backtrack quadratically (minutes for 200,000 spaces)."""
    p = tmp_path / "s.toml"
    p.write_text(BASE.replace("gpaw = 48", "gpaw = 47") + 'description = """\n[a' + " " * 200_000 + 'x\n"""\n')
    r = subprocess.run([PYTHON, "-m", "tdxdbg.cli", "validate", str(p)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.splitlines()[0] == f"error: {p}:3: td.gpaw: expected 48 or 52, found the integer 47"


def test_more_vcpus_than_kvm_max_vcpus(tmp_path: Path) -> None:
    text = BASE.replace('[[vcpu]]\nprogram = ["accept 0x1000"]\n', "[[vcpu]]\nprogram = []\n" * 4097)
    assert one(tmp_path, text) == ("FILE:8203: vcpu[4096]: expected at most 4096 [[vcpu]] (KVM_MAX_VCPUS), found "
                                   "4097")


def test_a_name_too_long_for_the_file_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENAMETOOLONG from a scenario name or a variant path: one problem, the path cut in the message."""
    monkeypatch.chdir(tmp_path)
    err = io.StringIO()
    assert main(["validate", "a" * 5000], io.StringIO(), err) == 2
    assert err.getvalue() == f"error: {'a' * 100}...{'a' * 100}: cannot read the file: File name too long\n"
    err = io.StringIO()
    assert main(["run", "first_private_fault", "--variant", "b" * 5000 + ".py:X"], io.StringIO(), err) == 2
    scenario = loader.resolve("first_private_fault")
    shown = f"'{tmp_path}/{'b' * 5000}"[:200]   # the repr, cut to 200 characters
    assert err.getvalue() == f"error: {scenario}: --variant: variant file {shown}...: File name too long\n"


@pytest.mark.parametrize("kind", ["a FIFO", "a directory"])
def test_json_to_an_existing_path_that_is_not_a_regular_file_is_refused_before_the_run(
        tmp_path: Path, kind: str) -> None:
    """A FIFO would block the write until something reads it: refused with exit 2, nothing run or written."""
    path = tmp_path / "trace.json"
    if kind == "a FIFO":
        os.mkfifo(path)
    else:
        path.mkdir()
    out, err = io.StringIO(), io.StringIO()
    assert main(["run", "first_private_fault", "--json", str(path)], out, err) == 2
    assert out.getvalue() == ""
    assert err.getvalue() == (f"error: {path}: --json: expected a regular file (or a new one) for the trace, found "
                              f"{kind}; use '-' for standard output\n")


def test_json_to_a_path_that_becomes_a_fifo_during_the_run_does_not_block(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The check before the run passes (no file yet); a FIFO made meanwhile is refused at the write (O_NONBLOCK
    open: ENXIO without a reader), not waited on."""
    import tdxdbg.scenario.run as run_module

    path = tmp_path / "trace.json"
    real = run_module.run_scenario

    def run_then_mkfifo(*a: object, **k: object) -> object:
        report = real(*a, **k)
        os.mkfifo(path)
        return report

    monkeypatch.setattr(run_module, "run_scenario", run_then_mkfifo)
    err = io.StringIO()
    assert main(["run", "first_private_fault", "--json", str(path)], io.StringIO(), err) == 2
    assert err.getvalue() == (f"error: {path}: --json: expected a regular file (or a new one) for the trace, found "
                              "a FIFO; use '-' for standard output\n")


def test_json_overwrites_an_existing_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "trace.json"
    path.write_text("x" * 100_000)
    assert main(["run", "first_private_fault", "--json", str(path)], io.StringIO(), io.StringIO()) == 0
    assert json.loads(path.read_text())["stop"] == "done"
