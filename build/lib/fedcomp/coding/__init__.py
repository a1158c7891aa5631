"""Wire-level entropy coding: bit packing, sorted-index (Golomb-Rice) coding, symbol streams."""

from fedcomp.coding.bitpack import pack_bits, unpack_bits
from fedcomp.coding.indices import decode_indices, encode_indices, index_code_bits, rice_parameter
from fedcomp.coding.symbols import decode_symbols, encode_symbols

__all__ = [
    "decode_indices", "decode_symbols", "encode_indices", "encode_symbols", "index_code_bits",
    "pack_bits", "rice_parameter", "unpack_bits",
]
