"""The machine's int8 multiply-accumulate limit, read at run time: clock, the int8 dot-product
ISA (AMX, AVX-512 VNNI, AVX-VNNI) and how many such units a core has, from /proc/cpuinfo and
cpufreq. Every figure says where it came from; what cannot be told is "unknown" (None), never
a guess. The limit is what the report's GMAC/s is a fraction of.

MACs per cycle per core = units x MACs per instruction:
  - AVX-512 VNNI (VPDPBUSD zmm): 64 u8 x s8 MACs per instruction, one per 512-bit unit a cycle;
  - AVX-VNNI (ymm): 32; AMX (TDPBUSD): 1024 int8 MACs per cycle per core (Intel: "2048 int8
    operations per cycle per core", an operation being a multiply or an add).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

AMX_MACS = 1024  # per cycle per core, Sapphire Rapids and later (Intel AMX overview)
VNNI512_MACS = 64  # VPDPBUSD zmm: 16 int32 lanes x 4 u8*s8 products
VNNI256_MACS = 32  # VPDPBUSD ymm (AVX-VNNI, or AVX-512 VNNI on a 256-bit datapath)


def parse_cpuinfo(text: str) -> dict:
    """The first processor's fields of a /proc/cpuinfo text ("key: value" lines)."""
    out: dict = {}
    for line in text.splitlines():
        if not line.strip():
            if out:
                break  # one processor is enough: the fields we read are the same on all of them
            continue
        key, _, value = line.partition(":")
        out.setdefault(key.strip(), value.strip())
    out["flags"] = set(out.get("flags", "").split())
    return out


def isa(flags: set) -> str:
    """The widest int8 dot-product instruction set the flags show."""
    for flag, name in (("amx_int8", "amx_int8"), ("avx512_vnni", "avx512_vnni"), ("avx_vnni", "avx_vnni")):
        if flag in flags:
            return name
    return "none"


def _xeon_scalable(name: str) -> Optional[tuple[str, int, int]]:
    """(tier, generation, model number) of "Xeon(R) Gold 6248R"-style names: the second digit of
    the number is the generation (1 Skylake, 2 Cascade Lake, 3 Ice Lake/Cooper Lake, 4 Sapphire
    Rapids, 5 Emerald Rapids)."""
    m = re.search(r"Xeon\(R\)\s+(Platinum|Gold|Silver|Bronze)\s+(\d)(\d)(\d\d)", name)
    return (m.group(1), int(m.group(3)), int(m.group(2) + m.group(3) + m.group(4))) if m else None


def vnni_units(info: dict) -> tuple[Optional[int], int, str]:
    """(units per core, their width in bits, the rule that gave it); units None = unknown."""
    flags, name, vendor = info["flags"], info.get("model name", ""), info.get("vendor_id", "")
    family = int(info.get("cpu family", "0") or 0)
    if "avx512_vnni" in flags and vendor == "GenuineIntel":
        xs = _xeon_scalable(name)
        if xs:
            tier, gen, number = xs
            # Skylake/Cascade Lake: Platinum and Gold 6xxx have the second (port 5) FMA unit,
            # Gold 5xxx (but 5122/5222), Silver and Bronze do not; from Ice Lake-SP on, all have it
            two = gen >= 3 or tier == "Platinum" or (tier == "Gold" and (number // 1000 == 6
                                                                         or number in (5122, 5222)))
            return (2 if two else 1), 512, f"Xeon Scalable {tier} gen {gen}: {'2' if two else '1'} FMA units"
        if "amx_int8" in flags or "Xeon" in name:
            # AMX only ships on Xeons with both 512-bit units (Sapphire Rapids and later)
            return 2, 512, "Intel Xeon with AVX-512 VNNI" + (" and AMX" if "amx_int8" in flags else "") + \
                ": 2 FMA units (server cores)"
        return 1, 512, "Intel client core with AVX-512 VNNI: ports 0+1 fused into 1 512-bit unit"
    if "avx512_vnni" in flags and vendor == "AuthenticAMD" and family == 25:
        # Zen 4 runs 512-bit instructions on two 256-bit pipes (FP0/FP1 do the integer multiplies)
        return 2, 256, "AMD Zen 4 (family 25 with AVX-512): 2 x 256-bit pipes"
    if "avx_vnni" in flags and vendor == "GenuineIntel":
        return 2, 256, "Intel core with AVX-VNNI only: 2 x 256-bit units (ports 0 and 1)"
    return None, 0, f"unknown: no rule for {vendor or 'this vendor'} family {family} {name!r} with {isa(flags)}"


