"""Value <-> register conversion: every type, both orders, scaling, rounding, refusals."""

from __future__ import annotations

import math

import pytest

from edge_agent.machine.codec import Format, decode, encode, encode_bit, hold
from edge_agent.machine.profile import PointType as T

# (type, value, registers with big byte order and big word order) - worked out by hand.
KNOWN = [
    (T.U16, 0, [0x0000]),
    (T.U16, 65535, [0xFFFF]),
    (T.U16, 0x1234, [0x1234]),
    (T.I16, -1, [0xFFFF]),
    (T.I16, -32768, [0x8000]),
    (T.I16, 32767, [0x7FFF]),
    (T.U32, 0x12345678, [0x1234, 0x5678]),
    (T.U32, 4294967295, [0xFFFF, 0xFFFF]),
    (T.I32, -2, [0xFFFF, 0xFFFE]),
    (T.I32, -2147483648, [0x8000, 0x0000]),
    (T.F32, 1.0, [0x3F80, 0x0000]),
    (T.F32, -2.5, [0xC020, 0x0000]),
    (T.F64, 1.0, [0x3FF0, 0, 0, 0]),
    (T.F64, -0.1, [0xBFB9, 0x9999, 0x9999, 0x999A]),
    (T.BOOL, True, [1]),
    (T.BOOL, False, [0]),
]


@pytest.mark.parametrize(("type_", "value", "words"), KNOWN)
def test_known_values_big_endian(type_: T, value: object, words: list[int]) -> None:
    fmt = Format(type_)
    assert encode(fmt, value, "p") == words
    assert decode(fmt, words, "p") == value


def _swap(word: int) -> int:
    return ((word & 0xFF) << 8) | (word >> 8)


@pytest.mark.parametrize(("type_", "value", "words"), KNOWN)
@pytest.mark.parametrize("byte_order", ["big", "little"])
@pytest.mark.parametrize("word_order", ["big", "little"])
def test_orders(
    type_: T, value: object, words: list[int], byte_order: str, word_order: str
) -> None:
    fmt = Format(type_, byte_order=byte_order, word_order=word_order)  # type: ignore[arg-type]
    expected = list(reversed(words)) if word_order == "little" else list(words)
    if byte_order == "little":
        expected = [_swap(w) for w in expected]
    assert encode(fmt, value, "p") == expected
    assert decode(fmt, expected, "p") == value


def test_little_word_order_u32_layout() -> None:
    # The classic "CDAB" layout of 0x12345678: low word first.
    assert encode(Format(T.U32, word_order="little"), 0x12345678, "p") == [0x5678, 0x1234]
    # "BADC": bytes swapped inside each word, words in order.
    assert encode(Format(T.U32, byte_order="little"), 0x12345678, "p") == [0x3412, 0x7856]
    # "DCBA": fully little-endian.
    fmt = Format(T.U32, byte_order="little", word_order="little")
    assert encode(fmt, 0x12345678, "p") == [0x7856, 0x3412]


def test_f64_little_word_order_reverses_all_four_words() -> None:
    fmt = Format(T.F64, word_order="little")
    assert encode(fmt, -0.1, "p") == [0x999A, 0x9999, 0x9999, 0xBFB9]


def test_scale_and_offset() -> None:
    feed = Format(T.U16, scale=0.1)
    assert encode(feed, 350.5, "feed_rate") == [3505]
    assert decode(feed, [3505], "feed_rate") == 350.5
    temp = Format(T.I16, scale=0.1, offset=-40)
    assert encode(temp, -40, "t") == [0]
    assert encode(temp, 18.5, "t") == [585]
    assert decode(temp, [585], "t") == 18.5
    # scale applies to floats too (e.g. a PLC that keeps metres while the recipe says mm)
    metres = Format(T.F32, scale=1000.0)
    assert encode(metres, 1500.0, "d") == encode(Format(T.F32), 1.5, "d")
    assert decode(metres, encode(metres, 1500.0, "d"), "d") == 1500.0


def test_integral_scale_decodes_to_int() -> None:
    assert decode(Format(T.U16), [7], "p") == 7
    assert isinstance(decode(Format(T.U16), [7], "p"), int)
    assert decode(Format(T.U16, scale=10), [7], "p") == 70
    assert isinstance(decode(Format(T.U16, scale=10), [7], "p"), int)


def test_scaled_decode_has_no_binary_noise() -> None:
    fmt = Format(T.U16, scale=0.1)
    for raw in range(0, 5001, 7):
        assert decode(fmt, [raw], "p") == float(f"{raw / 10:.1f}")


def test_f32_reads_back_as_written() -> None:
    fmt = Format(T.F32)
    for value in (12.3, 0.1, 6.25, 79.99, 1e-3, 123456.7):
        assert decode(fmt, encode(fmt, value, "p"), "p") == value


@pytest.mark.parametrize(
    ("value", "raw"), [(0.04, 0), (0.05, 1), (0.06, 1), (12.34, 123), (12.35, 124), (12.36, 124)]
)
def test_rounding_to_nearest_half_away_from_zero(value: float, raw: int) -> None:
    assert encode(Format(T.U16, scale=0.1), value, "p") == [raw]


def test_rounding_negative_half_away_from_zero() -> None:
    assert encode(Format(T.I16), -2.5, "p") == encode(Format(T.I16), -3, "p")
    assert encode(Format(T.I16), 2.5, "p") == [3]
    assert encode(Format(T.I16), 2.4, "p") == [2]


