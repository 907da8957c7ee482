/*
 * The QAT stand-in: a shared library exporting the qatlib functions pagewire's QAT
 * backend calls (icp_sal_*, cpaDc*, qaeMem*), with the same C types, that runs every
 * request in software, with a codec the loading process installs. It is NOT a QAT
 * device and NOT qatlib: it exists so that the backend's whole FFI path (dlopen, discovery, instance start,
 * sessions, buffer lists with library-allocated metadata, asynchronous submission,
 * polling and callbacks, error statuses) runs for real in the tests.
 *
 * Like a device it checks what it is given: session memory and buffer-list metadata
 * must come from qaeMemAllocNUMA, lists hold one flat buffer, requests are stateless
 * and final. An instance takes at most STANDIN_RING requests before it answers
 * CPA_STATUS_RETRY, and completes them only when polled, in submission order.
 *
 * Tests steer it through pagewire_standin_* (instance count, physically contiguous
 * memory, injected busy/restarting/lost/verify failures) and read its counters. One
 * loaded copy has one global state: the tests load a private copy each.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <pthread.h>

/* The stand-in has no codec of its own (so it builds with any C compiler and no
 * library, whatever sanitizer flags the build uses): the process that loads it gives it
 * one through pagewire_standin_set_codec. pagewire's QAT runtime does so when it finds
 * that function, with the libdeflate pagewire is built with.
 * deflate: compresses `in` at `level` into at most `cap` bytes; returns the length, 0
 * when it does not fit. inflate: 0 and the bytes consumed and produced on success, 1
 * when the output does not fit, 2 for a bad stream. */
typedef size_t (*standin_deflate_fn)(int level, const uint8_t *in, size_t len, uint8_t *out,
                                     size_t cap);
typedef int (*standin_inflate_fn)(const uint8_t *in, size_t len, uint8_t *out, size_t cap,
                                  size_t *consumed, size_t *produced);

#define EXPORT __attribute__((visibility("default")))

typedef int32_t CpaStatus;
typedef uint32_t CpaBoolean;
#define CPA_STATUS_SUCCESS 0
#define CPA_STATUS_FAIL (-1)
#define CPA_STATUS_RETRY (-2)
#define CPA_STATUS_INVALID_PARAM (-4)
#define CPA_STATUS_UNSUPPORTED (-6)
#define CPA_STATUS_RESTARTING (-7)

#define CPA_DC_OK 0
#define CPA_DC_INVALID_CODE (-9)
#define CPA_DC_OVERFLOW (-11)
#define CPA_DC_VERIFY_ERROR (-18)

typedef struct { uint32_t dataLenInBytes; uint8_t *pData; } CpaFlatBuffer;
typedef struct {
    uint32_t numBuffers; CpaFlatBuffer *pBuffers; void *pUserData; void *pPrivateMetaData;
} CpaBufferList;
typedef struct {
    uint32_t compLevel, compType, huffType, autoSelectBestHuffmanTree, sessDirection,
        sessState, windowSize, minMatch, lz4BlockMaxSize;
    CpaBoolean lz4BlockChecksum, lz4BlockIndependence;
    uint32_t checksum;
    CpaBoolean accumulateXXHash;
} CpaDcSessionSetupData;
typedef struct {
    int32_t status; uint32_t produced, consumed, checksum;
    CpaBoolean endOfLastBlock, dataUncompressed;
} CpaDcRqResults;
typedef struct { uint32_t skipMode, skipLength, strideLength, firstSkipOffset; } CpaDcSkipData;
typedef struct {
    uint32_t flushFlag;
    CpaBoolean compressAndVerify, compressAndVerifyAndRecover, integrityCrcCheck,
        verifyHwIntegrityCrcs;
    uint32_t integrityCrcSize;
    CpaDcSkipData inputSkipData, outputSkipData;
    void *pCrcData;
} CpaDcOpData;
typedef struct {
    uint32_t accelerationServiceType;
    uint8_t vendorName[64], partName[64], swVersion[64], instName[64], instID[128];
    uint16_t physInstId[6];
    uint32_t coreAffinity[128];
    uint32_t nodeAffinity, operState;
    CpaBoolean requiresPhysicallyContiguousMemory, isPolled, isOffloaded;
} CpaInstanceInfo2;
typedef void (*CpaDcCallbackFn)(void *tag, CpaStatus status);
typedef uint64_t (*CpaVirtualToPhysical)(void *);

