"""Bad scenario input: one precise message per problem (file, key path, line, expected vs found), exit status 2,
never a traceback."""

from __future__ import annotations

import io
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdxdbg.cli import main
from tdxdbg.scenario.loader import loads
from tdxdbg.scenario.model import ScenarioError

BASE = """\
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

[[vcpu]]
program = ["accept 0x2000", "read 0x2000"]

[[host]]
program = ["punch_hole 0x1000 4K"]
"""


def errors_of(tmp_path: Path, text: str) -> tuple[int, list[str]]:
    p = tmp_path / "s.toml"
    p.write_text(text)
    out, err = io.StringIO(), io.StringIO()
    rc = main(["validate", str(p)], out, err)
    lines = [line.removeprefix("error: ").replace(str(p), "FILE") for line in err.getvalue().splitlines()]
    return rc, lines


def one(tmp_path: Path, text: str) -> str:
    rc, lines = errors_of(tmp_path, text)
    assert rc == 2
    assert len(lines) == 1, lines
    return lines[0]


def test_base_is_valid(tmp_path: Path) -> None:
    assert errors_of(tmp_path, BASE) == (0, [])


def test_unknown_key(tmp_path: Path) -> None:
    text = BASE.replace("gpaw = 48", "gpaw = 48\ncolour = 1")
    assert one(tmp_path, text) == ("FILE:4: td.colour: unknown key 'colour': expected one of gpaw, variant, "
                                   "sept_ve_disable, state")


def test_unknown_top_level_key(tmp_path: Path) -> None:
    assert one(tmp_path, 'nmae = "x"\n' + BASE).startswith("FILE:1: nmae: unknown key 'nmae': expected one of title")


def test_unknown_task_in_schedule_order(tmp_path: Path) -> None:
    text = BASE + '\n[schedule]\norder = ["vcpu0", "host0", "vcpu2"]\n'
    assert one(tmp_path, text) == ("FILE:24: schedule.order[2]: unknown task 'vcpu2': expected one of vcpu0, vcpu1, "
                                   "host0")


def test_unknown_status_in_inject(tmp_path: Path) -> None:
    text = BASE + '\n[[inject]]\nseamcall = "TDH.MEM.PAGE.AUG"\noccurrence = 1\nstatus = "TDX_BUZY"\n'
    assert one(tmp_path, text) == ("FILE:26: inject[0].status: unknown TDX status 'TDX_BUZY': expected a status name "
                                   "like TDX_OPERAND_BUSY (optionally |OPERAND) or an integer")


def test_unknown_status_in_expect(tmp_path: Path) -> None:
    text = BASE + ('\n[[expect]]\nseamcalls = { leaves = ["TDH.MEM.PAGE.AUG"], statuses = ["TDX_NOPE"] }\n')
    assert one(tmp_path, text) == ("FILE:24: expect[0].seamcalls.statuses[0]: unknown TDX status 'TDX_NOPE': expected "
                                   "a status name like TDX_OPERAND_BUSY (optionally |OPERAND) or an integer")


def test_wrong_type(tmp_path: Path) -> None:
    text = BASE.replace("guest_memfd = true", 'guest_memfd = "yes"')
    assert one(tmp_path, text) == "FILE:9: memslot[0].guest_memfd: expected a boolean, found the string 'yes'"


def test_wrong_type_gpaw(tmp_path: Path) -> None:
    assert one(tmp_path, BASE.replace("gpaw = 48", "gpaw = 47")) == \
        "FILE:3: td.gpaw: expected 48 or 52, found the integer 47"


def test_unknown_operation(tmp_path: Path) -> None:
    text = BASE.replace('"accept 0x2000", "read 0x2000"', '"accept 0x2000",\n  "jump 0x2000"')
    assert one(tmp_path, text) == ("FILE:19: vcpu[1].program[1]: unknown guest operation 'jump': expected one of "
                                   "read, write, fetch, accept, map_gpa, mmio_read, mmio_write")


