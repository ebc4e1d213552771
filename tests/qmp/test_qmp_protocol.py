"""QMP framing, request decoding and the command table, without sockets; plus fuzzing."""
from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hv
from hv.qmp.commands import ArgSpec, CommandTable, QmpError, Reply
from hv.qmp.protocol import (
    FramingError,
    JsonStreamSplitter,
    ProtocolError,
    decode_request,
    encode_message,
    event_message,
    greeting,
    version_info,
)


def split_all(data: bytes, **kwargs: Any) -> list[bytes | FramingError]:
    return JsonStreamSplitter(**kwargs).feed(data)


# ------------------------------------------------------------------ framing
def test_newline_and_crlf_separated_messages() -> None:
    assert split_all(b'{"a": 1}\n{"b": 2}\r\n') == [b'{"a": 1}', b'{"b": 2}']


def test_concatenated_objects_without_separator() -> None:
    assert split_all(b'{"a":1}{"b":[1,{"c":"}"}]}[1]') == [b'{"a":1}', b'{"b":[1,{"c":"}"}]}', b"[1]"]


def test_message_split_across_every_byte_boundary() -> None:
    stream = b'{"execute": "x", "arguments": {"s": "a\\"}{b", "l": [1, [2]]}, "id": "q"}\r\n{"k": 1}'
    expected = [stream[: stream.index(b"\r\n")], b'{"k": 1}']
    splitter = JsonStreamSplitter()
    got: list[bytes | FramingError] = []
    for i in range(len(stream)):
        got += splitter.feed(stream[i : i + 1])
    assert got == expected
    assert splitter.pending() == 0


def test_top_level_scalar_and_garbage_end_at_newline_or_object() -> None:
    assert split_all(b'42\nhello world\n"str"{"a":1}') == [b"42", b"hello world", b'"str"', b'{"a":1}']


def test_mismatched_bracket_ends_the_message() -> None:
    assert split_all(b'{"a": [1}{"b":2}') == [b'{"a": [1}', b'{"b":2}']


def test_control_character_in_string_recovers_at_newline() -> None:
    out = split_all(b'{"execute": "que\ry"}\n{"execute": "ok"}\n')
    assert out == [FramingError("JSON parse error, control character in a string"), b'{"execute": "ok"}']
    out = split_all(b'{"execute": "unterminated\n{"execute": "ok"}\n')
    assert out == [FramingError("JSON parse error, control character in a string"), b'{"execute": "ok"}']


def test_oversized_message_discarded_up_to_newline() -> None:
    big = b'{"execute": "x", "arguments": {"s": "' + b"a" * 200 + b'"}}'
    out = split_all(big + b'{"still": "discarded"}\n{"next": 1}\n', max_message=100)
    assert out == [FramingError("QMP message exceeds the limit of 100 bytes"), b'{"next": 1}']
    # a message of exactly the limit passes
    exact = b'{"s": "' + b"b" * (100 - 9) + b'"}'
    assert len(exact) == 100
    assert split_all(exact, max_message=100) == [exact]


def test_oversized_garbage_is_bounded_too() -> None:
    out = split_all(b"x" * 500 + b"\n{}", max_message=100)
    assert out == [FramingError("QMP message exceeds the limit of 100 bytes"), b"{}"]


def test_nesting_limit() -> None:
    out = split_all(b"[" * 10 + b"]" * 10 + b"\n{}", max_nesting=5)
    assert out == [FramingError("JSON parse error, nesting deeper than 5"), b"{}"]
    assert split_all(b"[" * 5 + b"]" * 5, max_nesting=5) == [b"[" * 5 + b"]" * 5]