#define CPA_DC_DEFLATE 3
#define CPA_DC_STATELESS 1
#define CPA_DC_NONE 0
#define CPA_DC_FLUSH_FINAL 1

#define STANDIN_MAX_INST 8
#define STANDIN_RING 64
#define META_PER_BUFFER 64
#define SESSION_MAGIC 0x51415453u /* "STAQ" */

struct session {
    uint32_t magic;
    int inst;
    int level;
    CpaDcCallbackFn cb;
    uint64_t pending;
};

struct req {
    int decompress;
    struct session *s;
    CpaBufferList *src, *dst;
    CpaBoolean verify;
    CpaDcRqResults *res;
    void *tag;
};

struct inst {
    int started;
    CpaVirtualToPhysical v2p;
    struct req ring[STANDIN_RING];
    int head, len;
};

struct alloc { void *p; size_t len; struct alloc *next; };

static standin_deflate_fn g_deflate;
static standin_inflate_fn g_inflate;
static int g_started;
static int g_ninst = 2;
static int g_contig;
static struct inst g_inst[STANDIN_MAX_INST];
static struct alloc *g_allocs;
static int g_lost;
static int g_busy, g_restarting, g_verify_fail;
/* PAGEWIRE_QAT_STANDIN_FAULT=restarting:N or busy:N: every Nth submission answers
 * CPA_STATUS_RESTARTING (or CPA_STATUS_RETRY), for tools such as the demo. */
static int g_every_kind, g_every_n;
static uint64_t g_every_count;
/* Counters: live allocations, submitted, completed, live sessions, verify checks,
 * retries answered, instances started. */
static uint64_t g_live_allocs, g_submitted, g_completed, g_live_sessions, g_verified,
    g_retries, g_starts;
/* Instances are shared between threads (each instance is used under its caller's lock,
 * as qatlib asks), but these globals are shared between instances: the counters move
 * atomically and the allocation list and fault budgets sit behind one mutex, as in
 * the real libusdm and qatlib. */
#define BUMP(x) __atomic_add_fetch(&(x), 1, __ATOMIC_RELAXED)
#define DROP(x) __atomic_sub_fetch(&(x), 1, __ATOMIC_RELAXED)
#define READ(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;

/* Takes one from a fault budget if any is left. */
static int take(int *budget) {
    pthread_mutex_lock(&g_lock);
    int hit = *budget > 0;
    if (hit) (*budget)--;
    pthread_mutex_unlock(&g_lock);
    return hit;
}

EXPORT void pagewire_standin_set_codec(standin_deflate_fn d, standin_inflate_fn i) {
    g_deflate = d;
    g_inflate = i;
}

EXPORT void pagewire_standin_configure(int instances, int contiguous) {
    g_ninst = instances < 0 ? 0 : (instances > STANDIN_MAX_INST ? STANDIN_MAX_INST : instances);
    g_contig = contiguous;
}

/* kind: 1 busy (next n submissions answer CPA_STATUS_RETRY), 2 restarting (next n
 * answer CPA_STATUS_RESTARTING), 3 device lost (every submission fails from now on and
 * requests in flight complete with CPA_STATUS_FAIL), 4 verify failure (the next n
 * compressions with compressAndVerify report CPA_DC_VERIFY_ERROR). */
