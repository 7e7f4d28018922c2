"""The answer in the graph: Softmax and TopK appended to a served model's ONNX bytes.

The edit works on the serialized protobuf itself (a few wire-format fields read and
written here), so the agent needs neither the ``onnx`` package nor torch for it.
"""

from __future__ import annotations

#: Outputs appended to a served model (`with_answer_outputs`): the top class of the first
#: output (as logits, over its last axis) and that class's softmax probability.
ANSWER_OUTPUTS = ("fedge.answer.confidence", "fedge.answer.class")
_FLOAT_TYPES = {1, 10, 11}  # TensorProto float, float16, double


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64: two's complement, as protobuf encodes it
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes | str | int) -> bytes:
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _fields(data: memoryview) -> list[tuple[int, int | memoryview]]:
    """A protobuf message's (field number, value) pairs; ValueError if malformed."""
    out: list[tuple[int, int | memoryview]] = []
    i, end = 0, len(data)

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            if i >= end or shift > 63:
                raise ValueError("truncated varint")
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while i < end:
        key = varint()
        kind = key & 7
        if kind == 0:
            out.append((key >> 3, varint()))
        elif kind == 2:
            size = varint()
            if i + size > end:
                raise ValueError("truncated field")
            out.append((key >> 3, data[i : i + size]))
            i += size
        elif kind in (1, 5):
            i += 8 if kind == 1 else 4
        else:
            raise ValueError(f"unsupported wire type {kind}")
    return out


def with_answer_outputs(model: bytes) -> bytes | None:
    """`model` with `ANSWER_OUTPUTS` appended, or None when it cannot take them.

    Two nodes on the first output, Softmax and TopK (k=1) over the last axis: the top class
    and its probability come out of the session with the logits, computed in onnxruntime
    rather than in numpy per request. (The class is the top probability's: it differs from
    the top logit's only where two probabilities are equal in float32, and then the lower
    index wins; a third node to take it from the logits costs about 0.5 µs a run.)

    A serialized ModelProto followed by another one that holds only a graph parses as one
    model whose graph has both parts' nodes, initializers and outputs (protobuf merges
    repeated fields), so the original bytes stay as they are. Needs opset 13 or later
    (Softmax over one axis) and floating logits; anything else, or bytes this reader does
    not understand, gives None (the runtime then computes the answers itself).
    """
    try:
        top = _fields(memoryview(model))
        opset = 0
        for number, value in top:
            if number == 8 and isinstance(value, memoryview):  # opset_import
                entry = dict(_fields(value))
                domain, version = entry.get(1), entry.get(2)
                if isinstance(version, int) and bytes(domain or b"") in (b"", b"ai.onnx"):
                    opset = max(opset, version)
        outputs = [m for f, g in top if f == 7 and isinstance(g, memoryview)
                   for f2, m in _fields(g) if f2 == 12 and isinstance(m, memoryview)]  # fmt: skip
        if opset < 13 or not outputs:
            return None
        first = dict(_fields(outputs[0]))
        name, kind = first.get(1), first.get(2)
        tensor = dict(_fields(kind)).get(1) if isinstance(kind, memoryview) else None
        parts = dict(_fields(tensor)) if isinstance(tensor, memoryview) else {}
        elem, shape = parts.get(1), parts.get(2)
        if not isinstance(name, memoryview) or not isinstance(elem, int):
            return None
        if elem not in _FLOAT_TYPES:
            return None
        # the answers have the logits' rank (the last axis of size 1), dimensions unnamed
        rank = sum(1 for f, _ in _fields(shape) if f == 1) if isinstance(shape, memoryview) else 0
        logits = bytes(name).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    conf, cls = ANSWER_OUTPUTS
    probs, k = "fedge.answer.probs", "fedge.answer.k"

    def node(op: str, inputs: list[str], outs: list[str], axis: int) -> bytes:
        attribute = _field(1, "axis") + _field(20, 2) + _field(3, axis)  # type INT
        body = b"".join(_field(1, n) for n in inputs) + b"".join(_field(2, n) for n in outs)
        return _field(1, body + _field(3, outs[0]) + _field(4, op) + _field(5, attribute))

    def output(name: str, elem_type: int) -> bytes:
        dims = _field(2, b"".join(_field(1, b"") for _ in range(rank))) if rank else b""
        return _field(12, _field(1, name) + _field(2, _field(1, _field(1, elem_type) + dims)))

    graph = (
        node("Softmax", [logits], [probs], -1)
        + node("TopK", [probs, k], [conf, cls], -1)
        + _field(
            5, _field(1, 1) + _field(2, 7) + _field(8, k) + _field(9, (1).to_bytes(8, "little"))
        )
        + output(conf, elem)
        + output(cls, 7)
    )
    return model + _field(7, graph)