def clock_ghz(info: dict, sys_cpu: Path = Path("/sys/devices/system/cpu")) -> tuple[Optional[float], str]:
    """(GHz, where it came from): cpufreq's maximum (turbo) > the model name's nominal "@ 2.90GHz"
    > /proc/cpuinfo's "cpu MHz" (the current clock; under a hypervisor, the host's nominal one)."""
    try:
        khz = int((sys_cpu / "cpu0/cpufreq/cpuinfo_max_freq").read_text().split()[0])
        return khz / 1e6, "cpufreq cpuinfo_max_freq (maximum, turbo included)"
    except (OSError, ValueError, IndexError):
        pass
    m = re.search(r"@\s*([\d.]+)\s*GHz", info.get("model name", ""))
    if m:
        return float(m.group(1)), "model name (nominal base clock; turbo may be higher)"
    try:
        return float(info["cpu MHz"]) / 1e3, "/proc/cpuinfo cpu MHz (current clock; turbo may be higher)"
    except (KeyError, ValueError):
        return None, "unknown: no cpufreq, no clock in the model name, no cpu MHz"


def int8_macs_per_cycle(info: dict) -> tuple[Optional[int], str]:
    units, width, rule = vnni_units(info)
    if "amx_int8" in info["flags"]:
        return AMX_MACS, "AMX TMUL: 1024 int8 MAC/cycle/core (" + rule + ")"
    if units is None:
        return None, rule
    per = VNNI512_MACS if width == 512 else VNNI256_MACS
    return units * per, f"{rule} x {per} int8 MAC per VPDPBUSD"


def allowed_cores() -> int:
    """The CPUs this process may run on (its affinity mask), what a runtime's "all cores" uses."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def describe(cpuinfo: Optional[str] = None, cores: Optional[int] = None,
             sys_cpu: Path = Path("/sys/devices/system/cpu")) -> dict:
    """The machine's int8 limit and how it was read. cpuinfo: a /proc/cpuinfo text (default:
    this machine's); cores: the cores the runtime may use (default: this process's CPUs)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    info = parse_cpuinfo(cpuinfo)
    if cores is None:
        cores = allowed_cores()
    ghz, clock_source = clock_ghz(info, sys_cpu)
    macs, rule = int8_macs_per_cycle(info)
    limit = macs * ghz * cores if macs and ghz else None
    return {"cpu": info.get("model name") or "unknown", "vendor": info.get("vendor_id") or "unknown",
            "family": info.get("cpu family"), "model": info.get("model"), "int8_isa": isa(info["flags"]),
            "bf16": "avx512_bf16" in info["flags"] or "amx_bf16" in info["flags"],
            "clock_ghz": ghz, "clock_source": clock_source, "int8_macs_per_cycle_per_core": macs,
            "units_rule": rule, "cores": cores, "int8_limit_gmac_s": limit,
            "how": "flags, model name and clock from /proc/cpuinfo and cpufreq; units per core from the "
                   "family/model-name table in compress/hardware.py"}


def compute_rate(items_per_s: Optional[float], macs: Optional[int], hw: dict, threads: Optional[int]) -> dict:
    """GMAC/s of a throughput run and its fraction of the int8 limit of the cores it ran on
    (min(threads, cores)); None where a figure is unknown."""
    if not items_per_s or not macs:
        return {"gmac_per_s": None, "int8_limit_gmac_s": None, "int8_limit_fraction": None}
    gmacs = items_per_s * macs / 1e9
    cores = min(threads or hw["cores"], hw["cores"])
    per_core = hw["int8_limit_gmac_s"] / hw["cores"] if hw.get("int8_limit_gmac_s") else None
    limit = per_core * cores if per_core else None
    out = {"gmac_per_s": gmacs, "int8_limit_gmac_s": limit, "int8_limit_fraction": gmacs / limit if limit else None}
    if limit and gmacs > limit:
        # measured above the limit: the MACs per cycle are the ISA's, so the clock read was too
        # low (a VM shows the host's nominal clock, not its boost): say so and by how much
        ghz = gmacs / (hw["int8_macs_per_cycle_per_core"] * cores)
        out["int8_limit_note"] = (f"{gmacs:.0f} GMAC/s is above the {limit:.0f} GMAC/s limit at {hw['clock_ghz']:.2f} "
                                  f"GHz ({hw['clock_source']}): the cores ran at {ghz:.2f} GHz or more, so the "
                                  f"fraction overstates the share of the real limit")
    return out


def add_compute_rates(deployments: list[dict], stages: list[dict], hw: dict) -> None:
    """Each measured deployment's throughput in GMAC/s (the stage's float MACs per item) and
    its fraction of the machine's int8 limit (meaningful for int8 rows; recorded for all)."""
    macs = {s["name"]: s.get("macs") for s in stages}
    for d in deployments:
        thr = d.get("throughput")
        if d.get("status") == "ok" and thr:
            threads = (d.get("runtime") or {}).get("threads")
            thr.update(compute_rate(thr.get("items_per_s"), macs.get(d["stage"]), hw, threads))
