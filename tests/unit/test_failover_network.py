"""Network mapping and IP rules (pure)."""

from __future__ import annotations

import pytest

from drsite.core.errors import InvalidInput
from drsite.core.model import DiskSpec, Nic, VmSpec
from drsite.failover.network import (
    FixedAddress,
    KeepAddress,
    NetworkMap,
    NetworkMapping,
    SubnetRule,
    parse_network,
)


def spec(*nics: Nic, name: str = "web1") -> VmSpec:
    return VmSpec(name, 2, 1024, tuple(nics), (DiskSpec("d0", 1 << 20),))


def test_subnet_rule_keeps_host_part() -> None:
    r = SubnetRule("10.0.0.0/24", "10.9.0.0/24")
    assert r.map("10.0.0.11", "vm") == "10.9.0.11"
    assert r.map("10.0.0.254", "vm") == "10.9.0.254"
    assert r.map(None, "vm") is None
    v6 = SubnetRule("fd00:1::/64", "fd00:9::/64")
    assert v6.map("fd00:1::abcd", "vm") == "fd00:9::abcd"


@pytest.mark.parametrize("cidr", ["10.0.0.1/24", "10.0.0.0/33", "not-a-net", "10.0.0.0/-1", ""])
def test_bad_cidrs_are_refused(cidr: str) -> None:
    with pytest.raises(InvalidInput):
        parse_network(cidr)
    with pytest.raises(InvalidInput):
        SubnetRule(cidr, "10.9.0.0/24")
    with pytest.raises(InvalidInput):
        SubnetRule("10.9.0.0/24", cidr)


def test_mismatched_prefix_lengths_and_families() -> None:
    with pytest.raises(InvalidInput, match="prefix lengths differ"):
        SubnetRule("10.0.0.0/24", "10.9.0.0/16")
    with pytest.raises(InvalidInput, match="mixes IPv4 and IPv6"):
        SubnetRule("10.0.0.0/24", "fd00::/120")
    # a larger target is fine when resizing is allowed
    assert SubnetRule("10.0.0.0/24", "10.9.0.0/16", allow_resize=True).map("10.0.0.7", "v") \
        == "10.9.0.7"


def test_host_part_overflow() -> None:
    r = SubnetRule("10.0.0.0/24", "10.9.0.0/26", allow_resize=True)
    assert r.map("10.0.0.11", "vm") == "10.9.0.11"
    with pytest.raises(InvalidInput, match="overflows"):
        r.map("10.0.0.200", "vm")
    with pytest.raises(InvalidInput, match="network or broadcast"):
        r.map("10.0.0.63", "vm")  # the /26's broadcast address


def test_address_outside_source_subnet() -> None:
    with pytest.raises(InvalidInput, match="not in subnet"):
        SubnetRule("10.0.0.0/24", "10.9.0.0/24").map("10.1.0.5", "vm")
    with pytest.raises(InvalidInput, match="invalid IP"):
        SubnetRule("10.0.0.0/24", "10.9.0.0/24").map("10.0.0.300", "vm")


def test_fixed_address_per_vm() -> None:
    r = FixedAddress({"web1": "192.168.5.10"})
    assert r.map("10.0.0.11", "web1") == "192.168.5.10"
    with pytest.raises(InvalidInput, match="no fixed address"):
        r.map("10.0.0.12", "web2")
    with pytest.raises(InvalidInput):
        FixedAddress({"web1": "999.1.1.1"})


def test_apply_recovery_and_test_networks() -> None:
    nm = NetworkMap((
        NetworkMapping("prod", "dr-prod", "dr-test", SubnetRule("10.0.0.0/24", "10.9.0.0/24")),
        NetworkMapping("mgmt", "dr-mgmt", None, KeepAddress()),
    ))
    s = spec(Nic("prod", "52:54:00:00:00:01", "10.0.0.11"), Nic("mgmt", "52:54:00:00:00:02", "172.16.0.4"))
    rec = nm.apply(s)
    assert rec.nics == (Nic("dr-prod", "52:54:00:00:00:01", "10.9.0.11"),
                        Nic("dr-mgmt", "52:54:00:00:00:02", "172.16.0.4"))
    assert rec.name == s.name and rec.disks == s.disks
    with pytest.raises(InvalidInput) as e:
        nm.apply(s, test=True)  # mgmt has no test network
    assert "mgmt" in e.value.hint
    only_prod = nm.apply(spec(Nic("prod", "52:54:00:00:00:01", "10.0.0.11")), test=True)
    assert only_prod.nics == (Nic("dr-test", "52:54:00:00:00:01", "10.9.0.11"),)


def test_unmapped_network_is_a_prerequisite_error_naming_it() -> None:
    nm = NetworkMap((NetworkMapping("prod", "dr-prod"),))
    with pytest.raises(InvalidInput) as e:
        nm.check(spec(Nic("backup-lan", "52:54:00:00:00:03", "10.5.0.1")))
    assert "backup-lan" in str(e.value) and "backup-lan" in e.value.hint
    with pytest.raises(InvalidInput, match="mapped twice"):
        NetworkMap((NetworkMapping("prod", "a"), NetworkMapping("prod", "b")))
