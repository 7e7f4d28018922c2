/* cloud_coordinator._fold: the fused FedAvg step on the CPU, in one pass over an update.
 *
 * fold_f32(acc, update, scale, threads) -> bool
 *     acc[i] += scale * update[i] for every float32 element, in place, and True when every
 *     new acc[i] is finite. A NaN or Inf in `update`, or a sum that overflows float32,
 *     leaves a non-finite element behind and gives False; `acc` is then changed (the
 *     caller restores it: `cloud_coordinator.fused_fold`).
 *
 * Why C: torch has no operation that adds and reduces in one pass, so checking an update
 * for NaN/Inf before folding it costs a second read of the update (4 MB for 1M
 * parameters, from L3 at best). Here the check is two integer operations on each result
 * while it is still in a register.
 *
 * The loop runs on `threads` OpenMP threads. The extension links libgomp.so.1, the
 * soname of the copy torch ships, so with torch loaded first (fused_fold imports torch
 * before this module) both use one OpenMP runtime and one thread pool: no second pool
 * spinning against torch's on the same cores.
 *
 * `update` may start at any address (tensor bytes inside a msgpack payload do not start at
 * a multiple of 4); it is read with memcpy, which compiles to unaligned vector loads.
 * Each element's result depends only on its own inputs, so the answer is the same for any
 * number of threads. Built with the stable ABI (Python >= 3.11).
 */
#define Py_LIMITED_API 0x030B0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* Below this many elements one thread does it: a parallel region costs more. */
#define PARALLEL_MIN 65536

/* On x86-64 an AVX2 + FMA clone is picked at load time where the CPU has them (it is
 * what torch's own add uses, so both give the same sums there); SSE2 elsewhere. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

CLONES
static uint32_t fold_range(float *restrict acc, const unsigned char *restrict update,
                           float scale, Py_ssize_t n)
{
    uint32_t bad = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        float u, x;
        uint32_t bits;
        memcpy(&u, update + 4 * i, 4);
        x = acc[i] + scale * u;
        acc[i] = x;
        memcpy(&bits, &x, 4);
        bad |= (bits & 0x7f800000u) == 0x7f800000u; /* exponent all ones: Inf or NaN */
    }
    return bad;
}

static uint32_t fold_all(float *acc, const unsigned char *update, float scale,
                         Py_ssize_t n, int threads)
{
    uint32_t bad = 0;
#ifdef _OPENMP
    if (threads > 1 && n >= PARALLEL_MIN) {
#pragma omp parallel num_threads(threads) reduction(| : bad)
        {
            Py_ssize_t team = omp_get_num_threads(), me = omp_get_thread_num();
            /* whole 64-byte lines per thread, so no two threads write one cache line */
            Py_ssize_t per = ((n + team - 1) / team + 15) & ~(Py_ssize_t)15;
            Py_ssize_t lo = per * me, hi = lo + per < n ? lo + per : n;
            if (lo < hi)
                bad |= fold_range(acc + lo, update + 4 * lo, scale, hi - lo);
        }
        return bad;
    }
#else
    (void)threads;
#endif
    return fold_range(acc, update, scale, n);
}

static PyObject *fold_f32(PyObject *self, PyObject *args)
{
    PyObject *acc_obj, *update_obj;
    double scale;
    int threads;
    Py_buffer acc, update;
    uint32_t bad;
    (void)self;

    if (!PyArg_ParseTuple(args, "OOdi:fold_f32", &acc_obj, &update_obj, &scale, &threads))
        return NULL;
    if (PyObject_GetBuffer(acc_obj, &acc, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (PyObject_GetBuffer(update_obj, &update, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&acc);
        return NULL;
    }
    if (acc.len != update.len || acc.len % 4 != 0) {
        PyErr_Format(PyExc_ValueError,
                     "fold_f32: %zd accumulator bytes and %zd update bytes (want equal, a "
                     "multiple of 4)", acc.len, update.len);
        PyBuffer_Release(&update);
        PyBuffer_Release(&acc);
        return NULL;
    }
    if (((uintptr_t)acc.buf) % 4 != 0) {
        PyErr_SetString(PyExc_ValueError, "fold_f32: the accumulator is not 4-byte aligned");
        PyBuffer_Release(&update);
        PyBuffer_Release(&acc);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    bad = fold_all((float *)acc.buf, (const unsigned char *)update.buf, (float)scale,
                   acc.len / 4, threads);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&update);
    PyBuffer_Release(&acc);
    return PyBool_FromLong(!bad);
}

static PyMethodDef methods[] = {
    {"fold_f32", fold_f32, METH_VARARGS,
     "fold_f32(acc, update, scale, threads) -> bool: acc += scale * update in place "
     "(float32 buffers of equal size); True when every result is finite."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fold", "The fused, checked FedAvg step (see fused_fold).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fold(void) { return PyModule_Create(&module); }