def test_unknown_host_operation(tmp_path: Path) -> None:
    text = BASE.replace('"punch_hole 0x1000 4K"', '"punch 0x1000 4K"')
    assert one(tmp_path, text) == ("FILE:21: host[0].program[0]: unknown host operation 'punch': expected one of "
                                   "set_attributes, punch_hole, invalidate, delete_memslot, dirty_log, prefault, "
                                   "init_mem_region, interrupt, signal, finalize, destroy, seamcall")


def test_unknown_leaf(tmp_path: Path) -> None:
    text = BASE.replace('"punch_hole 0x1000 4K"', '"seamcall TDH.MEM.FOO 0x1000"')
    assert one(tmp_path, text) == ("FILE:21: host[0].program[0]: unknown SEAMCALL leaf 'TDH.MEM.FOO': expected a leaf "
                                   "the emulated TDX module implements, like TDH.MEM.SEPT.ADD or TDH.MEM.PAGE.AUG")


def test_raw_seamcall_takes_the_operands_its_leaf_declares(tmp_path: Path) -> None:
    """The operands of a `seamcall` op come from the leaf's declaration (LeafInfo): TDH.MEM.TRACK takes none
    (the VMM gives the TDR), TDH.MEM.PAGE.AUG a GPA and a LEVEL."""
    text = BASE.replace('"punch_hole 0x1000 4K"', '"seamcall TDH.MEM.TRACK 0x1000"')
    assert one(tmp_path, text) == ("FILE:21: host[0].program[0]: expected `seamcall TDH.MEM.TRACK`, found "
                                   "'seamcall TDH.MEM.TRACK 0x1000'")
    text = BASE.replace('"punch_hole 0x1000 4K"', '"seamcall TDH.MEM.PAGE.AUG 0x1000 0 7"')
    assert one(tmp_path, text) == ("FILE:21: host[0].program[0]: expected `seamcall TDH.MEM.PAGE.AUG [GPA [LEVEL]]`, "
                                   "found 'seamcall TDH.MEM.PAGE.AUG 0x1000 0 7'")
    text = BASE.replace('"punch_hole 0x1000 4K"', '"seamcall TDH.VP.ENTER"')
    assert one(tmp_path, text) == ("FILE:21: host[0].program[0]: TDH.VP.ENTER cannot be issued as a raw SEAMCALL: a "
                                   "vCPU's KVM_RUN enters the TD")


def test_unknown_leaf_in_inject(tmp_path: Path) -> None:
    text = BASE + '\n[[inject]]\nseamcall = "TDH.MEM.AUG"\noccurrence = 1\nstatus = "TDX_OPERAND_BUSY"\n'
    assert one(tmp_path, text) == ("FILE:24: inject[0].seamcall: unknown SEAMCALL leaf 'TDH.MEM.AUG': expected a leaf "
                                   "like TDH.MEM.PAGE.AUG")


def test_address_outside_every_memslot(tmp_path: Path) -> None:
    text = BASE.replace('"accept 0x2000", "read 0x2000"', '"accept 0x2000", "read 0x2000000"')
    assert one(tmp_path, text) == ("FILE:18: vcpu[1].program[1]: address outside every memslot: expected a range "
                                   "inside a memslot (0: [0x0, 0x1000000)), found [0x2000000, 0x2000008)")


def test_misaligned_gpa(tmp_path: Path) -> None:
    text = BASE.replace('"accept 0x1000"', '"write 0x1004 7"')
    assert one(tmp_path, text) == ("FILE:15: vcpu[0].program[0]: misaligned GPA: expected an 8-byte-aligned GPA, "
                                   "found 0x1004")


def test_misaligned_accept(tmp_path: Path) -> None:
    text = BASE.replace('"accept 0x1000"', '"accept 0x1000 2M"')
    assert one(tmp_path, text) == ("FILE:15: vcpu[0].program[0]: misaligned GPA: expected a 2M-aligned GPA and size, "
                                   "found 0x1000 size 0x200000")


