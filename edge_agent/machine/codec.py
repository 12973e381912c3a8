"""Engineering value <-> the machine's own number <-> 16-bit register words. Pure: no I/O.

A value is packed big-endian with ``struct``, cut into 16-bit words, then rearranged for the device:
``word_order`` little reverses the words of a multi-register value, ``byte_order`` little swaps the two
bytes inside each word. Decoding runs the same steps backwards. Strings keep their words in address
order (only ``byte_order`` applies): that is how every PLC we know lays out character arrays.

Engineering value = raw * scale + offset. Integer types round to the nearest raw value (half away
from zero) and refuse what the type cannot hold; floats refuse NaN and infinities. Every refusal is
a ``ValueError`` whose message starts with the point's name.

``hold()`` answers what the machine will hold for a value: the raw number after scale, offset and
rounding (a float32 rounded to float32), and that number decoded back to engineering units. Decoding
gives the shortest decimal that encodes to the same raw number, so encode(decode(raw)) == raw.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum
from typing import Any, Literal

Order = Literal["big", "little"]
Encoding = Literal["ascii", "utf-8"]
Value = int | float | bool | str


class PointType(StrEnum):
    U16 = "u16"
    I16 = "i16"
    U32 = "u32"
    I32 = "i32"
    F32 = "f32"
    F64 = "f64"
    BOOL = "bool"
    STRING = "string"


#: Raw range of each integer type; engineering limits must map inside it.
INT_RANGES: dict[PointType, tuple[int, int]] = {
    PointType.U16: (0, 0xFFFF),
    PointType.I16: (-0x8000, 0x7FFF),
    PointType.U32: (0, 0xFFFF_FFFF),
    PointType.I32: (-0x8000_0000, 0x7FFF_FFFF),
}


@dataclass(frozen=True)
class _Kind:
    registers: int  # width in 16-bit registers; strings: computed from the length
    code: str  # struct format character, packed big-endian


#: One entry per type. bool in a register is the word 0 or 1.
KINDS: dict[PointType, _Kind] = {
    PointType.U16: _Kind(1, "H"),
    PointType.I16: _Kind(1, "h"),
    PointType.U32: _Kind(2, "I"),
    PointType.I32: _Kind(2, "i"),
    PointType.F32: _Kind(2, "f"),
    PointType.F64: _Kind(4, "d"),
    PointType.BOOL: _Kind(1, "H"),
    PointType.STRING: _Kind(0, "s"),
}

#: Largest finite magnitudes of float32 and float64.
_FLOAT_MAX: dict[PointType, float] = {
    PointType.F32: 3.4028234663852886e38,
    PointType.F64: 1.7976931348623157e308,
}


@dataclass(frozen=True)
class Format:
    """How one point's value lies in registers."""

    type: PointType
    byte_order: Order = "big"
    word_order: Order = "big"
    scale: float = 1.0
    offset: float = 0.0
    length: int | None = None  # string points: capacity in bytes (= characters for ASCII)
    encoding: Encoding = "ascii"

    @property
    def registers(self) -> int:
        """How many 16-bit registers the value occupies."""
        if self.type is PointType.STRING:
            return ((self.length or 0) + 1) // 2
        return KINDS[self.type].registers

    def representable(self) -> tuple[float, float]:
        """The engineering range the type can hold with this scale and offset."""
        lo: float
        hi: float
        if self.type in INT_RANGES:
            lo, hi = INT_RANGES[self.type]
        else:
            hi = _FLOAT_MAX[self.type]
            lo = -hi
        a, b = lo * self.scale + self.offset, hi * self.scale + self.offset
        return (a, b) if a <= b else (b, a)


def encode(fmt: Format, value: Any, name: str) -> list[int]:
    """The register words for ``value``. Raises ValueError naming the point."""
    if fmt.type is PointType.STRING:
        return _encode_string(fmt, value, name)
    if fmt.type is PointType.BOOL:
        raw: int | float = int(encode_bit(value, name))
    else:
        raw = to_raw(fmt, value, name)
    data = struct.pack(">" + KINDS[fmt.type].code, raw)
    return _arrange(fmt, data)