# ------------------------------------------------------------------ decoding
@pytest.mark.parametrize(
    ("raw", "desc"),
    [
        (b"[1]", "QMP input must be a JSON object"),
        (b"42", "QMP input must be a JSON object"),
        (b'"execute"', "QMP input must be a JSON object"),
        (b"{}", "QMP input lacks member 'execute'"),
        (b'{"execute": 1}', "QMP input member 'execute' must be a string"),
        (b'{"execute": "a", "arguments": []}', "QMP input member 'arguments' must be an object"),
        (b'{"execute": "a", "extra": 1}', "QMP input member 'extra' is unexpected"),
        (b'{"execute": "a", "execute": "b"}', "JSON parse error, duplicate key 'execute'"),
        (b'{"execute": NaN}', "JSON parse error, NaN is not valid JSON"),
        (b'{"execute" "a"}', "JSON parse error, Expecting ':' delimiter"),
        (b"hello", "JSON parse error, Expecting value"),
        (b'{"execute": "a", "id": 1e400}', "JSON parse error, number 1e400 out of range"),
        (b'{"execute": "a", "id": 18446744073709551616}',
         "JSON parse error, integer out of range (QMP integers are 64-bit)"),
        (b'{"execute": "a", "id": -9223372036854775809}',
         "JSON parse error, integer out of range (QMP integers are 64-bit)"),
        (b'{"execute": "\xff"}', "JSON parse error, invalid UTF-8 sequence at byte 13"),
    ],
)
def test_decode_errors(raw: bytes, desc: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_request(raw)
    assert info.value.desc == desc


def test_decode_error_keeps_the_id() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_request(b'{"id": {"x": [1]}, "arguments": 3, "execute": "a"}')
    assert info.value.has_id and info.value.request_id == {"x": [1]}


def test_integer_range_edges_accepted() -> None:
    raw = b'{"execute": "a", "arguments": {"lo": -9223372036854775808, "hi": 18446744073709551615, "f": 1e308}}'
    assert decode_request(raw).arguments == {"lo": -(2**63), "hi": 2**64 - 1, "f": 1e308}


def test_decode_request() -> None:
    request = decode_request('{"execute": "migrate", "arguments": {"uri": "tcp:h:1"}, "id": null}'.encode())
    assert request.command == "migrate"
    assert request.arguments == {"uri": "tcp:h:1"}
    assert request.has_id and request.request_id is None
    assert decode_request(b'{"execute": "x"}').arguments == {}
    assert decode_request('{"execute": "\u00e9"}'.encode()).command == "\u00e9"


def test_encoding_ends_with_crlf_and_is_ascii() -> None:
    data = encode_message({"return": "\u00e9\n"})
    assert data.endswith(b"\r\n") and data.count(b"\n") == 1
    assert json.loads(data) == {"return": "\u00e9\n"}


def test_greeting_and_version() -> None:
    major, minor, micro = (int(x) for x in hv.__version__.split(".")[:3])
    assert greeting() == {"QMP": {"version": {"qemu": {"major": major, "minor": minor, "micro": micro},
                                              "package": f"hv-{hv.__version__}"},
                                  "capabilities": []}}
    assert version_info()["package"] == f"hv-{hv.__version__}"


def test_event_timestamp() -> None:
    assert event_message("STOP", None, now=12.9999999) == {
        "event": "STOP", "timestamp": {"seconds": 13, "microseconds": 0}}
    assert event_message("X", {"a": 1}, now=5.25) == {
        "event": "X", "data": {"a": 1}, "timestamp": {"seconds": 5, "microseconds": 250000}}


# ------------------------------------------------------------- command table
def make_table() -> CommandTable:
    table = CommandTable()
    table.register("typed", lambda args: args, {
        "uri": ArgSpec("string"),
        "count": ArgSpec("int", required=False),
        "ratio": ArgSpec(("number", "null"), required=False),
        "flag": ArgSpec("bool", required=False),
        "anything": ArgSpec("any", required=False),
    }, "Echo typed arguments.")
    table.register("none", lambda args: None)

    def fail(_args: dict[str, Any]) -> Any:
        raise QmpError("DeviceNotFound", "Device 'x' not found")

    def boom(_args: dict[str, Any]) -> Any:
        raise RuntimeError("kaput")

    table.register("fail", fail)
    table.register("boom", boom)
    return table


@pytest.mark.parametrize(
    ("arguments", "desc"),
    [
        ({}, "Parameter 'uri' is missing"),
        ({"uri": 1}, "Parameter 'uri' expects string"),
        ({"uri": "u", "foo": 1}, "Invalid parameter 'foo'"),
        ({"uri": "u", "count": 1.5}, "Parameter 'count' expects integer"),
        ({"uri": "u", "count": True}, "Parameter 'count' expects integer"),
        ({"uri": "u", "ratio": "1"}, "Parameter 'ratio' expects number or null"),
        ({"uri": "u", "flag": 0}, "Parameter 'flag' expects boolean"),
    ],
)
def test_argument_errors_name_the_argument(arguments: dict[str, Any], desc: str) -> None:
    with pytest.raises(QmpError) as info:
        make_table().dispatch("typed", arguments)
    assert (info.value.error_class, info.value.desc) == ("GenericError", desc)


def test_arguments_accepted() -> None:
    table = make_table()
    args = {"uri": "u", "count": 3, "ratio": None, "flag": False, "anything": [1]}
    assert table.dispatch("typed", args).value == args
    assert table.dispatch("typed", {"uri": "u", "ratio": 2}).value == {"uri": "u", "ratio": 2}
    assert table.dispatch("none", {}).value == {}


def test_dispatch_errors() -> None:
    table = make_table()
    with pytest.raises(QmpError) as info:
        table.dispatch("nope", {})
    assert (info.value.error_class, info.value.desc) == ("CommandNotFound", "The command nope has not been found")
    with pytest.raises(QmpError) as info:
        table.dispatch("none", {"x": 1})
    assert info.value.desc == "Invalid parameter 'x'"
    with pytest.raises(QmpError) as info:
        table.dispatch("fail", {})
    assert info.value.error_class == "DeviceNotFound"
    with pytest.raises(QmpError) as info:
        table.dispatch("boom", {})
    assert (info.value.error_class, info.value.desc) == ("GenericError", "internal error in boom: kaput")


def test_builtins() -> None:
    table = make_table()
    assert table.dispatch("qmp_capabilities", {}).value == {}
    assert table.dispatch("qmp_capabilities", {"enable": []}).value == {}
    with pytest.raises(QmpError) as info:
        table.dispatch("qmp_capabilities", {"enable": ["oob"]})
    assert info.value.desc == "Capability 'oob' is not available"
    assert table.dispatch("query-version", {}).value == version_info()
    names = [entry["name"] for entry in table.dispatch("query-commands", {}).value]
    assert names == sorted(["qmp_capabilities", "query-version", "query-commands",
                            "typed", "none", "fail", "boom"])


def test_registration_rules() -> None:
    table = make_table()
    with pytest.raises(ValueError, match="already registered"):
        table.register("typed", lambda a: None)
    with pytest.raises(ValueError, match="unknown JSON type"):
        ArgSpec("str")
    with pytest.raises(ValueError, match="unknown QMP error class"):
        QmpError("Oops", "x")
    table.unregister("none")
    assert "none" not in table
    after_calls: list[int] = []
    table.register("later", lambda a: Reply({"v": 1}, after=lambda: after_calls.append(1)))
    reply = table.dispatch("later", {})
    assert reply.value == {"v": 1} and after_calls == []
    assert reply.after is not None


# -------------------------------------------------------------------- fuzzing
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
requests = st.fixed_dictionaries(
    {"execute": st.sampled_from(["typed", "none", "fail", "boom", "query-version", "nope"]) | st.text(max_size=10)},
    optional={"arguments": st.dictionaries(st.sampled_from(["uri", "count", "ratio", "flag", "x"]), json_values,
                                           max_size=4) | json_values,
              "id": json_values},
)


def process(table: CommandTable, splitter: JsonStreamSplitter, data: bytes) -> list[dict[str, Any]]:
    """What the server does with received bytes, minus the socket: every item gets a reply."""
    replies = []
    for item in splitter.feed(data):
        if isinstance(item, FramingError):
            replies.append({"error": {"class": "GenericError", "desc": item.desc}})
            continue
        try:
            request = decode_request(item)
            reply: dict[str, Any] = {"return": table.dispatch(request.command, request.arguments).value}
        except ProtocolError as exc:
            reply = {"error": {"class": "GenericError", "desc": exc.desc}}
        except QmpError as exc:
            reply = {"error": {"class": exc.error_class, "desc": exc.desc}}
        encode_message(reply)
        replies.append(reply)
    return replies


RECOVER = b'\n{"execute": "query-version", "id": "recover"}\n'


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_then_valid_command(data: bytes) -> None:
    table, splitter = make_table(), JsonStreamSplitter(max_message=256, max_nesting=8)
    process(table, splitter, data)
    # The stream may be inside an unfinished message, string or escape. A control
    # character inside a string is an error that discards to the newline; outside a
    # string the quote opens one, so the third control character ends it the same way.
    recovered = process(table, splitter, b'\x01\x01"\x01\n' + RECOVER)
    assert recovered[-1] == {"return": version_info()}


@settings(max_examples=300, deadline=None)
@given(requests)
def test_fuzz_random_requests(request: dict[str, Any]) -> None:
    table, splitter = make_table(), JsonStreamSplitter()
    replies = process(table, splitter, encode_message(request) + RECOVER)
    assert len(replies) == 2
    assert set(replies[0]) <= {"return", "error"} and len(replies[0]) == 1
    if "error" in replies[0]:
        assert replies[0]["error"]["class"] in {"GenericError", "CommandNotFound", "DeviceNotFound"}
    assert replies[1] == {"return": version_info()}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(json_values, max_size=3) | st.dictionaries(st.text(max_size=5), json_values, max_size=3),
                max_size=5),
       st.lists(st.integers(1, 40), min_size=1, max_size=5))