def test_raw_seamcall_operands_are_not_checked(tmp_path: Path) -> None:
    text = BASE.replace('"punch_hole 0x1000 4K"', '"seamcall TDH.MEM.SEPT.ADD 0x800000001001 2"')
    assert errors_of(tmp_path, text) == (0, [])


def test_unparsable_size(tmp_path: Path) -> None:
    text = BASE.replace('size = "16M"', 'size = "16Q"')
    rc, lines = errors_of(tmp_path, text)
    assert rc == 2
    assert lines[0] == ('FILE:8: memslot[0].size: expected a size (an integer or a number with K, M or G, '
                        'like "2M"), found \'16Q\'')


def test_unparsable_size_in_program(tmp_path: Path) -> None:
    text = BASE.replace('"punch_hole 0x1000 4K"', '"punch_hole 0x1000 4KB"')
    assert one(tmp_path, text) == ('FILE:21: host[0].program[0]: expected a size (an integer or a number with K, M '
                                   'or G, like "2M"), found \'4KB\'')


def test_toml_syntax_error(tmp_path: Path) -> None:
    text = BASE.replace("[td]", "[td")
    assert one(tmp_path, text) == ("FILE:2: TOML syntax error: Expected ']' at the end of a table declaration "
                                   "at column 4")


def test_missing_file() -> None:
    out, err = io.StringIO(), io.StringIO()
    assert main(["validate", "/nonexistent/x.toml"], out, err) == 2
    assert err.getvalue().startswith("error: /nonexistent/x.toml: no such file: expected a readable scenario file "
                                     "or a shipped scenario name (accept_flow, ")


def test_a_directory_is_not_a_scenario(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert main(["run", str(tmp_path)], out, err) == 2
    assert err.getvalue() == f"error: {tmp_path}: expected a regular file, found a directory\n"


def test_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "b.toml"
    p.write_bytes(b'title = "\xff"\n')
    out, err = io.StringIO(), io.StringIO()
    assert main(["run", str(p)], out, err) == 2
    assert "expected UTF-8 text, found a byte 0xff" in err.getvalue()


def test_missing_td_and_memslot(tmp_path: Path) -> None:
    rc, lines = errors_of(tmp_path, 'title = "x"\n')
    assert rc == 2
    assert lines == ["FILE: missing table [td]: every scenario needs [td] (gpaw, variant, ...)",
                     "FILE: missing [[memslot]]: every scenario needs at least one memslot"]


def test_every_problem_is_reported(tmp_path: Path) -> None:
    text = BASE.replace("gpaw = 48", "gpaw = 47").replace('"punch_hole 0x1000 4K"', '"punch 1"') + \
        '\n[schedule]\norder = ["vcpu7"]\n'
    rc, lines = errors_of(tmp_path, text)
    assert rc == 2 and len(lines) == 3


def test_unknown_variant(tmp_path: Path) -> None:
    assert one(tmp_path, BASE.replace("gpaw = 48", 'gpaw = 48\nvariant = "v8"')).startswith(
        "FILE:4: td.variant: unknown variant 'v8': expected one of upstream, v6.16, v7")


def test_run_bad_input_exits_2(tmp_path: Path) -> None:
    p = tmp_path / "s.toml"
    p.write_text(BASE.replace("gpaw = 48", "gpaw = 47"))
    out, err = io.StringIO(), io.StringIO()
    assert main(["run", str(p)], out, err) == 2
    assert out.getvalue() == ""
    assert main(["run", "first_private_fault", "--schedule", "fifo"], io.StringIO(), io.StringIO()) == 2
    assert main(["run"], io.StringIO(), io.StringIO()) == 2


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_random_bytes_never_crash(data: bytes) -> None:
    try:
        loads(data.decode("utf-8", "replace"), "fuzz.toml")
    except ScenarioError as e:
        assert e.problems


KEYS = ["title", "td", "memslot", "vcpu", "host", "schedule", "inject", "expect", "attributes", "gpaw", "gpa",
        "size", "program", "order", "status", "seamcall", "occurrence", "id", "sept", "spte", "fault", "read",
        "level", "state", "leaves", "statuses", "variant", "private", "guest_memfd"]
VALUES = st.one_of(st.integers(-2, 2**65), st.booleans(), st.text(string.printable, max_size=20),
                   st.sampled_from(['"4K"', '"2M"', '"accept 0x1000"', '"read 0x1000 expect 1"', '"vcpu0"',
                                    '"TDX_OPERAND_BUSY"', '"TDH.MEM.PAGE.AUG"', '"seamcall TDH.MEM.TRACK"']))


def _value(v: object) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str) and v.startswith('"'):
        return v
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["", "[td]", "[[memslot]]", "[[vcpu]]", "[[host]]", "[schedule]",
                                           "[[inject]]", "[[expect]]", "[attributes]"]),
                          st.sampled_from(KEYS), st.one_of(VALUES, st.lists(VALUES, max_size=3))), max_size=12))