@pytest.mark.parametrize(
    ("type_", "value"),
    [
        (T.U16, -1),
        (T.U16, 65536),
        (T.I16, 32768),
        (T.I16, -32769),
        (T.U32, 2**32),
        (T.U32, -1),
        (T.I32, 2**31),
        (T.I32, -(2**31) - 1),
        (T.F32, 1e39),
        (T.F32, -1e39),
    ],
)
def test_out_of_range_is_refused(type_: T, value: float) -> None:
    with pytest.raises(ValueError, match=r"^speed: .*does not fit .*representable range"):
        encode(Format(type_), value, "speed")


def test_out_of_range_after_scaling_names_point_value_and_range() -> None:
    fmt = Format(T.U16, scale=0.1)
    assert encode(fmt, 6553.5, "feed_rate") == [65535]
    with pytest.raises(ValueError) as err:
        encode(fmt, 6553.6, "feed_rate")
    message = str(err.value)
    assert message.startswith("feed_rate: 6553.6 ")
    assert "u16 with scale 0.1 and offset 0" in message
    assert "0..6553.5" in message


def test_rounding_up_past_the_top_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        encode(Format(T.U16), 65535.5, "p")
    assert encode(Format(T.U16), 65535.4, "p") == [65535]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("type_", [T.F32, T.F64, T.U16, T.I32])
def test_nan_and_infinity_are_refused(type_: T, value: float) -> None:
    with pytest.raises(ValueError, match=r"^depth: .*not a finite number"):
        encode(Format(type_), value, "depth")


@pytest.mark.parametrize("value", ["12", None, True, [1]])
def test_non_numbers_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match=r"^depth: .*is not a number"):
        encode(Format(T.F32), value, "depth")


def test_bool() -> None:
    assert encode_bit(True, "p") is True
    assert encode_bit(0, "p") is False
    assert encode_bit(1.0, "p") is True
    for bad in (2, -1, "true", None, 0.5):
        with pytest.raises(ValueError, match=r"^trigger: .*not a bool"):
            encode_bit(bad, "trigger")
    with pytest.raises(ValueError, match=r"^done: register value 2 is not a bool"):
        decode(Format(T.BOOL), [2], "done")


def test_strings() -> None:
    fmt = Format(T.STRING, length=7)
    assert fmt.registers == 4
    assert encode(fmt, "AB", "label") == [0x4142, 0, 0, 0]
    assert encode(fmt, "ABCDEFG", "label") == [0x4142, 0x4344, 0x4546, 0x4700]
    assert decode(fmt, [0x4142, 0x4344, 0x4546, 0x4700], "label") == "ABCDEFG"
    assert decode(fmt, [0x4142, 0, 0, 0], "label") == "AB"
    assert encode(fmt, "", "label") == [0, 0, 0, 0]
    assert decode(fmt, [0, 0, 0, 0], "label") == ""


def test_string_byte_order_little_swaps_characters_word_order_does_not_apply() -> None:
    fmt = Format(T.STRING, length=4, byte_order="little", word_order="little")
    assert encode(fmt, "ABCD", "label") == [0x4241, 0x4443]
    assert decode(fmt, [0x4241, 0x4443], "label") == "ABCD"


def test_string_too_long_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^label: 'ABCDEFGHI' is 9 bytes long, .* at most 8"):
        encode(Format(T.STRING, length=8), "ABCDEFGHI", "label")


def test_string_encodings() -> None:
    ascii_ = Format(T.STRING, length=8)
    with pytest.raises(ValueError, match=r"^label: .*cannot be written as ascii"):
        encode(ascii_, "Maß", "label")
    utf8 = Format(T.STRING, length=4, encoding="utf-8")
    assert decode(utf8, encode(utf8, "Maß", "label"), "label") == "Maß"
    # length counts bytes on the wire: "ß" takes two
    with pytest.raises(ValueError, match="5 bytes long"):
        encode(utf8, "Maße", "label")
    with pytest.raises(ValueError, match="not a string"):
        encode(ascii_, 12, "label")
    with pytest.raises(ValueError, match="NUL"):
        encode(ascii_, "A\x00B", "label")


def test_decode_wrong_register_count_names_point() -> None:
    with pytest.raises(ValueError, match=r"^force: expected 2 register\(s\), got 1"):
        decode(Format(T.U32), [1], "force")


@pytest.mark.parametrize(
    "fmt",
    [
        Format(T.U16, scale=0.1),
        Format(T.I16, scale=0.1, offset=-40),
        Format(T.I32, scale=0.001),
        Format(T.U32, scale=5),
        Format(T.F32),
        Format(T.F32, scale=0.1),
        Format(T.F64, scale=0.01, offset=3),
    ],
    ids=lambda f: f"{f.type.value}x{f.scale}+{f.offset}",
)
def test_the_held_value_is_written_as_the_same_raw_number(fmt: Format) -> None:
    # What the profile checks (the held value) must encode to exactly what the machine receives.
    for i in range(2000):
        value = (i * 7.919) % 1000 - 20 + i / 997
        try:
            raw, held = hold(fmt, value, "p")
        except ValueError:
            continue
        assert hold(fmt, held, "p") == (raw, held), (value, raw, held)
        assert encode(fmt, held, "p") == encode(fmt, value, "p")


def test_scaled_floats_read_back_as_the_shortest_decimal() -> None:
    assert hold(Format(T.F32, scale=0.1), 4999.95, "p") == (49999.5, 4999.95)
    assert hold(Format(T.U16, scale=0.1), 4999.95, "p") == (50000, 5000.0)
