"""Variants (tdxdbg/engine/vm.py): the override points a variant may define, the check that refuses a method the
engine never calls, loading from a file (and again, as the debugger's `r` does), and the documented example
variant (docs/examples/track_without_kick.py) changing what the TDX module sees."""

from __future__ import annotations

from pathlib import Path

import pytest

from tdxdbg.engine.variants.upstream import Upstream
from tdxdbg.engine.vm import VariantError, check_override_points, load_variant, override_points, variant_names
from tdxdbg.scenario.loader import load
from tdxdbg.scenario.model import ScenarioError
from tdxdbg.scenario.run import run_scenario

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def write_variant(tmp_path: Path, body: str, name: str = "patch.py") -> Path:
    path = tmp_path / name
    path.write_text("from tdxdbg.engine.variants.upstream import Upstream\n\n\nclass Patch(Upstream):\n" + body)
    return path


def test_override_points_are_the_engine_methods() -> None:
    points = override_points()
    # the kernel functions patches change, the model's split steps, and the formerly mangled __tdx_map_gpa
    assert {"tdx_track", "set_external_spte_present_freeze", "set_external_spte_present_hook",
            "set_external_spte_present_publish", "_tdx_map_gpa", "handle_removed_pt", "root_alloc_write_locked",
            "ret_pf_values"} <= points
    assert not any(p.startswith("__") for p in points)
    assert not any("__" in p for p in points), "a name-mangled engine method cannot be overridden"


@pytest.mark.parametrize("name", variant_names())
def test_shipped_variants_define_only_override_points_or_their_own_helpers(name: str) -> None:
    check_override_points(load_variant(name))


def test_a_typo_is_reported_with_file_line_and_the_close_override_point(tmp_path: Path) -> None:
    path = write_variant(tmp_path, "    def tdx_trak(self):\n        yield from ()\n")
    with pytest.raises(VariantError) as e:
        load_variant(f"{path}:Patch")
    assert str(e.value).startswith(f"{path}:5: Patch.tdx_trak is not an override point: the engine never calls "
                                   "it and the variant does not use it (did you mean tdx_track?)")


def test_a_name_mangled_method_is_reported_naming_the_unmangled_spelling(tmp_path: Path) -> None:
    path = write_variant(tmp_path, "    def __tdx_map_gpa(self, vcpu):\n        yield from ()\n")
    with pytest.raises(VariantError) as e:
        load_variant(f"{path}:Patch")
    assert (f"{path}:5: Patch.__tdx_map_gpa is not an override point: the engine never calls it and the variant "
            "does not use it (__tdx_map_gpa is name-mangled by Python to _Patch__tdx_map_gpa; the engine spells "
            "the kernel's __tdx_map_gpa with one underscore: _tdx_map_gpa)") in str(e.value)


def test_a_helper_the_variant_calls_itself_is_fine(tmp_path: Path) -> None:
    path = write_variant(tmp_path, "    def tdx_track(self):\n        yield from self.my_track()\n\n"
                                   "    def my_track(self):\n        yield from super().tdx_track()\n")
    assert load_variant(f"{path}:Patch").__name__ == "Patch"


def test_a_class_made_in_code_is_checked_too() -> None:
    class Typo(Upstream):
        def set_external_spte_presnt(self, *args):
            yield from ()

    with pytest.raises(VariantError, match=r"Typo.set_external_spte_presnt is not an override point.*did you "
                                           r"mean set_external_spte_present\?"):
        check_override_points(Typo)


def test_the_scenario_loader_reports_a_bad_variant_as_a_problem(tmp_path: Path) -> None:
    write_variant(tmp_path, "    def tdx_trak(self):\n        yield from ()\n")
    scenario = tmp_path / "s.toml"
    scenario.write_text('[td]\nvariant = "patch.py:Patch"\n\n[[memslot]]\nid = 0\ngpa = 0\nsize = "4K"\n\n'
                        '[[vcpu]]\nprogram = ["read 0x0"]\n')
    with pytest.raises(ScenarioError) as e:
        load(scenario)
    assert str(e.value).startswith(f"{scenario}:2: td.variant: {tmp_path / 'patch.py'}:5: Patch.tdx_trak is not an "
                                   "override point")


def test_loading_again_reads_the_file_again(tmp_path: Path) -> None:
    """The debugger's `r` reloads the scenario, which loads its variant file again: an edit is picked up."""
    path = write_variant(tmp_path, '    name = "first"\n')
    assert load_variant(f"{path}:Patch").name == "first"
    write_variant(tmp_path, '    name = "second"\n')
    assert load_variant(f"{path}:Patch").name == "second"


# -- the example of docs/variants.md -------------------------------------------------------------------------------
def test_example_variant_is_short_and_loads_relative_to_its_scenario() -> None:
    source = (EXAMPLES / "track_without_kick.py").read_text().splitlines()
    body = source[source.index("class TrackWithoutKick(Upstream):"):]
    assert len(body) <= 15
    scenario = load(EXAMPLES / "track_without_kick.toml")
    assert scenario.td.variant == "track_without_kick.py:TrackWithoutKick"


def test_example_variant_without_the_kick_leaves_the_vcpu_in_the_old_epoch() -> None:
    """tdx_track (tdx.c): TDH.MEM.TRACK then kvm_make_all_cpus_request(KVM_REQ_OUTSIDE_GUEST_MODE). Without the
    kick the vCPU that entered in the blocked epoch is still in the guest, so TDH.MEM.PAGE.REMOVE fails with
    TDX_TLB_TRACKING_NOT_DONE (is_tlb_tracked) and KVM_BUG_ON kills the VM; upstream removes the page."""
    patched = run_scenario(load(EXAMPLES / "track_without_kick.toml"))
    upstream = run_scenario(load(EXAMPLES / "track_without_kick.toml", variant="upstream"))
    zap = ["TDH.MEM.RANGE.BLOCK", "TDH.MEM.TRACK", "TDH.MEM.PAGE.REMOVE"]
    assert [(s.leaf, f"{s.status:#x}") for s in patched.facts.seamcalls if s.leaf in zap] == [
        ("TDH.MEM.RANGE.BLOCK", "0x0"), ("TDH.MEM.TRACK", "0x0"), ("TDH.MEM.PAGE.REMOVE", "0xc0000b0800000001")]
    assert [(s.leaf, s.status) for s in upstream.facts.seamcalls if s.leaf in zap] == [
        ("TDH.MEM.RANGE.BLOCK", 0), ("TDH.MEM.TRACK", 0), ("TDH.MEM.PAGE.REMOVE", 0)]
    assert patched.ok and patched.facts.vm_dead
    assert not upstream.facts.vm_dead and not upstream.facts.violations
