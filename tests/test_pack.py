"""Tests for nanoternary/pack.py: packed storage of ternary weights.

Round trips must be exact for any shape; buffer sizes are ceil(n/4) and ceil(n/5); a few small
vectors are packed to bytes worked out by hand here; bad input raises a ValueError that says what
was wrong. Run: python -m pytest -q tests/test_pack.py
"""

import numpy as np
import pytest

from nanoternary.pack import (
    SCHEMES,
    bits_per_weight,
    masks_from_packed,
    pack,
    pack2,
    pack5,
    packed_nbytes,
    unpack,
    unpack2,
    unpack5,
)

SHAPES = [
    (), (0,), (1,), (2,), (3,), (4,), (5,), (6,), (7,), (9,), (11,), (100,), (1001,),
    (0, 3), (3, 0), (1, 1), (2, 3), (3, 5), (7, 13), (256, 683),
    (2, 3, 4), (3, 1, 7), (2, 0, 5), (1, 2, 3, 5),
]


def random_ternary(rng, shape, dtype=np.int8):
    return rng.integers(-1, 2, size=shape).astype(dtype)


def assert_same(got, want, what):
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if not np.array_equal(got, want):
        i = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
        raise AssertionError(f"{what}: {i.size} values differ, first at flat index {i[0]}: "
                             f"got {got.reshape(-1)[i[:8]]}, want {want.reshape(-1)[i[:8]]}")