def test_fuzz_random_json_in_random_chunks(values: list[Any], cuts: list[int]) -> None:
    """Any JSON objects and arrays, concatenated and cut at arbitrary points, give one reply each."""
    stream = b"".join(json.dumps(v).encode() + b"\n" for v in values) + RECOVER
    table, splitter = make_table(), JsonStreamSplitter()
    replies: list[dict[str, Any]] = []
    pos = 0
    i = 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        replies += process(table, splitter, stream[pos : pos + step])
        pos += step
        i += 1
    assert len(replies) == len(values) + 1
    assert replies[-1] == {"return": version_info()}


def reference_split(data: bytes, max_message: int, max_nesting: int) -> list[bytes | FramingError]:
    """The framing rules written plainly, one byte at a time, to check the fast paths against."""
    out: list[bytes | FramingError] = []
    buf = bytearray()
    closers: list[int] = []
    junk = in_string = escape = discarding = False
    pairs = {ord("{"): ord("}"), ord("["): ord("]")}
    for byte in data:
        if discarding:
            discarding = byte != ord("\n")
            continue
        if not buf:
            if byte in b" \t\r\n":
                continue
            buf.append(byte)
            junk = byte not in pairs
            if not junk:
                closers.append(pairs[byte])
            continue
        if junk:
            if byte == ord("\n") or byte in pairs:
                out.append(bytes(buf))
                buf, junk = bytearray(), False
                if byte in pairs:
                    buf.append(byte)
                    closers.append(pairs[byte])
                continue
            buf.append(byte)
        else:
            buf.append(byte)
            if in_string:
                if escape:
                    escape = False
                elif byte == ord("\\"):
                    escape = True
                elif byte == ord('"'):
                    in_string = False
                elif byte < 0x20:
                    out.append(FramingError("JSON parse error, control character in a string"))
                    buf, closers, in_string = bytearray(), [], False
                    discarding = byte != ord("\n")
                    continue
            elif byte == ord('"'):
                in_string = True
            elif byte in pairs:
                closers.append(pairs[byte])
                if len(closers) > max_nesting:
                    out.append(FramingError(f"JSON parse error, nesting deeper than {max_nesting}"))
                    buf, closers, discarding = bytearray(), [], True
                    continue
            elif byte in b"}]":
                if byte == closers[-1]:
                    closers.pop()
                    if closers:
                        pass
                    else:
                        out.append(bytes(buf))
                        buf = bytearray()
                        continue
                else:
                    out.append(bytes(buf))
                    buf, closers = bytearray(), []
                    continue
        if len(buf) > max_message:
            out.append(FramingError(f"QMP message exceeds the limit of {max_message} bytes"))
            buf, closers, junk, in_string, escape = bytearray(), [], False, False, False
            discarding = byte != ord("\n")
    return out


framing_bytes = st.lists(
    st.sampled_from([b"{", b"}", b"[", b"]", b'"', b"\\", b"\n", b" ", b"\x01", b"a", b"bcdefgh", b"\xc3\xa9",
                     b'"execute"', b"\r\n"]), max_size=80).map(b"".join) | st.binary(max_size=200)


@settings(max_examples=500, deadline=None)
@given(framing_bytes, st.integers(1, 40), st.integers(4, 60), st.integers(1, 5))
def test_fast_paths_match_the_plain_rules(data: bytes, chunk: int, max_message: int, max_nesting: int) -> None:
    expected = reference_split(data, max_message, max_nesting)
    whole = JsonStreamSplitter(max_message=max_message, max_nesting=max_nesting).feed(data)
    assert whole == expected
    splitter = JsonStreamSplitter(max_message=max_message, max_nesting=max_nesting)
    pieces: list[bytes | FramingError] = []
    for pos in range(0, len(data), chunk):
        pieces += splitter.feed(data[pos : pos + chunk])
    assert pieces == expected