EXPORT void pagewire_standin_inject(int kind, int n) {
    pthread_mutex_lock(&g_lock);
    switch (kind) {
    case 1: g_busy = n; break;
    case 2: g_restarting = n; break;
    case 3: __atomic_store_n(&g_lost, 1, __ATOMIC_RELAXED); break;
    case 4: g_verify_fail = n; break;
    default: break;
    }
    pthread_mutex_unlock(&g_lock);
}

EXPORT void pagewire_standin_counters(uint64_t out[7]) {
    out[0] = READ(g_live_allocs); out[1] = READ(g_submitted); out[2] = READ(g_completed);
    out[3] = READ(g_live_sessions); out[4] = READ(g_verified); out[5] = READ(g_retries);
    out[6] = READ(g_starts);
}

/* sizeof of the structs as this library sees them, for the layout test. */
EXPORT void pagewire_standin_layout(uint64_t out[6]) {
    out[0] = sizeof(CpaFlatBuffer); out[1] = sizeof(CpaBufferList);
    out[2] = sizeof(CpaDcSessionSetupData); out[3] = sizeof(CpaDcRqResults);
    out[4] = sizeof(CpaDcOpData); out[5] = sizeof(CpaInstanceInfo2);
}

/* ---- libusdm ---- */

EXPORT void *qaeMemAllocNUMA(size_t size, int node, size_t align) {
    (void)node;
    if (size == 0 || align == 0 || (align & (align - 1)) != 0) return NULL;
    void *p = NULL;
    if (posix_memalign(&p, align < sizeof(void *) ? sizeof(void *) : align, size) != 0)
        return NULL;
    struct alloc *a = malloc(sizeof *a);
    if (!a) { free(p); return NULL; }
    pthread_mutex_lock(&g_lock);
    a->p = p; a->len = size; a->next = g_allocs; g_allocs = a;
    pthread_mutex_unlock(&g_lock);
    BUMP(g_live_allocs);
    return p;
}

EXPORT void qaeMemFreeNUMA(void **ptr) {
    if (!ptr || !*ptr) return;
    pthread_mutex_lock(&g_lock);
    for (struct alloc **a = &g_allocs; *a; a = &(*a)->next) {
        if ((*a)->p == *ptr) {
            struct alloc *dead = *a;
            *a = dead->next;
            pthread_mutex_unlock(&g_lock);
            free(dead->p);
            free(dead);
            DROP(g_live_allocs);
            *ptr = NULL;
            return;
        }
    }
    pthread_mutex_unlock(&g_lock);
    /* Not ours: a real libusdm would corrupt its state; count it as a leak-like error
     * by leaving the counter untouched and aborting loudly. */
    fprintf(stderr, "qat stand-in: qaeMemFreeNUMA of memory it did not allocate\n");
    abort();
}

/* Whether [p, p+len) lies inside one qaeMemAllocNUMA allocation. */
static int pinned(const void *p, size_t len) {
    const uint8_t *b = p;
    int inside = 0;
    pthread_mutex_lock(&g_lock);
    for (struct alloc *a = g_allocs; a && !inside; a = a->next) {
        const uint8_t *s = a->p;
        inside = b >= s && b + len <= s + a->len;
    }
    pthread_mutex_unlock(&g_lock);
    return inside;
}

EXPORT uint64_t qaeVirtToPhysNUMA(void *p) {
    return pinned(p, 1) ? (uint64_t)(uintptr_t)p : 0;
}

/* ---- icp_sal ---- */

EXPORT CpaStatus icp_sal_userStart(const char *name) {
    if (!name || g_started) return CPA_STATUS_FAIL;
    g_started = 1;
    const char *f = getenv("PAGEWIRE_QAT_STANDIN_FAULT");
    if (f) {
        int n = 0;
        if (sscanf(f, "restarting:%d", &n) == 1 && n > 0) { g_every_kind = 2; g_every_n = n; }
        else if (sscanf(f, "busy:%d", &n) == 1 && n > 0) { g_every_kind = 1; g_every_n = n; }
    }
    return CPA_STATUS_SUCCESS;
}

