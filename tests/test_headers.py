from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2

from sidecar import Headers

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD


def envoy_map(*pairs: tuple[str, bytes]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in pairs])


def test_reads_raw_value_case_insensitively_and_multi_valued() -> None:
    headers = Headers.from_envoy(envoy_map(("accept", b"a"), ("accept", b"b"), ("x-bin", b"\xff\xfe")))
    assert headers["Accept"] == "a"
    assert headers.get_all("ACCEPT") == ["a", "b"]
    assert headers.raw("x-bin") == b"\xff\xfe"
    assert headers["x-bin"] == "\xff\xfe"  # latin-1: lossless for any byte
    assert list(headers) == ["accept", "x-bin"]
    assert len(headers) == 2
    assert "missing" not in headers
    assert headers.mutation() is None


def test_falls_back_to_value_field() -> None:
    header_map = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key="old", value="style")])
    assert Headers.from_envoy(header_map)["old"] == "style"


def test_set_append_remove_become_minimal_mutation() -> None:
    headers = Headers([("a", "1"), ("b", "2"), ("c", "3")])
    headers["A"] = "x"
    headers.append("a", "y")
    headers.append("d", "new")
    del headers["b"]
    headers.remove("never-there")
    mutation = headers.mutation()
    assert mutation is not None
    sets = [(o.header.key, o.header.raw_value, o.append_action, o.append.value) for o in mutation.set_headers]
    assert sets == [("a", b"x", OVERWRITE, False), ("a", b"y", APPEND, True), ("d", b"new", APPEND, True)]
    assert sorted(mutation.remove_headers) == ["b", "never-there"]
    assert headers.items_all() == [("c", "3"), ("a", "x"), ("a", "y"), ("d", "new")]


def test_flush_into_resets_tracking() -> None:
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    headers = Headers([("a", "1")])
    headers["a"] = "2"
    first = pb.HeaderMutation()
    headers.flush_into(first)
    assert [o.header.raw_value for o in first.set_headers] == [b"2"]
    assert not headers.changed and headers.mutation() is None
    headers["x-later"] = "5"
    mutation = headers.mutation()
    assert mutation is not None
    assert [o.header.key for o in mutation.set_headers] == ["x-later"]


def test_append_after_set_is_part_of_the_replacement() -> None:
    headers = Headers()
    headers["x"] = b"\xffraw"
    headers.append("x", "second")
    mutation = headers.mutation()
    assert mutation is not None
    # Envoy reads append_action only when it is not 0 (APPEND_IF_EXISTS_OR_ADD is 0), else the `append` flag.
    assert [(o.header.raw_value, o.append_action, o.append.value) for o in mutation.set_headers] == [
        (b"\xffraw", OVERWRITE, False),
        (b"second", APPEND, True),
    ]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("x-bad name", "v"),
        ("x-colon:", "v"),
        ("x-ümlaut", "v"),
        ("", "v"),
        (":", "v"),
        ("x-crlf", "a\r\nset-cookie: stolen=1"),
        ("x-lf", b"a\nb"),
        ("x-nul", "a\0b"),
        ("x-wide", "snowman \u2603"),
    ],
)
def test_a_change_envoy_would_refuse_fails_where_the_plugin_makes_it(name: str, value: str | bytes) -> None:
    headers = Headers()
    with pytest.raises(ValueError, match="header"):
        headers[name] = value
    with pytest.raises(ValueError, match="header"):
        headers.append(name, value)
    assert not headers.changed and len(headers) == 0


@pytest.mark.parametrize("value", [3, None, 1.5, ["a"]])
def test_a_header_value_of_another_type_is_a_type_error(value: object) -> None:
    with pytest.raises(TypeError, match="x-n"):
        Headers()["x-n"] = value  # type: ignore[assignment]


def test_tokens_pseudo_headers_and_any_byte_but_cr_lf_nul_are_accepted() -> None:
    headers = Headers()
    headers["X-Token!#$%&'*+-.^_`|~09"] = "v"
    headers[":path"] = "/rewritten?q=1"
    headers.append("x-bin", b"\xff\x01\tz")
    assert headers["x-token!#$%&'*+-.^_`|~09"] == "v"
    assert headers.raw("x-bin") == b"\xff\x01\tz"


