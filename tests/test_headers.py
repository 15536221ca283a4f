from __future__ import annotations

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
    sets = [(o.header.key, o.header.raw_value, o.append_action) for o in mutation.set_headers]
    assert sets == [("a", b"x", OVERWRITE), ("a", b"y", APPEND), ("d", b"new", APPEND)]
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
    headers["content-length"] = "5"
    mutation = headers.mutation()
    assert mutation is not None
    assert [o.header.key for o in mutation.set_headers] == ["content-length"]


def test_append_after_set_is_part_of_the_replacement() -> None:
    headers = Headers()
    headers["x"] = b"\x00raw"
    headers.append("x", "second")
    mutation = headers.mutation()
    assert mutation is not None
    assert [(o.header.raw_value, o.append_action) for o in mutation.set_headers] == [
        (b"\x00raw", OVERWRITE),
        (b"second", APPEND),
    ]