def test_fuzz_structured_toml_never_crash(items: list[tuple[str, str, object]]) -> None:
    lines = []
    for header, key, value in items:
        if header:
            lines.append(header)
        val = "[" + ", ".join(_value(v) for v in value) + "]" if isinstance(value, list) else _value(value)
        lines.append(f"{key} = {val}")
    text = "\n".join(lines)
    try:
        loads(text, "fuzz.toml")
    except ScenarioError as e:
        assert all(p.file == "fuzz.toml" for p in e.problems)


@pytest.mark.parametrize("text", ["[[memslot]]\ngpa = 0\nsize = 0\n[td]\n", "[td]\nstate = 3\n[[memslot]]\n",
                                  "[td]\n[[memslot]]\ngpa='x'\nsize=[1]\n", "memslot = 3\n[td]\n",
                                  "[td]\n[[memslot]]\ngpa=0\nsize='2M'\n[[expect]]\nspte = 1\n",
                                  "[td]\n[[memslot]]\ngpa=0\nsize='2M'\n[[expect]]\n",
                                  "[td]\n[[memslot]]\ngpa=0\nsize='2M'\n[schedule]\norder='x'\n"])
def test_odd_inputs_are_problems(text: str) -> None:
    with pytest.raises(ScenarioError):
        loads(text, "odd.toml")


@pytest.mark.parametrize("schedule", ["fifo", "round_robin:3", "random:x"])
def test_bad_schedule_is_one_message_in_cli_and_tui(schedule: str) -> None:
    """--schedule is checked once (scenario.run.schedule_of): the CLI prints it with exit 2, the TUI's opener
    reports the same text instead of a session."""
    from tdxdbg.ui.loading import open_scenario

    expected = (f"--schedule: expected round_robin, sequential, random or random:SEED (SEED below 2^64), "
                f"found {schedule!r}")
    err = io.StringIO()
    assert main(["run", "first_private_fault", "--schedule", schedule], io.StringIO(), err) == 2
    assert err.getvalue() == f"error: {expected}\n"
    opened = open_scenario("first_private_fault", schedule=schedule)
    assert opened.session is None and opened.error == expected


def test_good_schedule_override() -> None:
    from tdxdbg.runtime.scheduler import Policy
    from tdxdbg.scenario.loader import load, resolve
    from tdxdbg.scenario.run import schedule_of

    scenario = load(str(resolve("first_private_fault")))
    spec = schedule_of(scenario, "random:0x10")
    assert (spec.policy, spec.seed) == (Policy.RANDOM, 16)


# -- the command line's contract over the scenario grammar -----------------------------------------------------
# Numbers as users write them, good and bad: TOML integers (huge ones included), strings with units, doubled or
# trailing underscores, leading zeros, lengths past 64 bits and past Python's 4300-digit limit.
NUMBERS = st.one_of(
    st.sampled_from(["0", "0x0", "0x1000", "0x200000", "0x800000001000", "4096", "0x1_000", "1__0", "0x_1",
                     "010", "-1"]),
    st.sampled_from(["0x" + "f" * 17, "9" * 21, "9" * 4301, "0x" + "f" * 5000]),
    st.integers(0, 1 << 70).map(hex), st.integers(0, 1 << 40).map(str))