@pytest.mark.parametrize("value", [" v", "v ", "\tv", "v\t", b" raw", "  ", "a b \t"])
def test_a_value_with_whitespace_at_either_end_is_refused(value: str | bytes) -> None:
    # Envoy strips it in front of a value ext_proc sets, HTTP/1 peers at the end: the peer would see another value.
    headers = Headers()
    with pytest.raises(ValueError, match="space or tab"):
        headers["x-v"] = value
    with pytest.raises(ValueError, match="space or tab"):
        headers.append("x-v", value)
    assert not headers.changed
    headers["x-v"] = "inner space\tand tab"  # inside a value both are fine
    headers["x-empty"] = ""


@pytest.mark.parametrize("name", ["Connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"])
def test_connection_fields_cannot_be_set(name: str) -> None:
    headers = Headers([("connection", "keep-alive"), ("transfer-encoding", "chunked")])
    with pytest.raises(ValueError, match="belongs to the connection"):
        headers[name] = "close"
    with pytest.raises(ValueError, match="belongs to the connection"):
        headers.append(name, "gzip")
    assert not headers.changed


def test_transfer_encoding_cannot_be_removed_but_connection_can() -> None:
    headers = Headers([("connection", "keep-alive"), ("transfer-encoding", "chunked")])
    with pytest.raises(ValueError, match="belongs to the connection"):
        headers.remove("Transfer-Encoding")
    with pytest.raises(ValueError, match="belongs to the connection"):
        del headers["transfer-encoding"]
    del headers["connection"]
    assert headers.items_all() == [("transfer-encoding", "chunked")]


def test_content_length_is_the_sidecars_but_may_be_removed() -> None:
    headers = Headers([("content-length", "11")])
    for wrong in ("3", "12", "011", "", "11, 11"):
        with pytest.raises(ValueError, match="content-length"):
            headers["content-length"] = wrong
    with pytest.raises(ValueError, match="one length"):
        headers.append("content-length", "11")
    assert not headers.changed
    headers["Content-Length"] = "11"  # what it already is: no disagreement
    headers.remove("content-length")  # Envoy then frames the body itself (chunked on HTTP/1)
    assert "content-length" not in headers
    with pytest.raises(ValueError, match="content-length"):
        headers["content-length"] = "11"  # none now: a length would be the plugin's guess


def test_a_name_checked_before_is_still_checked_for_what_follows_the_token_rule() -> None:
    """Names that passed the token check are remembered; the connection, content-length and value rules still
    apply to them on every set (the second time round as the first)."""
    headers = Headers([("content-length", "3")])
    for _ in range(2):
        headers["X-Mixed-Case"] = "v"
        with pytest.raises(ValueError, match="connection"):
            headers["Transfer-Encoding"] = "chunked"
        with pytest.raises(ValueError, match="content-length"):
            headers["Content-Length"] = "4"
        with pytest.raises(ValueError, match="CR, LF or NUL"):
            headers["X-Mixed-Case"] = "a\r\nb"
        with pytest.raises(TypeError):
            headers["X-Mixed-Case"] = 3  # type: ignore[assignment]
    assert headers.items_all() == [("content-length", "3"), ("x-mixed-case", "v")]


def test_remembered_names_are_bounded_and_names_past_the_bound_are_checked() -> None:
    from sidecar import headers as module

    headers = Headers()
    for i in range(module.MAX_CHECKED_NAMES + 50):
        headers[f"x-echo-{i}"] = "1"
    assert len(module._CHECKED_NAMES) <= module.MAX_CHECKED_NAMES
    with pytest.raises(ValueError, match="token"):
        headers["x bad"] = "1"
    assert "x-echo-4100" in headers