EXPORT CpaStatus icp_sal_userStop(void) {
    if (!g_started) return CPA_STATUS_FAIL;
    g_started = 0;
    return CPA_STATUS_SUCCESS;
}

static struct inst *instance(void *h) {
    struct inst *i = h;
    if (i < g_inst || i >= g_inst + g_ninst) return NULL;
    return i;
}

/* ---- cpa_dc: instances ---- */

EXPORT CpaStatus cpaDcGetNumInstances(uint16_t *n) {
    if (!n) return CPA_STATUS_INVALID_PARAM;
    if (!g_started) return CPA_STATUS_FAIL;
    *n = (uint16_t)g_ninst;
    return CPA_STATUS_SUCCESS;
}

EXPORT CpaStatus cpaDcGetInstances(uint16_t n, void **out) {
    if (!out || n > g_ninst) return CPA_STATUS_INVALID_PARAM;
    if (!g_started) return CPA_STATUS_FAIL;
    for (int i = 0; i < n; i++) out[i] = &g_inst[i];
    return CPA_STATUS_SUCCESS;
}

EXPORT CpaStatus cpaDcInstanceGetInfo2(void *h, CpaInstanceInfo2 *info) {
    struct inst *i = instance(h);
    if (!i || !info) return CPA_STATUS_INVALID_PARAM;
    memset(info, 0, sizeof *info);
    info->accelerationServiceType = 2; /* CPA_ACC_SVC_TYPE_DATA_COMPRESSION */
    snprintf((char *)info->vendorName, 64, "pagewire");
    snprintf((char *)info->partName, 64, "stand-in (software deflate, not a QAT device)");
    snprintf((char *)info->instName, 64, "standin-dc%d", (int)(i - g_inst));
    info->operState = 1;
    info->requiresPhysicallyContiguousMemory = g_contig ? 1 : 0;
    info->isPolled = 1;
    info->isOffloaded = 1;
    return CPA_STATUS_SUCCESS;
}

EXPORT CpaStatus cpaDcSetAddressTranslation(void *h, CpaVirtualToPhysical f) {
    struct inst *i = instance(h);
    if (!i || !f) return CPA_STATUS_INVALID_PARAM;
    i->v2p = f;
    return CPA_STATUS_SUCCESS;
}

EXPORT CpaStatus cpaDcGetNumIntermediateBuffers(void *h, uint16_t *n) {
    if (!instance(h) || !n) return CPA_STATUS_INVALID_PARAM;
    *n = 0;
    return CPA_STATUS_SUCCESS;
}

EXPORT CpaStatus cpaDcStartInstance(void *h, uint16_t nbuf, CpaBufferList **bufs) {
    struct inst *i = instance(h);
    (void)bufs;
    if (!i || nbuf != 0) return CPA_STATUS_INVALID_PARAM;
    if (!i->v2p) return CPA_STATUS_FAIL; /* qatlib needs the translation first */
    if (i->started) return CPA_STATUS_SUCCESS;
    i->started = 1;
    BUMP(g_starts);
    return CPA_STATUS_SUCCESS;
}

EXPORT CpaStatus cpaDcStopInstance(void *h) {
    struct inst *i = instance(h);
    if (!i || !i->started) return CPA_STATUS_FAIL;
    if (i->len > 0) return CPA_STATUS_RETRY; /* requests still in flight */
    i->started = 0;
    return CPA_STATUS_SUCCESS;
}

EXPORT CpaStatus cpaDcBufferListGetMetaSize(void *h, uint32_t n, uint32_t *size) {
    if (!instance(h) || !size || n == 0) return CPA_STATUS_INVALID_PARAM;
    *size = META_PER_BUFFER * n;
    return CPA_STATUS_SUCCESS;
}

/* ---- cpa_dc: sessions ---- */