def decode(fmt: Format, words: Sequence[int], name: str) -> Value:
    """The engineering value in ``words`` (exactly ``fmt.registers`` of them)."""
    if len(words) != fmt.registers:
        raise ValueError(f"{name}: expected {fmt.registers} register(s), got {len(words)}")
    data = _unarrange(fmt, words, name)
    if fmt.type is PointType.BOOL:
        word = int.from_bytes(data, "big")
        if word not in (0, 1):
            raise ValueError(f"{name}: register value {word} is not a bool (0 or 1)")
        return bool(word)
    if fmt.type is PointType.STRING:
        text = data.rstrip(b"\x00")
        try:
            return text.decode(fmt.encoding)
        except UnicodeDecodeError as err:
            raise ValueError(f"{name}: bytes {text!r} are not valid {fmt.encoding}") from err
    (raw,) = struct.unpack(">" + KINDS[fmt.type].code, data)
    return to_engineering(fmt, raw)


def hold(fmt: Format, value: Any, name: str) -> tuple[int | float, int | float]:
    """(raw, held) for a number: the raw number the machine stores after scale, offset and rounding
    (float32 rounded as the machine stores it), and the engineering value it stands for. Raises
    ValueError naming the point when the value is not a number or does not fit the type."""
    raw = to_raw(fmt, value, name)
    if fmt.type is PointType.F32:
        (raw,) = struct.unpack(">f", struct.pack(">f", raw))
    return raw, to_engineering(fmt, raw)


