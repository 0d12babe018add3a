/* One chunk of a zstd section decoded without the GIL (the rules: zstd_frames.py and zstd.py).
 *
 * A chunk is one frame (decoded straight into the tensor) or a group of byte-plane frames. Each
 * frame is walked exactly as zstd_frames.walk_frame walks it; a stored plane's raw blocks are
 * joined where they lie in the file, a compressed plane is decompressed into the caller's
 * scratch row, then the planes are interleaved into the tensor. Python handed every frame to
 * zstd one at a time while holding the GIL between them; a chunk here is one call.
 *
 * zstd is libzstd loaded at run time (the zstandard package embeds its own copy but exports no
 * C interface); where it does not load, zstd_version() is 0 and the Python path decodes.
 */
#include "_planes.h"

#include <dlfcn.h>
#include <string.h>

#define ZSTD_MAGIC 0xFD2FB528u
#define MIN_FRAME (4 + 1 + 1 + 3 + 4)
#define BLOCK_MAX (128u << 10)

static struct {
    void *(*create)(void);
    size_t (*free_)(void *);
    size_t (*decompress)(void *, void *, size_t, const void *, size_t);
    unsigned (*is_error)(size_t);
    const char *(*error_name)(size_t);
    unsigned version;
    int tried;
} zstd;

static void load_zstd(void) {
    if (zstd.tried) return;
    zstd.tried = 1;
    static const char *names[] = {"libzstd.so.1", "libzstd.1.dylib", "libzstd.so", "libzstd.dylib"};
    void *lib = NULL;
    for (size_t i = 0; i < sizeof names / sizeof *names && lib == NULL; i++) lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) return;
    unsigned (*version)(void) = (unsigned (*)(void))dlsym(lib, "ZSTD_versionNumber");
    zstd.create = (void *(*)(void))dlsym(lib, "ZSTD_createDCtx");
    zstd.free_ = (size_t (*)(void *))dlsym(lib, "ZSTD_freeDCtx");
    zstd.decompress = (size_t (*)(void *, void *, size_t, const void *, size_t))dlsym(lib, "ZSTD_decompressDCtx");
    zstd.is_error = (unsigned (*)(size_t))dlsym(lib, "ZSTD_isError");
    zstd.error_name = (const char *(*)(size_t))dlsym(lib, "ZSTD_getErrorName");
    /* 1.4.0 made the one-shot API stable; older libraries are left to the Python path */
    if (version && zstd.create && zstd.free_ && zstd.decompress && zstd.is_error && zstd.error_name &&
        version() >= 10400)
        zstd.version = version();
}

PyObject *chunk_zstd_version(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(args)) {
    load_zstd();
    return PyLong_FromUnsignedLong(zstd.version);
}

static void free_decoder(PyObject *capsule) {
    void *dctx = PyCapsule_GetPointer(capsule, "mettaformat.zstd_dctx");
    if (dctx != NULL) zstd.free_(dctx);
}

PyObject *chunk_decoder(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(args)) {
    load_zstd();
    if (!zstd.version) {
        PyErr_SetString(PyExc_RuntimeError, "libzstd is not available");
        return NULL;
    }
    void *dctx = zstd.create();
    if (dctx == NULL) return PyErr_NoMemory();
    return PyCapsule_New(dctx, "mettaformat.zstd_dctx", free_decoder);
}

