"""The fleetwave agent: one per host; runs services in slots behind a router, make-before-break."""

__version__ = "0.1.0"
