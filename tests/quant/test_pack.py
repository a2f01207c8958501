import pytest
import torch

from ptqlib.quant.pack import (
    count_v1_unsafe_zeros,
    pack_qweight,
    pack_qzeros,
    pack_rows,
    unpack_qweight,
    unpack_qzeros,
    unpack_rows,
)

BITS = [2, 3, 4, 8]


def reference_pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Slow, obviously-correct packer: one little-endian bit stream per column, cut in 32-bit words."""
    n, m = values.shape
    out = torch.zeros(n * bits // 32, m, dtype=torch.int64)
    for c in range(m):
        stream = 0
        for k in range(n):
            stream |= int(values[k, c]) << (bits * k)
        for r in range(out.shape[0]):
            out[r, c] = (stream >> (32 * r)) & 0xFFFFFFFF
    return out


@pytest.mark.parametrize("bits", BITS)
def test_pack_matches_reference_bitstream(bits):
    torch.manual_seed(bits)
    v = torch.randint(0, 2**bits, (64, 3))
    packed = pack_rows(v, bits)
    assert packed.dtype == torch.int32 and packed.shape == (64 * bits // 32, 3)
    assert torch.equal(packed.long() & 0xFFFFFFFF, reference_pack(v, bits))


def test_known_words():
    # 4 bit: value j of a word at bit 4j
    v = torch.arange(8).view(8, 1)
    assert pack_rows(v, 4).item() == 0x76543210
    # 3 bit (AutoGPTQ layout): value 10 straddles words 0/1, value 21 words 1/2
    v = torch.zeros(32, 1, dtype=torch.long)
    v[10] = 0b101
    w = pack_rows(v, 3).long().flatten() & 0xFFFFFFFF
    assert w.tolist() == [0b01 << 30, 0b1, 0]
    v.zero_()
    v[21] = 0b110
    w = pack_rows(v, 3).long().flatten() & 0xFFFFFFFF
    assert w.tolist() == [0, 0, 0b11]
    v.zero_()
    v[22] = 0b111  # first whole value of word 2 sits at bit 2
    w = pack_rows(v, 3).long().flatten() & 0xFFFFFFFF
    assert w.tolist() == [0, 0, 0b111 << 2]


@pytest.mark.parametrize("bits", BITS)
def test_qweight_qzeros_roundtrip(bits, device):
    torch.manual_seed(0)
    codes = torch.randint(0, 2**bits, (64, 96), device=device)  # (out, in)
    qw = pack_qweight(codes, bits)
    assert qw.shape == (96 * bits // 32, 64) and qw.device.type == device.type
    assert torch.equal(unpack_qweight(qw, bits).t().long(), codes)
    zeros = torch.randint(0, 2**bits, (3, 64), device=device)  # (G, out)
    qz = pack_qzeros(zeros, bits)
    assert qz.shape == (3, 64 * bits // 32)
    assert torch.equal(unpack_qzeros(qz, bits).long(), zeros)


@pytest.mark.parametrize("bits", BITS)
def test_qzeros_store_zero_minus_one(bits):
    zeros = torch.full((2, 32), 2 ** (bits - 1))
    assert torch.equal(pack_qzeros(zeros, bits), pack_rows((zeros - 1).t(), bits).t())
    zeros[0, 5] = 0  # wraps to 2^b - 1 in the file; exact for us, flagged for v1 readers
    qz = pack_qzeros(zeros, bits)
    assert torch.equal(unpack_qzeros(qz, bits).long(), zeros)
    assert count_v1_unsafe_zeros(qz, bits) == 1


def test_bad_shapes():
    with pytest.raises(ValueError):
        pack_rows(torch.zeros(16, 2, dtype=torch.long), 3)  # 3 bit needs multiples of 32
    with pytest.raises(ValueError):
        pack_rows(torch.full((8, 1), 16), 4)
    assert unpack_rows(pack_rows(torch.zeros(32, 1, dtype=torch.long), 3), 3).shape == (32, 1)
