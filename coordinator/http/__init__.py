"""The coordinator's HTTP surface (``fleetwave coordinator --http HOST:PORT``)."""
