"""The foreign functions Envoy registers for proxy_call_foreign_function, as far as this host has them.

Envoy 1.40 knows: compress, uncompress, clear_route_cache, declare_property, set_envoy_filter_state,
verify_signature, sign, expr_create, expr_evaluate, expr_delete. An unknown name is NOT_FOUND.
* compress / uncompress: zlib, exactly (uncompress of bad data is SERIALIZATION_FAILURE). The output of
  uncompress is bounded by the guest's memory: a larger result could never be handed over.
* clear_route_cache: OK, nothing to clear here.
* declare_property, set_envoy_filter_state: arguments that are not a protobuf message are BAD_ARGUMENT,
  as in Envoy; a valid message is accepted (OK) and has no effect here.
* verify_signature, sign: BAD_ARGUMENT for arguments that are not a message, else UNIMPLEMENTED.
* expr_create, expr_evaluate, expr_delete (CEL expressions): UNIMPLEMENTED.
"""

from __future__ import annotations

import zlib

from sidecar.wasm.host.abi import Status

__all__ = ["FOREIGN_FUNCTIONS", "call_foreign"]

FOREIGN_FUNCTIONS = (
    "compress",
    "uncompress",
    "clear_route_cache",
    "declare_property",
    "set_envoy_filter_state",
    "verify_signature",
    "sign",
    "expr_create",
    "expr_evaluate",
    "expr_delete",
)
_ACCEPTED = frozenset({"declare_property", "set_envoy_filter_state"})
_UNIMPLEMENTED = frozenset({"verify_signature", "sign", "expr_create", "expr_evaluate", "expr_delete"})
_NEEDS_MESSAGE = frozenset({"declare_property", "set_envoy_filter_state", "verify_signature", "sign"})


def call_foreign(name: str, args: bytes, output_limit: int) -> bytes | Status:
    if name == "compress":
        return zlib.compress(args)
    if name == "uncompress":
        return _uncompress(args, output_limit)
    if name == "clear_route_cache":
        return b""
    if name in _NEEDS_MESSAGE and not is_message(args):
        return Status.BAD_ARGUMENT
    if name in _ACCEPTED:
        return b""
    if name in _UNIMPLEMENTED:
        return Status.UNIMPLEMENTED
    return Status.NOT_FOUND


def _uncompress(data: bytes, limit: int) -> bytes | Status:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit)
    except zlib.error:
        return Status.SERIALIZATION_FAILURE
    if inflater.unconsumed_tail or not inflater.eof:
        # Truncated input, or more output than the guest could ever receive.
        return Status.SERIALIZATION_FAILURE
    return out


def is_message(data: bytes) -> bool:
    """Whether `data` parses as protobuf wire format (any message: field numbers are not checked)."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        if key is None or key >> 3 == 0:
            return False
        wire = key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
            if _ is None:
                return False
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            if length is None:
                return False
            pos += length
        elif wire == 5:
            pos += 4
        else:  # groups (3, 4) are not used by Envoy's messages; 6 and 7 do not exist
            return False
        if pos > end:
            return False
    return True


def _varint(data: bytes, pos: int) -> tuple[int | None, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return None, pos
