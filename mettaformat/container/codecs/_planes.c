/* Byte-plane split and join in one pass each (the rule and its numpy form: planes.py).
 *
 * Plane k holds byte k (little-endian order) of every element. With float_bits the top two
 * planes hold the top 16 bits of each element rearranged: the high plane the 8 bits below the
 * sign (the exponent for fp32/bf16), the low plane the sign above the 7 bits below those.
 *
 * Each loop reads or writes one contiguous stream per plane and builds or takes apart whole
 * words, which compilers vectorise; numpy needs eight passes for what is one here. The GIL is
 * released while a loop runs, so the codec's worker threads run these at the same time.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_planes.h"

/* Elements are stored little-endian whatever the host's order. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define LE16(x) __builtin_bswap16(x)
#define LE32(x) __builtin_bswap32(x)
#define LE64(x) __builtin_bswap64(x)
#else
#define LE16(x) (x)
#define LE32(x) (x)
#define LE64(x) (x)
#endif

static inline uint16_t join_float(uint8_t lo, uint8_t hi) {
    return (uint16_t)(((uint16_t)hi << 7) | (lo & 0x7F) | ((uint16_t)(lo & 0x80) << 8));
}

static inline uint8_t float_hi(uint16_t top) { return (uint8_t)(top >> 7); }
static inline uint8_t float_lo(uint16_t top) { return (uint8_t)((top & 0x7F) | ((top >> 8) & 0x80)); }

static void join2(uint8_t *restrict out, const uint8_t *restrict a, const uint8_t *restrict b, size_t n, int fb) {
    if (fb) {
        for (size_t i = 0; i < n; i++) {
            uint16_t v = LE16(join_float(a[i], b[i]));
            memcpy(out + 2 * i, &v, 2);
        }
    } else {
        for (size_t i = 0; i < n; i++) {
            uint16_t v = LE16((uint16_t)(a[i] | ((uint16_t)b[i] << 8)));
            memcpy(out + 2 * i, &v, 2);
        }
    }
}

static void join4(uint8_t *restrict out, const uint8_t *const *p, size_t n, int fb) {
    const uint8_t *restrict a = p[0], *restrict b = p[1], *restrict c = p[2], *restrict d = p[3];
    if (fb) {
        for (size_t i = 0; i < n; i++) {
            uint32_t v = LE32(a[i] | ((uint32_t)b[i] << 8) | ((uint32_t)join_float(c[i], d[i]) << 16));
            memcpy(out + 4 * i, &v, 4);
        }
    } else {
        for (size_t i = 0; i < n; i++) {
            uint32_t v = LE32(a[i] | ((uint32_t)b[i] << 8) | ((uint32_t)c[i] << 16) | ((uint32_t)d[i] << 24));
            memcpy(out + 4 * i, &v, 4);
        }
    }
}

static void join8(uint8_t *restrict out, const uint8_t *const *p, size_t n, int fb) {
    const uint8_t *restrict a = p[0], *restrict b = p[1], *restrict c = p[2], *restrict d = p[3];
    const uint8_t *restrict e = p[4], *restrict f = p[5], *restrict g = p[6], *restrict h = p[7];
    for (size_t i = 0; i < n; i++) {
        uint64_t top = fb ? join_float(g[i], h[i]) : (uint64_t)(g[i] | ((uint16_t)h[i] << 8));
        uint64_t v = LE64(a[i] | ((uint64_t)b[i] << 8) | ((uint64_t)c[i] << 16) | ((uint64_t)d[i] << 24) |
                          ((uint64_t)e[i] << 32) | ((uint64_t)f[i] << 40) | (top << 48));
        memcpy(out + 8 * i, &v, 8);
    }
}

static void split2(const uint8_t *restrict src, uint8_t *restrict a, uint8_t *restrict b, size_t n, int fb) {
    for (size_t i = 0; i < n; i++) {
        uint16_t v;
        memcpy(&v, src + 2 * i, 2);
        v = LE16(v);
        a[i] = fb ? float_lo(v) : (uint8_t)v;
        b[i] = fb ? float_hi(v) : (uint8_t)(v >> 8);
    }
}

static void split4(const uint8_t *restrict src, uint8_t *const *p, size_t n, int fb) {
    uint8_t *restrict a = p[0], *restrict b = p[1], *restrict c = p[2], *restrict d = p[3];
    for (size_t i = 0; i < n; i++) {
        uint32_t v;
        memcpy(&v, src + 4 * i, 4);
        v = LE32(v);
        uint16_t top = (uint16_t)(v >> 16);
        a[i] = (uint8_t)v;
        b[i] = (uint8_t)(v >> 8);
        c[i] = fb ? float_lo(top) : (uint8_t)top;
        d[i] = fb ? float_hi(top) : (uint8_t)(top >> 8);
    }
}

static void split8(const uint8_t *restrict src, uint8_t *const *p, size_t n, int fb) {
    uint8_t *restrict a = p[0], *restrict b = p[1], *restrict c = p[2], *restrict d = p[3];
    uint8_t *restrict e = p[4], *restrict f = p[5], *restrict g = p[6], *restrict h = p[7];
    for (size_t i = 0; i < n; i++) {
        uint64_t v;
        memcpy(&v, src + 8 * i, 8);
        v = LE64(v);
        uint16_t top = (uint16_t)(v >> 48);
        a[i] = (uint8_t)v;
        b[i] = (uint8_t)(v >> 8);
        c[i] = (uint8_t)(v >> 16);
        d[i] = (uint8_t)(v >> 24);
        e[i] = (uint8_t)(v >> 32);
        f[i] = (uint8_t)(v >> 40);
        g[i] = fb ? float_lo(top) : (uint8_t)top;
        h[i] = fb ? float_hi(top) : (uint8_t)(top >> 8);
    }
}

void planes_join_words(uint8_t *out, const uint8_t *const *p, size_t n, int width, int float_bits) {
    if (width == 2) join2(out, p[0], p[1], n, float_bits);
    else if (width == 4) join4(out, p, n, float_bits);
    else join8(out, p, n, float_bits);
}

/* Buffers of the call: the interleaved one and one per plane, all checked for length. */
typedef struct {
    Py_buffer words;
    Py_buffer planes[MAX_WIDTH];
    Py_ssize_t width;
    Py_ssize_t n;
} Buffers;