static CpaStatus check_setup(const CpaDcSessionSetupData *d) {
    if (!d) return CPA_STATUS_INVALID_PARAM;
    if (d->compType != CPA_DC_DEFLATE) return CPA_STATUS_UNSUPPORTED;
    if (d->sessState != CPA_DC_STATELESS || d->checksum != CPA_DC_NONE)
        return CPA_STATUS_UNSUPPORTED;
    if (d->compLevel < 1 || d->compLevel > 12) return CPA_STATUS_INVALID_PARAM;
    return CPA_STATUS_SUCCESS;
}

EXPORT CpaStatus cpaDcGetSessionSize(void *h, CpaDcSessionSetupData *d, uint32_t *size,
                                     uint32_t *ctx) {
    if (!instance(h) || !size || !ctx) return CPA_STATUS_INVALID_PARAM;
    CpaStatus s = check_setup(d);
    if (s != CPA_STATUS_SUCCESS) return s;
    *size = sizeof(struct session) + 64;
    *ctx = 0; /* stateless: no context buffer */
    return CPA_STATUS_SUCCESS;
}

EXPORT CpaStatus cpaDcInitSession(void *h, void *mem, CpaDcSessionSetupData *d,
                                  CpaBufferList *ctx, CpaDcCallbackFn cb) {
    struct inst *i = instance(h);
    (void)ctx;
    if (!i || !mem || !cb) return CPA_STATUS_INVALID_PARAM;
    if (!i->started) return CPA_STATUS_FAIL;
    if (!pinned(mem, sizeof(struct session) + 64)) return CPA_STATUS_INVALID_PARAM;
    CpaStatus s = check_setup(d);
    if (s != CPA_STATUS_SUCCESS) return s;
    struct session *ss = mem;
    ss->magic = SESSION_MAGIC;
    ss->inst = (int)(i - g_inst);
    ss->level = (int)d->compLevel;
    ss->cb = cb;
    ss->pending = 0;
    BUMP(g_live_sessions);
    return CPA_STATUS_SUCCESS;
}

EXPORT CpaStatus cpaDcRemoveSession(void *h, void *mem) {
    struct session *s = mem;
    if (!instance(h) || !s || s->magic != SESSION_MAGIC) return CPA_STATUS_INVALID_PARAM;
    if (s->pending > 0) return CPA_STATUS_RETRY;
    s->magic = 0;
    DROP(g_live_sessions);
    return CPA_STATUS_SUCCESS;
}

/* ---- cpa_dc: data ---- */

static int good_list(struct inst *i, const CpaBufferList *l) {
    if (!l || l->numBuffers != 1 || !l->pBuffers || !l->pPrivateMetaData) return 0;
    if (!pinned(l->pPrivateMetaData, META_PER_BUFFER)) return 0;
    const CpaFlatBuffer *f = &l->pBuffers[0];
    if (!f->pData || f->dataLenInBytes == 0) return 0;
    /* An instance without SVM reaches only memory it can translate. */
    if (g_contig && (!pinned(f->pData, f->dataLenInBytes) || i->v2p(f->pData) == 0)) return 0;
    return 1;
}

