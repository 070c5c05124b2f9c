"""The command line's exit statuses and forms, in subprocesses where the process boundary is what matters:
a crash of the debugger exits non-zero, the bare form takes the debugger's options, `--version`, a relative
`--variant` on the command line, and a dead VM is not `OK`."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cli_helpers import run_in_pty

from tdxdbg import __version__, cli
from tdxdbg.cli import main
from tdxdbg.scenario.loader import scenarios_dir

PYTHON = sys.executable


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_"))}
    env.update(TERM="xterm-256color", COLUMNS="100", LINES="30")
    return env


# A debugger whose screen fails while it mounts, as the NO_COLOR crash of issue 12 did on its first frame. The
# failure message carries the --variant and --schedule the app was given: the bare form passed them on.
CRASHING_APP = textwrap.dedent("""
    import sys
    from tdxdbg.ui.app import TdxdbgApp

    def on_mount(self):
        raise RuntimeError(f"screen failed: variant={self.variant_override} schedule={self.schedule_override}")

    TdxdbgApp.on_mount = on_mount
    from tdxdbg.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_a_crash_of_the_debugger_exits_1() -> None:
    r = run_in_pty([PYTHON, "-c", CRASHING_APP, "first_private_fault", "--variant", "v7", "--schedule",
                    "sequential"], _env())
    assert r.code == 1, r.output[-2000:]
    assert "screen failed: variant=v7 schedule=sequential" in r.text


def test_quitting_the_debugger_exits_0() -> None:
    quitting = CRASHING_APP.replace('raise RuntimeError(f"screen failed: variant={self.variant_override} '
                                    'schedule={self.schedule_override}")', "self.exit()")
    r = run_in_pty([PYTHON, "-c", quitting, "first_private_fault"], _env())
    assert r.code == 0, r.output[-2000:]


def test_bare_form_takes_the_debugger_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[object, ...]] = []
    monkeypatch.setattr(cli, "_run_tui", lambda *a: seen.append(a[:3]) or 0)
    assert main(["first_private_fault", "--variant", "v7", "--schedule", "random:3"]) == 0
    assert main(["--variant", "no-freeze"]) == 0
    assert main([]) == 0
    assert main(["tui", "x.toml", "--schedule", "sequential"]) == 0
    assert seen == [("first_private_fault", "v7", "random:3"), (None, "no-freeze", None), (None, None, None),
                    ("x.toml", None, "sequential")]


def test_bare_form_rejects_unknown_options() -> None:
    err = io.StringIO()
    assert main(["first_private_fault", "--colour"], io.StringIO(), err) == 2
    assert err.getvalue() == "tdxdbg: error: unrecognized arguments: --colour\n"


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag: str) -> None:
    p = subprocess.run([PYTHON, "-m", "tdxdbg.cli", flag], capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout, p.stderr) == (0, f"tdxdbg {__version__}\n", "")


VARIANT = textwrap.dedent("""
    from tdxdbg.engine.variants.upstream import Upstream

    class Mine(Upstream):
        pass
""")
SCENARIO = textwrap.dedent("""
    title = "relative variant"
    [td]
    variant = "{variant}"
    [[memslot]]
    gpa = 0
    size = "2M"
    guest_memfd = true
    [attributes]
    private = [[0, "2M"]]
    [[vcpu]]
    program = ["accept 0x1000", "write 0x1000 7", "read 0x1000 expect 7"]
""")


