"""What the agent does on its host: run slot processes, probe them, keep releases and its state.

    slots.py     SlotRunner: one slot's service process, supervised (start, probe, drain, stop,
                 adopt after a restart)
    probes.py    health probes (HTTP keep-alive, TCP, exec) and their cadence
    ports.py     slots' ports: a free one, claimed host-wide so two agents never pick the same
    releases.py  ReleaseCache: fetch once per digest, verify, unpack safely, keep the last few
    state.py     the state file's format and its atomic load and save
    hostinfo.py  the host's figures for heartbeats (psutil), and trimming the agent's heap
    identity.py  RunAs: what every child (service, hook, probe, router) inherits and runs as
    processes.py is a pid still ours (pid + create_time); orphans a killed agent left behind

These may import ``protocol``, ``agent.errors``, ``agent.cadence`` and each other; never the
manager, the daemon or the router's process modules (``agent.router.control`` imports
``identity`` to start routers as the service user).
"""