static void release(Buffers *b, Py_ssize_t got) {
    for (Py_ssize_t k = 0; k < got; k++) PyBuffer_Release(&b->planes[k]);
    PyBuffer_Release(&b->words);
}

/* Get the buffers; on failure sets an exception and returns -1 with nothing held. */
static int acquire(Buffers *b, PyObject *words, PyObject *planes, int words_flags, int plane_flags) {
    PyObject *seq = PySequence_Fast(planes, "planes must be a sequence of buffers");
    if (seq == NULL) return -1;
    b->width = PySequence_Fast_GET_SIZE(seq);
    if (b->width != 2 && b->width != 4 && b->width != 8) {
        PyErr_Format(PyExc_ValueError, "%zd planes: the width must be 2, 4 or 8", b->width);
        Py_DECREF(seq);
        return -1;
    }
    if (PyObject_GetBuffer(words, &b->words, words_flags) < 0) {
        Py_DECREF(seq);
        return -1;
    }
    if (b->words.len % b->width) {
        PyErr_Format(PyExc_ValueError, "%zd bytes are not whole %zd-byte elements", b->words.len, b->width);
        PyBuffer_Release(&b->words);
        Py_DECREF(seq);
        return -1;
    }
    b->n = b->words.len / b->width;
    for (Py_ssize_t k = 0; k < b->width; k++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, k), &b->planes[k], plane_flags) < 0) {
            release(b, k);
            Py_DECREF(seq);
            return -1;
        }
        if (b->planes[k].len != b->n) {
            PyErr_Format(PyExc_ValueError, "plane %zd holds %zd bytes, not %zd", k, b->planes[k].len, b->n);
            release(b, k + 1);
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq);
    return 0;
}

static PyObject *planes_join(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *out, *planes;
    int float_bits;
    Buffers b;
    if (!PyArg_ParseTuple(args, "OOp:join", &out, &planes, &float_bits)) return NULL;
    if (acquire(&b, out, planes, PyBUF_WRITABLE, PyBUF_SIMPLE) < 0) return NULL;
    const uint8_t *p[MAX_WIDTH];
    for (Py_ssize_t k = 0; k < b.width; k++) p[k] = (const uint8_t *)b.planes[k].buf;
    uint8_t *dst = (uint8_t *)b.words.buf;
    size_t n = (size_t)b.n;
    Py_BEGIN_ALLOW_THREADS
    planes_join_words(dst, p, n, (int)b.width, float_bits);
    Py_END_ALLOW_THREADS
    release(&b, b.width);
    Py_RETURN_NONE;
}

static PyObject *planes_split(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *src, *planes;
    int float_bits;
    Buffers b;
    if (!PyArg_ParseTuple(args, "OOp:split", &src, &planes, &float_bits)) return NULL;
    if (acquire(&b, src, planes, PyBUF_SIMPLE, PyBUF_WRITABLE) < 0) return NULL;
    uint8_t *p[MAX_WIDTH];
    for (Py_ssize_t k = 0; k < b.width; k++) p[k] = (uint8_t *)b.planes[k].buf;
    const uint8_t *words = (const uint8_t *)b.words.buf;
    size_t n = (size_t)b.n;
    Py_BEGIN_ALLOW_THREADS
    if (b.width == 2) split2(words, p[0], p[1], n, float_bits);
    else if (b.width == 4) split4(words, p, n, float_bits);
    else split8(words, p, n, float_bits);
    Py_END_ALLOW_THREADS
    release(&b, b.width);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"join", planes_join, METH_VARARGS,
     "join(out, planes, float_bits): interleave the width (2, 4, 8) equal planes into the writable buffer out."},
    {"split", planes_split, METH_VARARGS,
     "split(words, planes, float_bits): byte planes of words into the width (2, 4, 8) writable planes."},
    CHUNK_METHODS
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_planes", "Byte-plane split and join kernels (see planes.py) and the zstd chunk decoder (see zstd_frames.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__planes(void) { return PyModule_Create(&module); }
