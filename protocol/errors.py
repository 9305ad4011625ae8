"""The protocol package's one error.

    ProtocolError          anything that cannot be decoded, parsed or verified: a malformed
                           message, a manifest with an unknown key, a bad duration, a bad signature.

The message says what is wrong and where (a field path or a file name), in one line, so that the
CLI can print it as is and an agent can put it in an event.
"""


class ProtocolError(ValueError):
    """A payload, a manifest or a signature that fleetwave refuses; the message says why."""
