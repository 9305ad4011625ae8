"""Hostile input: the fuzzing kit shared by the unit tests, the smuggling suite and the benchmark.

For every place input enters from outside, a hypothesis strategy that makes hostile input of it
(shaped like the real thing, then broken) and a *property*: a function that feeds one input to
the parser and raises AssertionError if anything but the parser's documented error escaped, or if
what it accepted is not safe to act on. The unit tests run each property over a few hundred
derandomized cases (``CI``); ``tests/perf/fuzz_inputs.py`` over 100,000 and more.

    target       entry point                              documented error      strategy
    wire         protocol.codec.decode(<each Struct>)     ProtocolError         wire_inputs
    envelope     protocol.signing.verify                  ProtocolError         envelopes
    control      the router's control-socket decoder      msgspec.DecodeError,  control_lines
                 and build_routing                        RouterConfigError
    manifest     protocol.manifest.parse_manifest         ProtocolError         manifest_texts
    bundle       protocol.bundle.safe_unpack              BundleError           bundles
    request      agent.router.http11.parse_request        HttpError             request_heads
    response     agent.router.http11.parse_response       HttpError (502)       response_heads
    chunked      agent.router.upstream.BodyReader         Broken                chunked_bodies

Wire messages are generated from the JSON Schema msgspec derives from each Struct (the one the
project publishes), so a new field is fuzzed the day it is added; then values are swapped for
hostile ones, keys dropped or added, and the bytes cut and flipped.

    kit.py       how a property runs (CI, within), hostile values, mutations, schema-shaped JSON
    messages.py  wire, envelope, control;  files.py  manifest, bundle;  http11.py  request,
                 response, chunked, and one_form_problem (what goes upstream reads one way)
"""

from __future__ import annotations

from tests.hostile.files import (
    SMALL,
    VALID_MANIFEST,
    bundles,
    check_bundle,
    check_manifest,
    manifest_texts,
    to_toml,
)
from tests.hostile.http11 import (
    check_chunk_line,
    check_chunked,
    check_request,
    check_response,
    chunked_bodies,
    one_form_problem,
    request_heads,
    response_heads,
    strict_chunks,
)
from tests.hostile.kit import CASE_SECONDS, CI, WIRE_STRUCTS, mutate, shaped, within
from tests.hostile.messages import (
    check_control,
    check_envelope,
    check_wire,
    control_lines,
    envelopes,
    wire_inputs,
)

__all__ = [
    "CASE_SECONDS",
    "CI",
    "SMALL",
    "VALID_MANIFEST",
    "WIRE_STRUCTS",
    "bundles",
    "check_bundle",
    "check_chunk_line",
    "check_chunked",
    "check_control",
    "check_envelope",
    "check_manifest",
    "check_request",
    "check_response",
    "check_wire",
    "chunked_bodies",
    "control_lines",
    "envelopes",
    "manifest_texts",
    "mutate",
    "one_form_problem",
    "request_heads",
    "response_heads",
    "shaped",
    "strict_chunks",
    "to_toml",
    "wire_inputs",
    "within",
]