def encode_bit(value: Any, name: str) -> bool:
    """A coil's or bool register's value: True/False, or the integers 1/0."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name}: {value!r} is not a bool (true/false or 1/0)")


def _number(value: Any, name: str, type_: PointType) -> float | int:
    # bool is an int in Python, but "true" as a spindle speed is a mistake, not a number.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: {value!r} is not a number ({type_.value} expected)")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name}: {value} is not a finite number")
    return value


def to_raw(fmt: Format, value: Any, name: str) -> int | float:
    """The raw number for an engineering value (integers rounded half away from zero)."""
    number = _number(value, name, fmt.type)
    if fmt.type in INT_RANGES:
        if type(number) is int and fmt.scale == 1.0 and fmt.offset == 0.0:
            raw = number  # the common case, exact without Decimal
        else:
            # Decimal arithmetic on the numbers as written: 12.35 / 0.1 is 123.5 (in binary floats
            # 123.4999...), which rounds half away from zero to 124 as a person expects.
            exact = (_dec(number) - _dec_of(fmt.offset)) / _dec_of(fmt.scale)
            raw = int(exact.to_integral_value(rounding=ROUND_HALF_UP))
        lo, hi = INT_RANGES[fmt.type]
        if not lo <= raw <= hi:
            raise ValueError(f"{name}: {value} does not fit {_describe(fmt)}")
        return raw
    real = float(number)
    if fmt.scale != 1.0 or fmt.offset != 0.0:
        real = (real - fmt.offset) / fmt.scale
    if not math.isfinite(real) or abs(real) > _FLOAT_MAX[fmt.type]:
        raise ValueError(f"{name}: {value} does not fit {_describe(fmt)}")
    return real


_to_raw = to_raw  # the name the OPC UA client was written against


def _describe(fmt: Format) -> str:
    lo, hi = fmt.representable()
    scaling = ""
    if fmt.scale != 1.0 or fmt.offset != 0.0:
        scaling = f" with scale {_num(fmt.scale)} and offset {_num(fmt.offset)}"
    return f"{fmt.type.value}{scaling} (representable range {_num(lo)}..{_num(hi)})"


def _num(x: float) -> str:
    if float(x).is_integer() and abs(x) < 1e16:
        return str(int(x))
    return f"{x:.10g}"


def _dec(x: float | int) -> Decimal:
    return Decimal(x) if isinstance(x, int) else Decimal(repr(x))


_dec_of = functools.lru_cache(maxsize=256, typed=True)(
    _dec
)  # a point's scale and offset: a few per profile


@functools.lru_cache(maxsize=256, typed=True)
def _decimals(x: float) -> int:
    exponent = Decimal(repr(x)).as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


def to_engineering(fmt: Format, raw: int | float) -> int | float:
    """The engineering value a raw number stands for, as the shortest decimal that is that raw."""
    if fmt.type in INT_RANGES:
        if fmt.scale == 1.0 and fmt.offset == 0.0:
            return int(raw)
        value = raw * fmt.scale + fmt.offset
        if float(fmt.scale).is_integer() and float(fmt.offset).is_integer():
            return int(value)
        # 1234 * 0.1 is 123.4000000001 in binary; the scale says one decimal is meant.
        return round(value, max(_decimals(fmt.scale), _decimals(fmt.offset)))
    if fmt.type is PointType.F32:
        raw = _shortest_f32(float(raw))
    if fmt.scale == 1.0 and fmt.offset == 0.0:
        return float(raw)
    return _shortest_scaled(fmt, float(raw))


_to_engineering = to_engineering  # the name the OPC UA client was written against


def _shortest_scaled(fmt: Format, raw: float) -> float:
    """raw * scale + offset as the shortest decimal that encodes back to the same raw float:
    4999.95 at scale 0.1 is 49999.5 raw, and reads back as 4999.95, not 4999.950000000001."""
    value = raw * fmt.scale + fmt.offset
    if not math.isfinite(value):
        return value
    same = _same_f32 if fmt.type is PointType.F32 else _same_f64
    for digits in range(6, 18):
        candidate = float(f"{value:.{digits}g}")
        if same((candidate - fmt.offset) / fmt.scale, raw):
            return candidate
    up = down = value  # no decimal maps back: the nearest double that does
    for _ in range(16):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
        for candidate in (up, down):
            if same((candidate - fmt.offset) / fmt.scale, raw):
                return candidate
    return value


def _same_f32(a: float, b: float) -> bool:
    try:
        return struct.pack(">f", a) == struct.pack(">f", b)
    except OverflowError:
        return False


def _same_f64(a: float, b: float) -> bool:
    return a == b


def _shortest_f32(x: float) -> float:
    """The shortest decimal that is the same float32: 12.3 reads back as 12.3, not 12.30000019."""
    if not math.isfinite(x):
        return x
    packed = struct.pack(">f", x)
    for digits in range(6, 10):
        candidate = float(f"{x:.{digits}g}")
        if struct.pack(">f", candidate) == packed:
            return candidate
    return x


def _encode_string(fmt: Format, value: Any, name: str) -> list[int]:
    if not isinstance(value, str):
        raise ValueError(f"{name}: {value!r} is not a string")
    try:
        data = value.encode(fmt.encoding)
    except UnicodeEncodeError as err:
        raise ValueError(f"{name}: {value!r} cannot be written as {fmt.encoding}") from err
    capacity = fmt.length or 0
    if len(data) > capacity:
        raise ValueError(
            f"{name}: {value!r} is {len(data)} bytes long, the point holds at most {capacity}"
        )
    if b"\x00" in data:
        raise ValueError(f"{name}: {value!r} contains a NUL character")
    return _arrange(fmt, data.ljust(fmt.registers * 2, b"\x00"))


def _arrange(fmt: Format, data: bytes) -> list[int]:
    if fmt.byte_order == "big" and (fmt.word_order == "big" or fmt.type is PointType.STRING):
        return list(struct.unpack(f">{len(data) // 2}H", data))
    words = [data[i : i + 2] for i in range(0, len(data), 2)]
    if fmt.word_order == "little" and fmt.type is not PointType.STRING:
        words.reverse()
    if fmt.byte_order == "little":
        words = [w[::-1] for w in words]
    return [int.from_bytes(w, "big") for w in words]


def _unarrange(fmt: Format, registers: Sequence[int], name: str) -> bytes:
    if fmt.byte_order == "big" and (fmt.word_order == "big" or fmt.type is PointType.STRING):
        try:
            return struct.pack(f">{len(registers)}H", *registers)
        except (struct.error, TypeError):
            pass  # not 16-bit words: said below
    words = []
    for r in registers:
        if not 0 <= r <= 0xFFFF:
            raise ValueError(f"{name}: register value {r} is not a 16-bit word")
        words.append(r.to_bytes(2, "big"))
    if fmt.byte_order == "little":
        words = [w[::-1] for w in words]
    if fmt.word_order == "little" and fmt.type is not PointType.STRING:
        words.reverse()
    return b"".join(words)