static uint64_t le(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

/* walk_frame's rules: NULL if the frame is well formed and exactly n bytes long, else why not.
 * *stored is set when every block is raw (a stored frame), *raw_total to the bytes they hold,
 * *blocks_at to where the first block header lies. */
static const char *walk(const uint8_t *d, size_t n, uint64_t expected, uint64_t max_window, int *stored,
                        uint64_t *raw_total, size_t *blocks_at) {
    if (n < MIN_FRAME || le(d, 4) != ZSTD_MAGIC) return "not a zstd frame (bad magic)";
    unsigned fhd = d[4], fcs_flag = fhd >> 6, single = (fhd >> 5) & 1;
    if ((fhd >> 3) & 1) return "zstd frame header has the reserved bit set";
    if (fhd & 3) return "zstd frame requires a dictionary";
    if (!((fhd >> 2) & 1)) return "zstd frame has no content checksum";
    size_t pos = 5;
    if (!single) {
        unsigned wd = d[pos];
        uint64_t base = (uint64_t)1 << (10 + (wd >> 3));
        if (base + (base >> 3) * (wd & 7) > max_window) return "zstd window above the limit";
        pos += 1;
    }
    static const int sizes[] = {0, 2, 4, 8};
    int fcs = fcs_flag ? sizes[fcs_flag] : (single ? 1 : 0);
    if (fcs == 0) return "zstd frame does not declare its content size";
    if (pos + (size_t)fcs > n) return "zstd frame truncated";
    uint64_t content = le(d + pos, fcs) + (fcs == 2 ? 256 : 0);
    if (content != expected) return "zstd frame declares another content size than the index";
    pos += (size_t)fcs;
    *blocks_at = pos;
    *stored = 1;
    *raw_total = 0;
    for (;;) {
        if (pos + 3 > n) return "zstd frame truncated in a block header";
        uint32_t block = (uint32_t)le(d + pos, 3);
        unsigned last = block & 1, kind = (block >> 1) & 3;
        uint32_t size = block >> 3;
        if (kind == 3 || size > BLOCK_MAX) return "invalid zstd block header";
        if (kind == 0) *raw_total += size;
        else *stored = 0;
        pos += 3 + (kind == 1 ? 1 : size);
        if (last) break;
    }
    pos += 4;
    if (pos > n) return "zstd frame truncated";
    if (pos != n) return "data after the end of the zstd frame";
    return NULL;
}

/* The content of one plane, read in order: a decoded row (one piece) or a stored frame's raw blocks. */
typedef struct {
    const uint8_t *frame, *at; /* the stored frame, the current piece */
    size_t left, next;         /* bytes left in the piece, offset of the next block header */
    int stored;
} Plane;

static void next_piece(Plane *p) {
    while (p->left == 0) {  /* a stored frame's blocks (already walked); empty ones are skipped */
        uint32_t block = (uint32_t)le(p->frame + p->next, 3);
        p->at = p->frame + p->next + 3;
        p->left = block >> 3;
        p->next += 3 + p->left;
    }
}

typedef struct {
    void *dctx;
    const uint8_t *source; /* the file's bytes from offset base on */
    size_t source_len;
    uint64_t base;
    const uint64_t *rows; /* (offset, compressed length, raw length, filter) per frame of the chunk */
    Py_ssize_t count;
    uint8_t *out, *scratch;
    size_t out_len, scratch_len;
    int float_bits;
    uint64_t max_window;
    Py_ssize_t failed;
    const char *reason;
    int by_zstd; /* the refusal is libzstd's (its build may judge a corrupt frame differently) */
} Chunk;

static int fail(Chunk *c, Py_ssize_t k, const char *reason) {
    c->failed = k;
    c->reason = reason;
    return -1;
}

static int decompress(Chunk *c, Py_ssize_t k, const uint8_t *frame, size_t length, uint8_t *dst, size_t raw) {
    size_t got = zstd.decompress(c->dctx, dst, raw, frame, length);
    if (zstd.is_error(got)) {
        c->by_zstd = 1;
        return fail(c, k, zstd.error_name(got));
    }
    if (got != raw) return fail(c, k, "frame decoded to another length than the index");
    return 0;
}

static int run(Chunk *c) {
    Plane planes[MAX_WIDTH];
    size_t raw = (size_t)c->rows[2];
    for (Py_ssize_t k = 0; k < c->count; k++) {
        const uint64_t *row = c->rows + 4 * k;
        if (row[0] < c->base || row[0] - c->base > c->source_len || row[1] > c->source_len - (row[0] - c->base))
            return fail(c, k, "frame outside the bytes given");
        const uint8_t *frame = c->source + (row[0] - c->base);
        int stored;
        uint64_t raw_total;
        size_t blocks_at;
        const char *why = walk(frame, (size_t)row[1], row[2], c->max_window, &stored, &raw_total, &blocks_at);
        if (why != NULL) return fail(c, k, why);
        if (c->count == 1) return decompress(c, k, frame, (size_t)row[1], c->out, raw);
        if (stored) {  /* its content checksum is left to the tensor's (a whole tensor is decoded) */
            if (raw_total != raw) return fail(c, k, "stored frame holds another length than the index");
            planes[k] = (Plane){frame, NULL, 0, blocks_at, 1};
        } else {
            uint8_t *row_out = c->scratch + (size_t)k * raw;
            if (decompress(c, k, frame, (size_t)row[1], row_out, raw) < 0) return -1;
            planes[k] = (Plane){NULL, row_out, raw, 0, 0};
        }
    }
    for (Py_ssize_t k = 0; k < c->count; k++) if (planes[k].stored && raw) next_piece(&planes[k]);
    size_t done = 0;
    while (done < raw) {
        size_t span = raw - done;
        const uint8_t *p[MAX_WIDTH];
        for (Py_ssize_t k = 0; k < c->count; k++) {
            if (planes[k].left < span) span = planes[k].left;
            p[k] = planes[k].at;
        }
        planes_join_words(c->out + done * (size_t)c->count, p, span, (int)c->count, c->float_bits);
        done += span;
        for (Py_ssize_t k = 0; k < c->count; k++) {
            planes[k].at += span;
            planes[k].left -= span;
            if (planes[k].stored && planes[k].left == 0 && done < raw) next_piece(&planes[k]);
        }
    }
    return 0;
}

PyObject *chunk_decode(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *capsule, *source_obj, *table_obj, *out_obj, *scratch_obj;
    Py_ssize_t first, count;
    int float_bits;
    unsigned long long base, max_window;
    if (!PyArg_ParseTuple(args, "OOKOnnOOpK:decode_chunk", &capsule, &source_obj, &base, &table_obj, &first, &count,
                          &out_obj, &scratch_obj, &float_bits, &max_window))
        return NULL;
    Chunk c = {0};
    c.dctx = PyCapsule_GetPointer(capsule, "mettaformat.zstd_dctx");
    if (c.dctx == NULL) return NULL;
    if (count != 1 && count != 2 && count != 4 && count != 8) {
        PyErr_Format(PyExc_ValueError, "a chunk has 1, 2, 4 or 8 frames, not %zd", count);
        return NULL;
    }
    Py_buffer source, table, out, scratch = {0};
    PyObject *result = NULL;
    size_t rows;
    uint64_t raw;
    int status;
    if (PyObject_GetBuffer(source_obj, &source, PyBUF_SIMPLE) < 0) return NULL;
    if (PyObject_GetBuffer(table_obj, &table, PyBUF_SIMPLE) < 0) goto release_source;
    if (PyObject_GetBuffer(out_obj, &out, PyBUF_WRITABLE) < 0) goto release_table;
    if (scratch_obj != Py_None && PyObject_GetBuffer(scratch_obj, &scratch, PyBUF_WRITABLE) < 0) goto release_out;
    rows = (size_t)table.len / (4 * sizeof(uint64_t));
    if (first < 0 || (size_t)first + (size_t)count > rows || (uintptr_t)table.buf % sizeof(uint64_t)) {
        PyErr_SetString(PyExc_ValueError, "frames outside the table");
        goto release_all;
    }
    c.rows = (const uint64_t *)table.buf + 4 * (size_t)first;
    raw = c.rows[2];
    for (Py_ssize_t k = 1; k < count; k++)
        if (c.rows[4 * k + 2] != raw) {
            PyErr_SetString(PyExc_ValueError, "the planes of a chunk differ in length");
            goto release_all;
        }
    if ((uint64_t)out.len != raw * (uint64_t)count ||
        (count > 1 && (uint64_t)scratch.len < raw * (uint64_t)count)) {
        PyErr_SetString(PyExc_ValueError, "output or scratch buffer does not fit the chunk");
        goto release_all;
    }
    c.source = source.buf;
    c.source_len = (size_t)source.len;
    c.base = base;
    c.count = count;
    c.out = out.buf;
    c.out_len = (size_t)out.len;
    c.scratch = scratch.buf;
    c.scratch_len = (size_t)scratch.len;
    c.float_bits = float_bits;
    c.max_window = max_window;
    Py_BEGIN_ALLOW_THREADS
    status = run(&c);
    Py_END_ALLOW_THREADS
    if (status == 0) {
        Py_INCREF(Py_None);
        result = Py_None;
    } else {
        result = Py_BuildValue("(nsO)", c.failed, c.reason, c.by_zstd ? Py_True : Py_False);
    }
release_all:
    if (scratch.obj != NULL) PyBuffer_Release(&scratch);
release_out:
    PyBuffer_Release(&out);
release_table:
    PyBuffer_Release(&table);
release_source:
    PyBuffer_Release(&source);
    return result;
}
