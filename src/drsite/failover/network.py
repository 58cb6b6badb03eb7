"""Network mapping and IP rules, applied to a VM's NICs at failover (pure: no I/O).

A :class:`NetworkMapping` maps one source network to a recovery network and, optionally, to an
isolated test network, with one IP rule for the NICs on it:

- :class:`KeepAddress` — the NIC keeps its address;
- :class:`SubnetRule` — the address moves from one subnet to another keeping its host part
  (``10.0.0.0/24 → 10.9.0.0/24``: ``10.0.0.11 → 10.9.0.11``);
- :class:`FixedAddress` — a fixed address per VM name.

A :class:`NetworkMap` holds the mappings of a site pair and turns a :class:`VmSpec` into the spec
of its recovery (or test) VM. An unmapped network is a prerequisite failure (``InvalidInput``
whose hint names the network), raised before anything is created.

Responsible for: validating mappings (CIDRs, families, prefix lengths, host-part overflow) and
computing NICs. Not responsible for: creating networks on a hypervisor, DHCP, DNS, or checking
that two VMs do not get the same fixed address.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from typing import Union

from drsite.core.errors import InvalidInput
from drsite.core.model import Nic, VmSpec

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]  # noqa: UP007
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]  # noqa: UP007


def parse_network(cidr: str) -> IPNetwork:
    """A strict CIDR (``10.0.0.0/24``; host bits set, like ``10.0.0.1/24``, are refused)."""
    try:
        return ipaddress.ip_network(cidr, strict=True)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"invalid subnet {cidr!r}: {exc}",
                           hint="Write the network address with its prefix length, e.g. "
                                "10.0.0.0/24.") from exc


def parse_address(ip: str) -> IPAddress:
    try:
        return ipaddress.ip_address(ip)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"invalid IP address {ip!r}") from exc


@dataclass(frozen=True)
class KeepAddress:
    """The NIC keeps its address (the recovery network uses the same addressing)."""

    def map(self, ip: str | None, vm_name: str) -> str | None:
        return ip


@dataclass(frozen=True)
class SubnetRule:
    """Move an address from ``source`` to ``target`` keeping its host part.

    Prefix lengths must be equal unless ``allow_resize``; then each address is checked on its
    own, and one whose host part does not fit the target (host-part overflow) is refused, as is
    an address that would become the target's network or broadcast address.
    """

    source: str
    target: str
    allow_resize: bool = False
    _src: IPNetwork = field(init=False, repr=False, compare=False)
    _dst: IPNetwork = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        src, dst = parse_network(self.source), parse_network(self.target)
        if src.version != dst.version:
            raise InvalidInput(f"subnet rule {self.source} → {self.target} mixes IPv{src.version} "
                               f"and IPv{dst.version}")
        if src.prefixlen != dst.prefixlen and not self.allow_resize:
            raise InvalidInput(f"subnet rule {self.source} → {self.target}: prefix lengths differ "
                               f"(/{src.prefixlen} vs /{dst.prefixlen})",
                               hint="Use subnets of the same size, or allow_resize=True to map "
                                    "host parts that fit.")
        object.__setattr__(self, "_src", src)
        object.__setattr__(self, "_dst", dst)

    def map(self, ip: str | None, vm_name: str) -> str | None:
        if ip is None:
            return None
        addr = parse_address(ip)
        if addr.version != self._src.version or addr not in self._src:
            raise InvalidInput(f"VM {vm_name}: address {ip} is not in subnet {self.source}",
                               hint="Fix the NIC's address or the mapping's source subnet.")
        host = int(addr) - int(self._src.network_address)
        capacity = self._dst.num_addresses
        if host >= capacity:
            raise InvalidInput(f"VM {vm_name}: host part {host} of {ip} overflows subnet "
                               f"{self.target} ({capacity} addresses)",
                               hint="Use a target subnet at least as large as the source.")
        new = ipaddress.ip_address(int(self._dst.network_address) + host)
        if self._dst.version == 4 and self._dst.prefixlen < 31 \
                and new in (self._dst.network_address, self._dst.broadcast_address):
            raise InvalidInput(f"VM {vm_name}: {ip} would map to {new}, the network or broadcast "
                               f"address of {self.target}")
        return str(new)


@dataclass(frozen=True)
class FixedAddress:
    """A fixed address per VM name (a VM without one is a prerequisite failure)."""

    addresses: dict[str, str]

    def __post_init__(self) -> None:
        for ip in self.addresses.values():
            parse_address(ip)

    def map(self, ip: str | None, vm_name: str) -> str | None:
        try:
            return str(parse_address(self.addresses[vm_name]))
        except KeyError:
            raise InvalidInput(f"VM {vm_name} has no fixed address in this network mapping",
                               hint=f"Add an address for {vm_name} to the mapping's fixed "
                                    "addresses.") from None


IpRule = KeepAddress | SubnetRule | FixedAddress


@dataclass(frozen=True)
class NetworkMapping:
    """``source`` network → ``recovery`` network (and → ``test`` network), with an IP rule."""

    source: str
    recovery: str
    test: str | None = None
    ip_rule: IpRule = field(default_factory=KeepAddress)

    def __post_init__(self) -> None:
        for n in (self.source, self.recovery, self.test):
            if n is not None and (not isinstance(n, str) or not n.strip()):
                raise InvalidInput(f"invalid network name {n!r}")


@dataclass(frozen=True)
class NetworkMap:
    """The network mappings of one source site → recovery site."""

    mappings: tuple[NetworkMapping, ...] = ()

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for m in self.mappings:
            if m.source in seen:
                raise InvalidInput(f"network {m.source!r} is mapped twice")
            seen.add(m.source)

    def mapping(self, network: str) -> NetworkMapping:
        for m in self.mappings:
            if m.source == network:
                return m
        raise InvalidInput(f"network {network!r} has no network mapping",
                           hint=f"Map network {network!r} to a recovery network (and a test "
                                "network) before failing over.")

    def check(self, spec: VmSpec, *, test: bool = False) -> None:
        """The prerequisite check: every NIC's network is mapped (to a test network when
        ``test``) and every address maps. Raises ``InvalidInput``; changes nothing."""
        self.apply(spec, test=test)

    def apply(self, spec: VmSpec, *, test: bool = False) -> VmSpec:
        """The spec of the recovery VM (``test``: of the test-failover VM): each NIC moves to
        the mapped network and gets the rule's address; MACs are kept."""
        nics: list[Nic] = []
        for nic in spec.nics:
            m = self.mapping(nic.network)
            if test:
                if m.test is None:
                    raise InvalidInput(f"network {nic.network!r} has no test network",
                                       hint=f"Map network {nic.network!r} to an isolated test "
                                            "network before a test failover.")
                network = m.test
            else:
                network = m.recovery
            nics.append(Nic(network, nic.mac, m.ip_rule.map(nic.ip, spec.name)))
        return replace(spec, nics=tuple(nics))
