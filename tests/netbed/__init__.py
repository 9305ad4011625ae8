"""A network test bed: hosts in Linux network namespaces on one bridge, with partitions, delay
and loss (``bed``), a root-namespace portal into a host (``portal``), a fleetwave fleet laid out
on it (``fleet``) and the pure-Python NFQUEUE delay line it uses (``delayer``).

Needs root, iproute2 and iptables (``.ci/run`` installs what is missing). Use it through the
``netbed`` fixture of ``tests/chaos/conftest.py``, which tears every bed down whatever happens::

    async def test_x(netbed, tmp_path):
        bed = netbed(NetFleet.hosts(agents=3))
        async with NetFleet(bed, tmp_path, agents=3) as fleet:
            bed.partition("node-2", "bus")
"""

from tests.netbed.bed import Impairment, NetBed, NetBedError, sweep
from tests.netbed.fleet import NetFleet
from tests.netbed.portal import Portal

__all__ = ["Impairment", "NetBed", "NetBedError", "NetFleet", "Portal", "sweep"]