SIZES = st.one_of(NUMBERS.map(lambda n: '"' + n + '"'), NUMBERS.filter(lambda n: n.replace("_", "").isalnum()),
                  st.sampled_from(['"4K"', '"2M"', '"1G"', '"16M"', '"1__6M"', '"0x1_000"', '"4096G"',
                                            '"2m"', '"3X"', '""', '"0K"', '"99999999999999999999999K"']))
TEXT = st.text(alphabet=string.printable + "[]/é✓\u2028", max_size=30)


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r") \
        .replace("\t", "\\t").replace("\x0b", "\\u000b").replace("\x0c", "\\f").replace("\u2028", "\\u2028") + '"'


@st.composite
def _number(draw: st.DrawFn) -> str:
    """A number as a TOML integer when it can be one, else (or at random) as a string."""
    n = draw(NUMBERS)
    literal = n.lstrip("-").replace("_", "").isalnum() and not n.startswith("0x_")
    return n if literal and draw(st.booleans()) else _quoted(n)


GOOD_GUEST_OPS = ["accept 0x1000", "accept 0x200000 2M", "write 0x1000 0x7", "read 0x1000", "read 0x1000 expect 7",
                  "fetch 0x1000", "write 0x800000003000 1", "map_gpa 0x2000 4K shared"]
GOOD_HOST_OPS = ["punch_hole 0x1000 4K", "set_attributes 0x2000 4K shared", "invalidate 0 2M", "dirty_log 0 on",
                 "seamcall TDH.MEM.TRACK", "destroy", "delete_memslot 0", "set_attributes 0x2000 4K private"]


def _good_scenario(draw: st.DrawFn) -> str:
    """A scenario of valid pieces (so that some of the inputs load and run)."""
    lines = ["[td]", f"variant = {_quoted(draw(st.sampled_from(['upstream', 'v7', 'no-freeze'])))}",
             "[[memslot]]", "gpa = 0", 'size = "16M"', "guest_memfd = true",
             "[attributes]", 'private = [[0, "16M"]]']
    for _ in range(draw(st.integers(1, 2))):
        ops = draw(st.lists(st.sampled_from(GOOD_GUEST_OPS), max_size=3))
        lines += ["[[vcpu]]", f"program = [{', '.join(map(_quoted, ops))}]"]
    if draw(st.booleans()):
        ops = draw(st.lists(st.sampled_from(GOOD_HOST_OPS), max_size=2))
        lines += ["[[host]]", f"program = [{', '.join(map(_quoted, ops))}]"]
    lines += ["[schedule]", f"policy = {_quoted(draw(st.sampled_from(['round_robin', 'sequential', 'random'])))}",
              f"seed = {draw(st.integers(0, 1000))}"]
    return "\n".join(lines) + "\n"


@st.composite
def _ops(draw: st.DrawFn, guest: bool) -> str:
    names = ["read", "write", "fetch", "accept", "map_gpa"] if guest else [
        "set_attributes", "punch_hole", "invalidate", "delete_memslot", "dirty_log", "prefault", "finalize",
        "destroy", "seamcall TDH.MEM.TRACK", "seamcall TDH.MEM.SEPT.ADD"]
    words = [draw(st.sampled_from(names))]
    for _ in range(draw(st.integers(0, 3))):
        words.append(draw(st.one_of(NUMBERS, st.sampled_from(["4K", "2M", "private", "shared", "expect", "on"]))))
    return _quoted(" ".join(words))


