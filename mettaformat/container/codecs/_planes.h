/* What the extension's two files share (one module: _planes). */
#ifndef METTAFORMAT_PLANES_H
#define METTAFORMAT_PLANES_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>

#define MAX_WIDTH 8

/* Interleave width (2, 4, 8) planes of n bytes each into out (planes.py states the rule). */
void planes_join_words(uint8_t *out, const uint8_t *const *p, size_t n, int width, int float_bits);

PyObject *chunk_zstd_version(PyObject *self, PyObject *args);
PyObject *chunk_decoder(PyObject *self, PyObject *args);
PyObject *chunk_decode(PyObject *self, PyObject *args);

#define CHUNK_METHODS                                                                                          \
    {"zstd_version", chunk_zstd_version, METH_NOARGS,                                                          \
     "zstd_version(): the version number of the libzstd the chunk decoder uses, 0 where none loads."},        \
    {"decoder", chunk_decoder, METH_NOARGS, "decoder(): a zstd decompression context for one thread."},        \
    {"decode_chunk", chunk_decode, METH_VARARGS,                                                               \
     "decode_chunk(decoder, source, base, table, first, count, out, scratch, float_bits, max_window): None, or "     \
     "(k, reason, by_zstd) for the first of its frames refused."},

#endif
