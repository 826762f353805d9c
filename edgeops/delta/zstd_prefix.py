"""zstd compression against a referenced prefix — what ``zstd --patch-from`` does (light core; encoder only).

python-zstandard's C backend offers dictionaries but not ``ZSTD_CCtx_refPrefix``; loaded as a dictionary, a
large reference (a whole model) is indexed by small hash tables and most matches into it are lost (measured on
a 53 MB model: 33 MB instead of 25 KB for a head-only fine-tune at level 3). This module drives libzstd through
python-zstandard's CFFI backend (the same libzstd, shipped in the same package) to reference the prefix the way
the zstd CLI does: a window covering prefix and data, and long-distance matching when the window outgrows the
match finder's reach. When the CFFI backend is missing it falls back to the raw-content dictionary.

Guarantees: the output is one zstd frame with its content size, no checksum and no dictionary id; any zstd
decoder given the prefix as a raw-content dictionary (:mod:`edgeops.delta.decode` does) restores ``data``.
"""

from __future__ import annotations

from typing import Any

import zstandard

__all__ = ["compress_with_prefix", "prefix_window_log"]

MIN_WINDOW_LOG, MAX_WINDOW_LOG = 10, 31  # zstd's bounds on 64-bit
_BTLAZY2 = 6  # ZSTD_btlazy2: strategies from here on use a binary tree (chain log counts one less)


def prefix_window_log(prefix_size: int, data_size: int) -> int:
    """The window log that lets every byte of the data reach back to the start of the prefix."""
    return min(MAX_WINDOW_LOG, max(MIN_WINDOW_LOG, (prefix_size + data_size - 1).bit_length()))


def compress_with_prefix(data: bytes, prefix: bytes, level: int) -> bytes:
    """One zstd frame of ``data`` at ``level`` that may reference ``prefix`` (empty: plain compression)."""
    if not prefix:
        return zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False).compress(data)
    try:
        from zstandard import backend_cffi
    except ImportError:  # a build of python-zstandard without its CFFI backend
        return _compress_with_dictionary(data, prefix, level)
    return _compress_cffi(backend_cffi.lib, backend_cffi.ffi, data, prefix, level)


def _compress_with_dictionary(data: bytes, prefix: bytes, level: int) -> bytes:
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        source_size=len(data),
        dict_size=len(prefix),
        window_log=prefix_window_log(len(prefix), len(data)),
        write_content_size=True,
        write_checksum=False,
    )
    zdict = zstandard.ZstdCompressionDict(prefix, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(dict_data=zdict, compression_params=params).compress(data)


def _compress_cffi(lib: Any, ffi: Any, data: bytes, prefix: bytes, level: int) -> bytes:
    window_log = prefix_window_log(len(prefix), len(data))
    cparams = lib.ZSTD_getCParams(level, max(len(prefix), len(data)), len(prefix))
    cycle_log = cparams.chainLog - (1 if cparams.strategy >= _BTLAZY2 else 0)
    cctx = ffi.gc(lib.ZSTD_createCCtx(), lib.ZSTD_freeCCtx)
    if cctx == ffi.NULL:
        raise MemoryError("cannot create a zstd context")

    def check(code: int) -> int:
        if lib.ZSTD_isError(code):
            raise zstandard.ZstdError(ffi.string(lib.ZSTD_getErrorName(code)).decode())
        return code

    settings = [
        (lib.ZSTD_c_compressionLevel, level),
        (lib.ZSTD_c_windowLog, window_log),
        (lib.ZSTD_c_contentSizeFlag, 1),
        (lib.ZSTD_c_checksumFlag, 0),
        (lib.ZSTD_c_dictIDFlag, 0),
    ]
    if window_log > cycle_log:  # as the zstd CLI: "long mode automatically triggered"
        settings.append((lib.ZSTD_c_enableLongDistanceMatching, 1))
    for param, value in settings:
        check(lib.ZSTD_CCtx_setParameter(cctx, param, value))
    prefix_buf = ffi.from_buffer(prefix)
    check(lib.ZSTD_CCtx_refPrefix(cctx, prefix_buf, len(prefix)))
    bound = lib.ZSTD_compressBound(len(data))
    out = ffi.new("char[]", bound)
    size = check(lib.ZSTD_compress2(cctx, out, bound, ffi.from_buffer(data), len(data)))
    return bytes(ffi.buffer(out, size))
