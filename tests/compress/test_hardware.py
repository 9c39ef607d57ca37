"""The int8 limit read from /proc/cpuinfo texts: two real ones (this project's 2-core AMD
EPYC VM and a 16-core Intel Xeon VM with AMX, both under KVM, captured 2026-11-26) and
hand-made ones for the table's other rules."""
from pathlib import Path

import pytest

from compress.hardware import add_compute_rates, clock_ghz, compute_rate, describe, parse_cpuinfo

DATA = Path(__file__).parent / "data" / "cpuinfo"
NO_SYS = Path("/nonexistent")  # no cpufreq: the clock comes from the text


def fake(name: str, flags: str, vendor="GenuineIntel", family=6, mhz="2000.000") -> str:
    return (f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: 106\n"
            f"model name\t: {name}\ncpu MHz\t\t: {mhz}\nflags\t\t: fpu sse avx2 {flags}\n\n"
            f"processor\t: 1\nmodel name\t: other\n")


def test_amd_zen4_vm_reads_vnni_on_two_256_bit_pipes_at_the_hosts_clock():
    hw = describe((DATA / "amd_epyc_zen4_kvm.txt").read_text(), cores=2, sys_cpu=NO_SYS)
    assert hw["vendor"] == "AuthenticAMD" and hw["int8_isa"] == "avx512_vnni" and hw["bf16"]
    assert hw["int8_macs_per_cycle_per_core"] == 64 and "Zen 4" in hw["units_rule"]
    assert hw["clock_ghz"] == pytest.approx(2.596126) and "cpu MHz" in hw["clock_source"]
    assert hw["int8_limit_gmac_s"] == pytest.approx(64 * 2.596126 * 2)


def test_intel_xeon_with_amx_uses_the_tile_unit():
    hw = describe((DATA / "intel_xeon_emerald_rapids_kvm.txt").read_text(), cores=16, sys_cpu=NO_SYS)
    assert hw["int8_isa"] == "amx_int8" and hw["int8_macs_per_cycle_per_core"] == 1024
    assert hw["int8_limit_gmac_s"] == pytest.approx(1024 * 2.1 * 16)


@pytest.mark.parametrize("name,flags,macs,ghz", [
    ("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", "avx512f avx512_vnni", 128, 2.9),  # Ice Lake-SP
    ("Intel(R) Xeon(R) Silver 4210 CPU @ 2.20GHz", "avx512f avx512_vnni", 64, 2.2),  # Cascade Lake, 1 unit
    ("Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz", "avx512f avx512_vnni", 128, 2.5),
    ("Intel(R) Xeon(R) Gold 5220 CPU @ 2.20GHz", "avx512f avx512_vnni", 64, 2.2),
    ("11th Gen Intel(R) Core(TM) i7-1165G7 @ 2.80GHz", "avx512f avx512_vnni", 64, 2.8),  # Tiger Lake
    ("12th Gen Intel(R) Core(TM) i7-12700K", "avx_vnni", 64, 2.0),  # Alder Lake P-core, clock from cpu MHz
])
def test_known_families_by_rule(name, flags, macs, ghz):
    hw = describe(fake(name, flags), cores=4, sys_cpu=NO_SYS)
    assert hw["int8_macs_per_cycle_per_core"] == macs and hw["clock_ghz"] == pytest.approx(ghz)
    assert hw["int8_limit_gmac_s"] == pytest.approx(macs * ghz * 4)


def test_no_rule_says_unknown_instead_of_guessing():
    hw = describe(fake("Intel(R) Core(TM) i7-4770 CPU @ 3.40GHz", ""), cores=4, sys_cpu=NO_SYS)
    assert hw["int8_isa"] == "none" and hw["int8_limit_gmac_s"] is None
    assert hw["units_rule"].startswith("unknown")
    zen5 = describe(fake("AMD EPYC 9755", "avx512f avx512_vnni", "AuthenticAMD", 26), cores=4, sys_cpu=NO_SYS)
    assert zen5["int8_macs_per_cycle_per_core"] is None and zen5["int8_limit_gmac_s"] is None
    empty = describe("", cores=1, sys_cpu=NO_SYS)
    assert empty["cpu"] == "unknown" and empty["clock_ghz"] is None and empty["clock_source"].startswith("unknown")


def test_cpufreq_maximum_wins_over_the_text(tmp_path):
    (tmp_path / "cpu0" / "cpufreq").mkdir(parents=True)
    (tmp_path / "cpu0" / "cpufreq" / "cpuinfo_max_freq").write_text("3700000\n")
    ghz, source = clock_ghz(parse_cpuinfo(fake("x @ 2.90GHz", "")), tmp_path)
    assert ghz == pytest.approx(3.7) and "turbo included" in source


def test_parse_reads_the_first_processor_only():
    info = parse_cpuinfo(fake("first", "avx512_vnni"))
    assert info["model name"] == "first" and "avx512_vnni" in info["flags"]


def test_compute_rates_in_report_rows():
    hw = {"cores": 2, "int8_limit_gmac_s": 400.0}
    r = compute_rate(1000.0, 165_511_850, hw, threads=1)
    # 1000 items/s x 0.1655 GMAC = 165.5 GMAC/s on one of two cores (limit 200)
    assert r["gmac_per_s"] == pytest.approx(165.51185) and r["int8_limit_gmac_s"] == 200.0
    assert r["int8_limit_fraction"] == pytest.approx(0.8275593)
    assert compute_rate(1000.0, 1, {"cores": 2, "int8_limit_gmac_s": None}, 2)["int8_limit_fraction"] is None
    assert "int8_limit_note" not in r
    deps = [{"stage": "teacher", "status": "ok", "throughput": {"items_per_s": 2000.0}, "runtime": {"threads": 2}},
            {"stage": "teacher", "status": "skipped", "throughput": None}]
    add_compute_rates(deps, [{"name": "teacher", "macs": 100_000_000}], hw)
    assert deps[0]["throughput"]["gmac_per_s"] == pytest.approx(200.0)
    assert deps[0]["throughput"]["int8_limit_fraction"] == pytest.approx(0.5)
    assert deps[1]["throughput"] is None


def test_a_rate_above_the_limit_says_the_clock_was_read_too_low():
    """Measured here: 425 GMAC/s on a Zen 4 VM whose cpuinfo shows 2.596 GHz (limit 332)."""
    hw = {"cores": 2, "int8_limit_gmac_s": 332.3, "int8_macs_per_cycle_per_core": 64, "clock_ghz": 2.596,
          "clock_source": "/proc/cpuinfo cpu MHz (current clock; turbo may be higher)"}
    r = compute_rate(2568.0, 165_511_850, hw, threads=2)
    assert r["int8_limit_fraction"] == pytest.approx(1.279, abs=1e-3)
    # 425.0 GMAC/s / (64 MAC x 2 cores) = 3.32 GHz at least
    assert "the cores ran at 3.32 GHz or more" in r["int8_limit_note"]


def test_report_environment_carries_the_limit_and_says_how():
    from compress.report import environment
    hw = environment()["hardware"]
    assert hw["how"] and hw["clock_source"] and hw["units_rule"]
    assert hw["int8_limit_gmac_s"] is None or hw["int8_limit_gmac_s"] > 0
    assert hw["cores"] >= 1 and hw["int8_isa"] in ("amx_int8", "avx512_vnni", "avx_vnni", "none")