def test_a_str_subclass_name_is_checked_as_its_text_and_never_remembered() -> None:
    class Sly(str):
        def __eq__(self, other: object) -> bool:
            return True

        def __hash__(self) -> int:
            return hash("x-added")

    from sidecar import headers as module

    headers = Headers()
    headers[Sly("x-sly")] = "1"
    assert headers.raw("x-sly") == b"1"
    assert all(type(name) is str for name in module._CHECKED_NAMES)
    with pytest.raises(ValueError, match="token"):
        headers[Sly("bad name")] = "1"


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("a\rb", "CR, LF or NUL"),
        ("\n", "CR, LF or NUL"),
        ("ab\0", "CR, LF or NUL"),
        (b"\0ab", "CR, LF or NUL"),
        (" a\r", "CR, LF or NUL"),  # both wrong: the framing break is named
        ("\ta", "space or tab"),
        ("a\t", "space or tab"),
        (b"a ", "space or tab"),
        (" ", "space or tab"),
    ],
)
def test_one_scan_finds_every_refused_value_and_names_its_fault(value: str | bytes, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Headers()["x-v"] = value


def test_inner_tabs_spaces_and_empty_values_pass() -> None:
    headers = Headers()
    for value in ("a\tb", "a b", "", b"\x7f\xff"):
        headers["x-v"] = value
        assert headers.raw("x-v") == (value.encode("latin-1") if isinstance(value, str) else value)


def test_the_mutation_is_the_final_state_whatever_the_order_of_changes() -> None:
    """A name set last goes with its one value; set then appended, appended then removed, removed then set: each
    mutation, applied to what Envoy sent, gives the final headers."""
    import random

    rng = random.Random(17)
    names = ["x-a", "x-b", "accept"]
    for _ in range(300):
        start = [("accept", b"*/*"), ("x-a", b"0"), ("x-a", b"1")]
        headers = Headers(start)
        for _ in range(rng.randint(1, 6)):
            name, value = rng.choice(names), str(rng.randint(0, 9))
            if rng.random() < 0.5:
                headers[name] = value
            else:
                headers.append(name, value)
            if rng.random() < 0.2:
                headers.remove(rng.choice(names))
        mutation = headers.mutation()
        applied = Headers(start)
        if mutation is not None:
            for name in mutation.remove_headers:
                applied._discard(name)
            for option in mutation.set_headers:
                key, raw = option.header.key, option.header.raw_value
                if option.append.value:
                    applied._add(key, raw)
                else:
                    applied._put(key, raw)
        assert sorted(applied._items) == sorted(headers._items)


def test_long_names_are_checked_each_time_and_never_remembered() -> None:
    """A plugin echoing client-chosen names (Envoy allows names of about 60 KiB) must not pin them: only short
    names are remembered, so the cache stays about 1 MiB whatever the names."""
    from sidecar import headers as module

    headers = Headers()
    for i in range(50):
        headers[f"x-{i}-" + "a" * 60_000] = "1"
    assert all(len(name) <= module.MAX_CHECKED_NAME_LENGTH for name in module._CHECKED_NAMES)
    with pytest.raises(ValueError, match="token"):
        headers["x-" + "a" * 60_000 + " "] = "1"


def test_a_name_that_is_a_token_only_once_lower_cased_is_refused() -> None:
    with pytest.raises(ValueError, match="token"):
        Headers()["\u212a-a"] = "1"  # KELVIN SIGN lower-cases to "k"


def test_a_str_subclass_value_is_encoded_as_its_text() -> None:
    class Odd(str):
        def encode(self, *args: object, **kwargs: object) -> bytes:
            return bytearray(b"not-this")  # type: ignore[return-value]

    headers = Headers()
    headers["x-odd"] = Odd("text")
    assert headers.raw("x-odd") == b"text" and type(headers.raw("x-odd")) is bytes


def test_a_snapshot_restored_twice_is_the_same_state_both_times() -> None:
    headers = Headers([("x-a", "0")])
    headers.append("x-b", "1")
    before = headers.snapshot()
    headers.append("x-b", "2")
    headers.restore(before)
    headers.append("x-b", "3")  # must not reach `before`
    headers.restore(before)
    mutation = headers.mutation()
    assert mutation is not None
    assert [(o.header.key, o.header.raw_value) for o in mutation.set_headers] == [("x-b", b"1")]
    assert headers.get_all("x-b") == ["1"]