# ----------------------------------------------------------------------------------------------
# round trips and sizes


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_all_shapes(shape):
    rng = np.random.default_rng(sum(shape) + len(shape))
    t = random_ternary(rng, shape)
    n = t.size
    for packer, unpacker, per_byte in ((pack2, unpack2, 4), (pack5, unpack5, 5)):
        packed, got_shape = packer(t)
        assert packed.dtype == np.uint8 and packed.ndim == 1
        assert got_shape == shape
        assert packed.size == -(-n // per_byte), f"{packer.__name__}{shape}: {packed.size} bytes"
        back = unpacker(packed, got_shape)
        assert back.dtype == np.int8
        assert_same(back, t, f"{unpacker.__name__}({packer.__name__}(t)) for shape {shape}")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_round_trip_many_random_tensors(scheme):
    # many sizes around the byte boundaries, every ternary distribution from all-zero to all +-1
    rng = np.random.default_rng(1)
    for n in list(range(0, 41)) + [997, 4096, 4099]:
        p0 = rng.uniform()
        t = rng.choice([-1, 0, 1], size=n, p=[(1 - p0) / 2, p0, (1 - p0) / 2])
        packed, shape = pack(t, scheme)
        assert packed.size == packed_nbytes(n, scheme)
        assert_same(unpack(packed, shape, scheme), t.astype(np.int8), f"{scheme} n={n}")


def test_float_and_other_int_dtypes_accepted():
    # latent-weight quantizers may hand over float32 {-1., 0., 1.} or int64
    t = np.array([[1.0, -1.0, 0.0], [0.0, 1.0, 1.0]], dtype=np.float32)
    for scheme in SCHEMES:
        packed, shape = pack(t, scheme)
        assert_same(unpack(packed, shape, scheme), t.astype(np.int8), scheme)
        packed, shape = pack(t.astype(np.int64), scheme)
        assert_same(unpack(packed, shape, scheme), t.astype(np.int8), scheme)


def test_packed_nbytes():
    for n, b4, b5 in [(0, 0, 0), (1, 1, 1), (4, 1, 1), (5, 2, 1), (6, 2, 2), (10, 3, 2), (11, 3, 3)]:
        assert packed_nbytes(n, "2bit") == b4
        assert packed_nbytes(n, "base3") == b5
    assert packed_nbytes(256 * 683, "2bit") == 43712
    assert packed_nbytes(256 * 683, "base3") == 34970


def test_bits_per_weight():
    t = np.zeros((256, 680), dtype=np.int8)  # a multiple of 20 weights: no partly used bytes
    assert bits_per_weight(*pack2(t)) == 2.0
    assert bits_per_weight(*pack5(t)) == 1.6
    assert bits_per_weight(*pack2(np.zeros(3))) == 8 / 3  # one byte for three weights
    assert np.isnan(bits_per_weight(*pack5(np.zeros(0))))


# ----------------------------------------------------------------------------------------------
# known bytes, computed by hand


def test_pack2_known_bytes():
    # code per weight: 0 -> 0, +1 -> 1, -1 -> 2; weight j of a byte sits at bits 2j, 2j+1
    # [+1, -1, 0, +1]: 1 + 2*4 + 0*16 + 1*64 = 73
    assert pack2([1, -1, 0, 1])[0].tolist() == [73]
    # [-1, -1, -1, -1]: 2 * (1 + 4 + 16 + 64) = 170 = 0b10101010
    assert pack2([-1, -1, -1, -1])[0].tolist() == [170]
    # [+1, +1, +1, +1]: 85 = 0b01010101; [0, 0, 0, 0]: 0
    assert pack2([1, 1, 1, 1, 0, 0, 0, 0])[0].tolist() == [85, 0]
    # 6 weights -> 2 bytes, the tail padded with zero bits: [0, 0, 0, -1 | +1, -1] -> 128, 1 + 8 = 9
    assert pack2([0, 0, 0, -1, 1, -1])[0].tolist() == [128, 9]
    # weights are taken in C order: [[+1, 0], [0, -1]] is the stream +1, 0, 0, -1 -> 1 + 128
    assert pack2(np.array([[1, 0], [0, -1]]))[0].tolist() == [129]
    assert unpack2(np.array([73, 9], np.uint8), (7,)).tolist() == [1, -1, 0, 1, 1, -1, 0]


def test_pack5_known_bytes():
    # digit d = t + 1, byte = d0 + 3 d1 + 9 d2 + 27 d3 + 81 d4
    # [+1, -1, 0, +1, 0]: digits 2, 0, 1, 2, 1 -> 2 + 0 + 9 + 54 + 81 = 146
    assert pack5([1, -1, 0, 1, 0])[0].tolist() == [146]
    # all -1 -> digits 0 -> 0; all 0 -> digits 1 -> 1+3+9+27+81 = 121; all +1 -> 242
    assert pack5([-1] * 5 + [0] * 5 + [1] * 5)[0].tolist() == [0, 121, 242]
    # 7 weights -> 2 bytes; the tail [0, +1] pads with digit 0: 1 + 3*2 = 7
    assert pack5([1, 1, 1, 1, 1, 0, 1])[0].tolist() == [242, 7]
    assert pack5([1])[0].tolist() == [2]
    assert unpack5(np.array([146, 7], np.uint8), (7,)).tolist() == [1, -1, 0, 1, 0, 0, 1]


def test_masks_from_packed():
    rng = np.random.default_rng(2)
    for shape in [(0,), (1,), (7, 13), (3, 4, 5), (256, 683)]:
        t = random_ternary(rng, shape)
        for scheme in SCHEMES:
            plus, minus = masks_from_packed(*pack(t, scheme), scheme)
            assert plus.dtype == np.bool_ and minus.dtype == np.bool_
            assert_same(plus, t == 1, f"plus mask {scheme} {shape}")
            assert_same(minus, t == -1, f"minus mask {scheme} {shape}")
    # the masks give the add/subtract matvec: x @ W == x @ plus - x @ minus
    t = random_ternary(rng, (16, 8))
    x = rng.standard_normal(16)
    plus, minus = masks_from_packed(*pack5(t), "base3")
    np.testing.assert_allclose(x @ t, x @ plus - x @ minus, rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("packer", [pack2, pack5])
@pytest.mark.parametrize("bad, shown", [
    ([0, 1, 2, -1], "found 2 at index (2,)"),
    ([[0, 1], [-2, 1]], "found -2 at index (1, 0)"),
    ([0.0, 0.5], "found 0.5 at index (1,)"),
    ([1.0, np.nan], "found nan at index (1,)"),
    (7, "found 7 at index ()"),
])
def test_pack_rejects_non_ternary(packer, bad, shown):
    with pytest.raises(ValueError, match="ternary") as e:
        packer(bad)
    assert shown in str(e.value), str(e.value)


@pytest.mark.parametrize("unpacker, scheme", [(unpack2, "2bit"), (unpack5, "base3")])
def test_unpack_rejects_wrong_buffer_size(unpacker, scheme):
    packed, shape = pack(np.zeros((4, 5), dtype=np.int8), scheme)  # 20 weights: 5 or 4 bytes
    expected = packed.size
    for wrong in (np.append(packed, np.uint8(0)), packed[:-1], packed[:0]):
        with pytest.raises(ValueError) as e:
            unpacker(wrong, shape)
        msg = str(e.value)
        assert f"must hold {expected} bytes, got {wrong.size}" in msg and "(4, 5)" in msg, msg
    with pytest.raises(ValueError, match="uint8"):
        unpacker(packed.astype(np.int64), shape)


def test_unpack_rejects_corrupt_bytes():
    with pytest.raises(ValueError, match="code 3"):
        unpack2(np.array([0b00001100], np.uint8), (4,))  # weight 1 has both bits set
    with pytest.raises(ValueError, match="padding"):
        unpack2(np.array([0b01000000], np.uint8), (3,))  # a 4th weight where only 3 exist
    with pytest.raises(ValueError, match="byte 1 is 250"):
        unpack5(np.array([0, 250], np.uint8), (10,))
    with pytest.raises(ValueError, match="padding"):
        unpack5(np.array([9], np.uint8), (2,))  # digit 2 set, but only 2 trits exist
    with pytest.raises(ValueError, match="unknown packing scheme"):
        pack([0, 1], "3bit")
    with pytest.raises(ValueError, match="non-negative"):
        unpack2(np.zeros(0, np.uint8), (-1,))