static CpaStatus submit(int decompress, void *h, void *mem, CpaBufferList *src,
                        CpaBufferList *dst, CpaDcOpData *op, CpaDcRqResults *res, void *tag) {
    struct inst *i = instance(h);
    struct session *s = mem;
    if (!i || !s || s->magic != SESSION_MAGIC || s->inst != (int)(i - g_inst) || !op || !res)
        return CPA_STATUS_INVALID_PARAM;
    if (!i->started) return CPA_STATUS_FAIL;
    if (READ(g_lost)) return CPA_STATUS_FAIL;
    if (take(&g_restarting)) return CPA_STATUS_RESTARTING;
    if (g_every_n > 0 && BUMP(g_every_count) % (uint64_t)g_every_n == 0) {
        if (g_every_kind == 2) return CPA_STATUS_RESTARTING;
        BUMP(g_retries);
        return CPA_STATUS_RETRY;
    }
    if (take(&g_busy)) { BUMP(g_retries); return CPA_STATUS_RETRY; }
    if (op->flushFlag != CPA_DC_FLUSH_FINAL) return CPA_STATUS_INVALID_PARAM;
    if (!good_list(i, src) || !good_list(i, dst)) return CPA_STATUS_INVALID_PARAM;
    if (i->len == STANDIN_RING) { BUMP(g_retries); return CPA_STATUS_RETRY; }
    struct req *r = &i->ring[(i->head + i->len) % STANDIN_RING];
    r->decompress = decompress;
    r->s = s;
    r->src = src;
    r->dst = dst;
    r->verify = op->compressAndVerify;
    r->res = res;
    r->tag = tag;
    i->len++;
    s->pending++;
    BUMP(g_submitted);
    return CPA_STATUS_SUCCESS;
}

EXPORT CpaStatus cpaDcCompressData2(void *h, void *s, CpaBufferList *src, CpaBufferList *dst,
                                    CpaDcOpData *op, CpaDcRqResults *res, void *tag) {
    return submit(0, h, s, src, dst, op, res, tag);
}

EXPORT CpaStatus cpaDcDecompressData2(void *h, void *s, CpaBufferList *src,
                                      CpaBufferList *dst, CpaDcOpData *op,
                                      CpaDcRqResults *res, void *tag) {
    return submit(1, h, s, src, dst, op, res, tag);
}

/* Runs one request; returns the callback status. */
static CpaStatus run(struct inst *i, struct req *r) {
    CpaFlatBuffer *in = &r->src->pBuffers[0], *out = &r->dst->pBuffers[0];
    CpaDcRqResults *res = r->res;
    (void)i;
    memset(res, 0, sizeof *res);
    if (READ(g_lost) || !g_deflate || !g_inflate) return CPA_STATUS_FAIL;
    if (r->decompress) {
        size_t used = 0, made = 0;
        int e = g_inflate(in->pData, in->dataLenInBytes, out->pData, out->dataLenInBytes,
                          &used, &made);
        if (e == 0) {
            res->status = CPA_DC_OK;
            res->consumed = (uint32_t)used;
            res->produced = (uint32_t)made;
            res->endOfLastBlock = 1;
        } else {
            res->status = e == 1 ? CPA_DC_OVERFLOW : CPA_DC_INVALID_CODE;
        }
        return CPA_STATUS_SUCCESS;
    }
    size_t n = g_deflate(r->s->level, in->pData, in->dataLenInBytes, out->pData,
                         out->dataLenInBytes);
    if (n == 0) {
        res->status = CPA_DC_OVERFLOW;
        return CPA_STATUS_SUCCESS;
    }
    res->status = CPA_DC_OK;
    res->consumed = in->dataLenInBytes;
    res->produced = (uint32_t)n;
    res->endOfLastBlock = 1;
    if (r->verify) {
        BUMP(g_verified);
        if (take(&g_verify_fail)) {
            res->status = CPA_DC_VERIFY_ERROR;
            res->produced = 0;
        }
    }
    return CPA_STATUS_SUCCESS;
}

EXPORT CpaStatus icp_sal_DcPollInstance(void *h, uint32_t quota) {
    struct inst *i = instance(h);
    if (!i) return CPA_STATUS_INVALID_PARAM;
    if (!i->started) return CPA_STATUS_FAIL;
    if (i->len == 0) return CPA_STATUS_RETRY;
    uint32_t done = 0;
    while (i->len > 0 && (quota == 0 || done < quota)) {
        struct req r = i->ring[i->head];
        i->head = (i->head + 1) % STANDIN_RING;
        i->len--;
        CpaStatus st = run(i, &r);
        r.s->pending--;
        BUMP(g_completed);
        done++;
        r.s->cb(r.tag, st);
    }
    return CPA_STATUS_SUCCESS;
}
