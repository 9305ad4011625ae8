"""A fleet's trust root: ``fleetwave auth`` (CA and server certificate, nkey users with their
permissions in a nats-server include file, credentials files). See ``coordinator.auth.enroll``."""
