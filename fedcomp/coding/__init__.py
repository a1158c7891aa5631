"""Wire-level entropy coding: bit packing and sorted-index (Golomb-Rice) coding."""

from fedcomp.coding.bitpack import pack_bits, unpack_bits
from fedcomp.coding.indices import decode_indices, encode_indices, index_code_bits, rice_parameter

__all__ = ["decode_indices", "encode_indices", "index_code_bits", "pack_bits", "rice_parameter", "unpack_bits"]