@st.composite
def _scenario(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 3)) == 0:
        return _good_scenario(draw)
    lines = []
    if draw(st.booleans()):
        lines.append(f"title = {_quoted(draw(TEXT))}")
    lines.append("[td]")
    if draw(st.booleans()):
        lines.append(f"gpaw = {draw(st.sampled_from(['48', '52', '47', '0x' + 'f' * 40]))}")
    if draw(st.booleans()):
        lines.append(f"variant = {_quoted(draw(st.sampled_from(['upstream', 'v7', 'no-freeze', 'v8', 'x[b].py:C'])))}")
    for i in range(draw(st.integers(0, 2))):
        lines += ["[[memslot]]", f"id = {draw(st.sampled_from([str(i), str(i), str(i), '70000', '-1']))}",
                  f"gpa = {draw(_number())}", f"size = {draw(SIZES)}",
                  f"guest_memfd = {draw(st.sampled_from(['true', 'false', '1']))}"]
    if draw(st.booleans()):
        lines += ["[attributes]", f"private = [[{draw(_number())}, {draw(SIZES)}]]"]
    for _ in range(draw(st.integers(0, 2))):
        lines += ["[[vcpu]]", f"program = [{', '.join(draw(st.lists(_ops(True), max_size=3)))}]"]
    for _ in range(draw(st.integers(0, 1))):
        lines += ["[[host]]", f"program = [{', '.join(draw(st.lists(_ops(False), max_size=3)))}]"]
    if draw(st.booleans()):
        order = draw(st.sampled_from(["vcpu0*3", "host0", "vcpu0*" + "9" * 30]))
        lines += ["[schedule]", f"order = [{_quoted(order)}]",
                  f"seed = {draw(_number())}",
                  f"livelock_frames = {draw(st.sampled_from(['0', '100', '-5', '10000000']))}"]
    if draw(st.booleans()):
        lines += ["[[expect]]", draw(st.sampled_from([
            "no_violations = true", "vm_dead = 2", f"read = {{ task = \"vcpu0\", gpa = 0, value = {draw(NUMBERS)} }}",
            f"sept = {{ gpa = 0x1000, level = \"4K\", state = {_quoted(draw(TEXT))} }}"]))]
    return "\n".join(lines) + "\n"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_scenario())
def test_fuzz_every_scenario_validates_or_exits_2_with_one_line_per_problem(text: str) -> None:
    """`tdxdbg validate` on any scenario of the grammar: exit 0 and one `ok:` line, or exit 2 and exactly one
    `error:` line per problem the loader found; never an exception (main is called in-process: a traceback would
    fail the test)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "fuzz.toml"
        p.write_text(text, encoding="utf-8")
        out, err = io.StringIO(), io.StringIO()
        rc = main(["validate", str(p)], out, err)
        lines = err.getvalue().splitlines()
        if rc == 0:
            assert lines == [] and out.getvalue().startswith(f"ok: {p}: ")
            # It runs too: OK or FAILED (exit 0 or 1), never an exception.
            out = io.StringIO()
            rc = main(["run", str(p), "--max-frames", "3000"], out, io.StringIO())
            assert rc in (0, 1) and out.getvalue().splitlines()[-1] == ("OK" if rc == 0 else "FAILED")
            return
        assert rc == 2 and out.getvalue() == ""
        try:
            loads(text, str(p), base_dir=p.parent)
        except ScenarioError as e:
            problems = e.problems
        else:
            raise AssertionError("validate failed where the loader did not")
        assert lines == [f"error: {problem}" for problem in problems]
        assert all(len(line) < 1000 for line in lines), max(lines, key=len)


def test_dirty_log_on_a_guest_memfd_memslot(tmp_path: Path) -> None:
    """check_memory_region_flags: KVM_MEM_LOG_DIRTY_PAGES is not a valid flag next to KVM_MEM_GUEST_MEMFD."""
    text = BASE.replace("guest_memfd = true", "guest_memfd = true\ndirty_log = true")
    msg = one(tmp_path, text)
    assert msg.startswith("FILE:10: memslot[0].dirty_log: expected dirty_log = false on a guest_memfd memslot")