def test_relative_variant_on_the_command_line_is_relative_to_the_current_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "variants").mkdir()
    (tmp_path / "variants" / "mine.py").write_text(VARIANT)
    (tmp_path / "scenarios").mkdir()
    # In the file, the path is relative to the scenario file: ../variants/mine.py.
    scenario = tmp_path / "scenarios" / "s.toml"
    scenario.write_text(SCENARIO.format(variant="../variants/mine.py:Mine"))
    monkeypatch.chdir(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    assert main(["run", "scenarios/s.toml"], out, err) == 0, err.getvalue()
    assert "variant ../variants/mine.py:Mine" in out.getvalue()
    # On the command line, relative to the current directory (tmp_path), not to the scenario's directory.
    out, err = io.StringIO(), io.StringIO()
    assert main(["run", "scenarios/s.toml", "--variant", "variants/mine.py:Mine", "--json", "-"], out, err) == 0
    assert json.loads(out.getvalue())["variant"] == f"{tmp_path}/variants/mine.py:Mine"
    out, err = io.StringIO(), io.StringIO()
    assert main(["run", "scenarios/s.toml", "--variant", "../variants/mine.py:Mine"], out, err) == 2
    assert err.getvalue() == (f"error: scenarios/s.toml: --variant: variant file {tmp_path}/../variants/mine.py "
                              "does not exist\n")


def test_a_dead_vm_is_not_ok_unless_expected(tmp_path: Path) -> None:
    """tdx_is_sept_violation_unexpected_pending kills the VM (kvm_vm_dead): without `vm_dead = true` the run
    fails and says why; with it, the run is OK."""
    shipped = (scenarios_dir() / "pending_access_sept_ve_disabled.toml").read_text()
    assert "vm_dead = true" in shipped
    p = tmp_path / "dead.toml"
    p.write_text(shipped.replace("[[expect]]\nvm_dead = true\n", ""))
    out = io.StringIO()
    assert main(["run", str(p)], out, io.StringIO()) == 1
    lines = out.getvalue().splitlines()
    assert "the VM died and the scenario does not expect it (`vm_dead = true`)" in lines
    assert lines[-1] == "FAILED"
    out = io.StringIO()
    assert main(["run", "pending_access_sept_ve_disabled"], out, io.StringIO()) == 0
    assert out.getvalue().splitlines()[-1] == "OK"


def test_user_text_is_never_rich_markup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A title and a variant path holding `[`, `[/]` or `[bold]` print as written (rich would raise on `[/]`)."""
    (tmp_path / "v[b]").mkdir()
    (tmp_path / "v[b]" / "mine.py").write_text(VARIANT)
    p = tmp_path / "s.toml"
    p.write_text(SCENARIO.format(variant="v[b]/mine.py:Mine").replace('title = "relative variant"',
                                                                     'title = "[/] [bold]x[/bold] [red"'))
    monkeypatch.chdir(tmp_path)
    for args in (["run", "s.toml"], ["run", "s.toml", "--variant", "v[b]/mine.py:Mine"]):
        out, err = io.StringIO(), io.StringIO()
        assert main(args, out, err) == 0, err.getvalue()
        lines = out.getvalue().splitlines()
        assert lines[0] == "s: [/] [bold]x[/bold] [red"
        assert lines[1].startswith("variant " + ("v[b]/mine.py:Mine" if len(args) == 2
                                                 else f"{tmp_path}/v[b]/mine.py:Mine") + " · schedule")


def test_ctrl_c_during_a_long_run_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    """SIGINT while `tdxdbg run` works through a long run: exit 130 and one line. The variant file marks when
    the scenario has been loaded, so the signal arrives inside the run, not during start-up."""
    marker = tmp_path / "loaded"
    (tmp_path / "mark.py").write_text(f"open({str(marker)!r}, 'w').close()\n" + VARIANT)
    # KVM_PRE_FAULT_MEMORY of 1 GiB, page by page: far more frames than the time the test waits.
    (tmp_path / "long.toml").write_text(SCENARIO.format(variant="mark.py:Mine").replace(
        'size = "2M"', 'size = "4G"').replace('[[0, "2M"]]', '[[0, "4G"]]').replace(
        "[[vcpu]]", '[[host]]\nprogram = ["finalize", "prefault 0 1G"]\n[[vcpu]]'))
    proc = subprocess.Popen([PYTHON, "-m", "tdxdbg.cli", "run", "long.toml"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(600):
            if marker.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists() and proc.poll() is None
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (proc.returncode, err) == (130, "tdxdbg: interrupted\n")
    assert out == ""


def test_an_internal_error_is_one_line_and_exit_1(monkeypatch: pytest.MonkeyPatch) -> None:
    import tdxdbg.scenario.run as run_module

    def broken(*_args: object, **_kwargs: object) -> None:
        raise KeyError("tdr")

    monkeypatch.setattr(run_module, "run_scenario", broken)
    err = io.StringIO()
    assert main(["run", "first_private_fault"], io.StringIO(), err) == 1
    lines = err.getvalue().splitlines()
    assert len(lines) == 1
    line = broken.__code__.co_firstlineno + 1
    assert lines[0] == (f"tdxdbg: internal error: KeyError: 'tdr' at {__file__}:{line} (a bug: please report it "
                        "with the scenario)")
