/*
 * migr-device: a small migratable PCI device served over vfio-user with libvfio-user, the independent
 * peer of vfio-migration's vfio-user client (see README.md in this directory).
 *
 *   migr-device --socket PATH --seed N [--size BYTES] [--precopy BYTES] [--dest] [--verbose]
 *
 * The device holds SIZE bytes (default 4 MiB) generated from SEED. It offers migration v2 (STOP_COPY and
 * PRE_COPY, the only ones libvfio-user offers) through vfu_setup_device_migration_callbacks(). Its
 * migration data is one stream:
 *
 *   header  (32 bytes): "VFUPEER\0", u32 version (1), u32 0, u64 size, u64 seed      (little endian)
 *   state   (size bytes)
 *   trailer ( 8 bytes): u32 crc32 of the state, "END!"
 *
 * In PRE_COPY a read hands out the header and the first PRECOPY bytes of the state (default half), then
 * reads return nothing (the client's "short read"); STOP_COPY continues where PRE_COPY stopped (or
 * starts over when the device went there without PRE_COPY) up to the trailer.
 *
 * RESUMING takes the stream in writes of any size; a write that does not fit it (bad magic, version,
 * size, too many bytes) fails with EINVAL. RESUMING -> STOP checks the whole stream: header, length,
 * trailer CRC, and every byte against the state generated from --seed (with --dest the device starts
 * empty and --seed is the state it expects to receive). A bad or incomplete load fails that transition
 * with EINVAL (until the client resets the device).
 *
 * What a test observes, one line each on stdout (flushed):
 *   PEER-READY role=source|dest socket=PATH seed=N size=S crc=XXXXXXXX   the socket listens
 *   PEER-SAVED precopy=A stopcopy=B total=T                              the source handed out its stream
 *   PEER-STATE ok crc=XXXXXXXX bytes=S seed=N                            a load checked out
 *   PEER-STATE BAD <reason>                                              a load was refused
 *   PEER-RESET <reason>                                                  a reset (the state is cleared on dest)
 *   PEER-EXIT verdict=ok|BAD|none crc=XXXXXXXX                           the client disconnected
 * and BAR0 (4 KiB, read-only): 0x00 u32 magic 0x56555044 ("DPUV" little endian), 0x04 u32 verdict (0 none,
 * 1 ok, 2 bad, 3 loading), 0x08 u32 crc32 of the current state, 0x0c u32 stream version, 0x10 u64 seed the
 * state was generated from, 0x18 u64 size, 0x20 u64 bytes of state loaded by the last load.
 *
 * Exit status: 0, or 1 when a load was refused and none checked out afterwards; 2 on usage or setup errors.
 *
 * Written against libvfio-user's public API (libvfio-user.h) only. SPDX-License-Identifier: Apache-2.0
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "libvfio-user.h"

#define HEADER_LEN 32u
#define TRAILER_LEN 8u
#define STREAM_VERSION 1u
#define BAR0_SIZE 4096u
#define BAR0_MAGIC 0x56555044u

static const char header_magic[8] = {'V', 'F', 'U', 'P', 'E', 'E', 'R', '\0'};
static const char trailer_magic[4] = {'E', 'N', 'D', '!'};

enum verdict { VERDICT_NONE = 0, VERDICT_OK = 1, VERDICT_BAD = 2, VERDICT_LOADING = 3 };

struct peer {
    const char *socket;
    uint64_t seed;      /* the state's seed (source) or the expected one (dest) */
    uint64_t size;      /* bytes of state */
    uint64_t precopy;   /* bytes of state handed out in PRE_COPY */
    bool dest;
    bool verbose;

    uint8_t *state;
    uint32_t crc;       /* crc32 of state */
    uint64_t state_seed;
    vfu_migr_state_t cur;

    /* source side: a cursor over the stream */
    uint64_t cursor;
    uint64_t precopy_sent, stopcopy_sent;

    /* load side */
    uint8_t header[HEADER_LEN];
    uint8_t trailer[TRAILER_LEN];
    uint64_t received;  /* stream bytes received */
    bool load_failed;   /* a write was refused during this load */
    bool reset_since_resume;
    enum verdict verdict;
    bool ever_ok, ever_bad;
    uint64_t loaded;
};

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

/* ---- state generation and CRC ---- */

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void generate(uint8_t *buf, uint64_t size, uint64_t seed)
{
    uint64_t x = seed, i;
    for (i = 0; i + 8 <= size; i += 8) {
        uint64_t w = splitmix64(&x);
        memcpy(buf + i, &w, 8); /* x86-64 and the other hosts we run on are little endian */
    }
    if (i < size) {
        uint64_t w = splitmix64(&x);
        memcpy(buf + i, &w, size - i);
    }
}

static uint32_t crc_table[256];

static void crc_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) {
            c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
        }
        crc_table[n] = c;
    }
}

static uint32_t crc32_of(const uint8_t *buf, uint64_t len)
{
    uint32_t c = 0xffffffffu;
    for (uint64_t i = 0; i < len; i++) {
        c = crc_table[(c ^ buf[i]) & 0xff] ^ (c >> 8);
    }
    return c ^ 0xffffffffu;
}

static void put_u32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put_u64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static uint32_t get_u32(const uint8_t *p) { uint32_t v = 0; for (int i = 3; i >= 0; i--) v = (v << 8) | p[i]; return v; }
static uint64_t get_u64(const uint8_t *p) { uint64_t v = 0; for (int i = 7; i >= 0; i--) v = (v << 8) | p[i]; return v; }

static uint64_t stream_len(const struct peer *p) { return HEADER_LEN + p->size + TRAILER_LEN; }

/* The source's stream bytes [off, off + n). */
static void stream_read_at(const struct peer *p, uint64_t off, uint8_t *buf, uint64_t n)
{
    uint8_t header[HEADER_LEN], trailer[TRAILER_LEN];
    memcpy(header, header_magic, 8);
    put_u32(header + 8, STREAM_VERSION);
    put_u32(header + 12, 0);
    put_u64(header + 16, p->size);
    put_u64(header + 24, p->state_seed);
    put_u32(trailer, p->crc);
    memcpy(trailer + 4, trailer_magic, 4);

    while (n > 0) {
        uint64_t chunk;
        if (off < HEADER_LEN) {
            chunk = HEADER_LEN - off < n ? HEADER_LEN - off : n;
            memcpy(buf, header + off, chunk);
        } else if (off < HEADER_LEN + p->size) {
            uint64_t s = off - HEADER_LEN;
            chunk = p->size - s < n ? p->size - s : n;
            memcpy(buf, p->state + s, chunk);
        } else {
            uint64_t t = off - HEADER_LEN - p->size;
            chunk = TRAILER_LEN - t < n ? TRAILER_LEN - t : n;
            memcpy(buf, trailer + t, chunk);
        }
        buf += chunk;
        off += chunk;
        n -= chunk;
    }
}

/* ---- load ---- */

static void load_begin(struct peer *p)
{
    p->received = 0;
    p->load_failed = false;
    p->reset_since_resume = false;
    p->loaded = 0;
    p->verdict = VERDICT_LOADING;
    memset(p->state, 0, p->size);
    p->crc = crc32_of(p->state, p->size);
    p->state_seed = 0;
}

static void refuse_load(struct peer *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void refuse_load(struct peer *p, const char *fmt, ...)
{
    char reason[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(reason, sizeof(reason), fmt, ap);
    va_end(ap);
    p->load_failed = true;
    p->verdict = VERDICT_BAD;
    p->ever_bad = true;
    say("PEER-STATE BAD %s", reason);
}

static ssize_t write_data(vfu_ctx_t *ctx, void *data, uint64_t count)
{
    struct peer *p = vfu_get_private(ctx);
    const uint8_t *buf = data;
    uint64_t n = count;

    if (p->cur != VFU_MIGR_STATE_RESUME) {
        errno = EINVAL;
        return -1;
    }
    if (p->load_failed) {
        errno = EINVAL;
        return -1;
    }
    if (p->received + count > stream_len(p) || p->received + count < p->received) {
        refuse_load(p, "%" PRIu64 " bytes written past the end of the %" PRIu64 "-byte stream",
                    p->received + count - stream_len(p), stream_len(p));
        errno = EINVAL;
        return -1;
    }
    while (n > 0) {
        uint64_t off = p->received, chunk;
        if (off < HEADER_LEN) {
            chunk = HEADER_LEN - off < n ? HEADER_LEN - off : n;
            memcpy(p->header + off, buf, chunk);
            if (off + chunk == HEADER_LEN) {
                if (memcmp(p->header, header_magic, 8) != 0) {
                    refuse_load(p, "the stream does not start with this device's magic");
                    errno = EINVAL;
                    return -1;
                }
                if (get_u32(p->header + 8) != STREAM_VERSION) {
                    refuse_load(p, "stream version %" PRIu32 ", this device reads %u", get_u32(p->header + 8),
                                STREAM_VERSION);
                    errno = EINVAL;
                    return -1;
                }
                if (get_u64(p->header + 16) != p->size) {
                    refuse_load(p, "the stream holds %" PRIu64 " bytes of state, this device %" PRIu64,
                                get_u64(p->header + 16), p->size);
                    errno = EINVAL;
                    return -1;
                }
            }
        } else if (off < HEADER_LEN + p->size) {
            uint64_t s = off - HEADER_LEN;
            chunk = p->size - s < n ? p->size - s : n;
            memcpy(p->state + s, buf, chunk);
            p->loaded = s + chunk;
        } else {
            uint64_t t = off - HEADER_LEN - p->size;
            chunk = TRAILER_LEN - t < n ? TRAILER_LEN - t : n;
            memcpy(p->trailer + t, buf, chunk);
        }
        buf += chunk;
        n -= chunk;
        p->received += chunk;
    }
    return (ssize_t)count;
}

/* RESUMING -> STOP: 0 when the load checks out. */
static int load_finish(struct peer *p)
{
    if (p->load_failed) {
        say("PEER-STATE BAD the load had a refused write");
        return -1;
    }
    if (p->received != stream_len(p)) {
        refuse_load(p, "incomplete stream: %" PRIu64 " of %" PRIu64 " bytes", p->received, stream_len(p));
        return -1;
    }
    if (memcmp(p->trailer + 4, trailer_magic, 4) != 0) {
        refuse_load(p, "the stream's trailer is damaged");
        return -1;
    }
    uint32_t crc = crc32_of(p->state, p->size);
    if (crc != get_u32(p->trailer)) {
        refuse_load(p, "crc32 of the state %08" PRIx32 ", the stream says %08" PRIx32, crc, get_u32(p->trailer));
        return -1;
    }
    uint64_t seed = get_u64(p->header + 24);
    if (seed != p->seed) {
        refuse_load(p, "the stream carries the state of seed %" PRIu64 ", expected %" PRIu64, seed, p->seed);
        return -1;
    }
    uint8_t *expect = malloc(p->size ? p->size : 1);
    if (expect == NULL) {
        refuse_load(p, "out of memory for the comparison");
        return -1;
    }
    generate(expect, p->size, p->seed);
    for (uint64_t i = 0; i < p->size; i++) {
        if (p->state[i] != expect[i]) {
            free(expect);
            refuse_load(p, "byte %" PRIu64 " differs from the state of seed %" PRIu64, i, p->seed);
            return -1;
        }
    }
    free(expect);
    p->crc = crc;
    p->state_seed = seed;
    p->verdict = VERDICT_OK;
    p->ever_ok = true;
    say("PEER-STATE ok crc=%08" PRIx32 " bytes=%" PRIu64 " seed=%" PRIu64, crc, p->size, seed);
    return 0;
}

/* ---- migration callbacks ---- */

static const char *state_name(vfu_migr_state_t s)
{
    switch (s) {
    case VFU_MIGR_STATE_STOP: return "STOP";
    case VFU_MIGR_STATE_RUNNING: return "RUNNING";
    case VFU_MIGR_STATE_STOP_AND_COPY: return "STOP_COPY";
    case VFU_MIGR_STATE_PRE_COPY: return "PRE_COPY";
    case VFU_MIGR_STATE_RESUME: return "RESUMING";
    }
    return "?";
}

static int transition(vfu_ctx_t *ctx, vfu_migr_state_t to)
{
    struct peer *p = vfu_get_private(ctx);
    vfu_migr_state_t from = p->cur;

    if (p->verbose) {
        fprintf(stderr, "migr-device: %s -> %s\n", state_name(from), state_name(to));
    }
    switch (to) {
    case VFU_MIGR_STATE_PRE_COPY:
        p->cursor = 0;
        p->precopy_sent = p->stopcopy_sent = 0;
        break;
    case VFU_MIGR_STATE_STOP_AND_COPY:
        if (from != VFU_MIGR_STATE_PRE_COPY) {
            p->cursor = 0;
            p->precopy_sent = p->stopcopy_sent = 0;
        }
        break;
    case VFU_MIGR_STATE_RESUME:
        load_begin(p);
        break;
    case VFU_MIGR_STATE_STOP:
        if (from == VFU_MIGR_STATE_STOP_AND_COPY) {
            say("PEER-SAVED precopy=%" PRIu64 " stopcopy=%" PRIu64 " total=%" PRIu64 "%s", p->precopy_sent,
                p->stopcopy_sent, p->cursor, p->cursor == stream_len(p) ? "" : " (incomplete)");
        } else if (from == VFU_MIGR_STATE_RESUME) {
            if (p->reset_since_resume) {
                /* the client reset the device after a failed load: leave RESUMING with the empty state */
                p->verdict = VERDICT_NONE;
            } else if (load_finish(p) != 0) {
                errno = EINVAL;
                return -1;
            }
        }
        break;
    case VFU_MIGR_STATE_RUNNING:
        break;
    }
    p->cur = to;
    return 0;
}

static ssize_t read_data(vfu_ctx_t *ctx, void *buf, uint64_t count)
{
    struct peer *p = vfu_get_private(ctx);
    uint64_t limit;

    if (p->cur == VFU_MIGR_STATE_PRE_COPY) {
        limit = HEADER_LEN + p->precopy;
    } else if (p->cur == VFU_MIGR_STATE_STOP_AND_COPY) {
        limit = stream_len(p);
    } else {
        errno = EINVAL;
        return -1;
    }
    uint64_t n = p->cursor < limit ? limit - p->cursor : 0;
    if (n > count) {
        n = count;
    }
    stream_read_at(p, p->cursor, buf, n);
    p->cursor += n;
    if (p->cur == VFU_MIGR_STATE_PRE_COPY) {
        p->precopy_sent += n;
    } else {
        p->stopcopy_sent += n;
    }
    return (ssize_t)n;
}

/* ---- BAR0, reset, log ---- */

static ssize_t bar0_access(vfu_ctx_t *ctx, char *buf, size_t count, loff_t offset, bool is_write)
{
    struct peer *p = vfu_get_private(ctx);
    uint8_t regs[64];

    if (is_write || offset < 0 || (uint64_t)offset > BAR0_SIZE || count > BAR0_SIZE - (uint64_t)offset) {
        errno = EINVAL;
        return -1;
    }
    memset(regs, 0, sizeof(regs));
    put_u32(regs + 0x00, BAR0_MAGIC);
    put_u32(regs + 0x04, p->verdict);
    put_u32(regs + 0x08, p->crc);
    put_u32(regs + 0x0c, STREAM_VERSION);
    put_u64(regs + 0x10, p->state_seed);
    put_u64(regs + 0x18, p->size);
    put_u64(regs + 0x20, p->loaded);
    for (size_t i = 0; i < count; i++) {
        uint64_t o = (uint64_t)offset + i;
        buf[i] = o < sizeof(regs) ? (char)regs[o] : 0;
    }
    return (ssize_t)count;
}

static int reset(vfu_ctx_t *ctx, vfu_reset_type_t type)
{
    struct peer *p = vfu_get_private(ctx);
    if (type == VFU_RESET_LOST_CONN) {
        return 0; /* the verdict outlives the connection: printed at exit */
    }
    say("PEER-RESET %s", type == VFU_RESET_DEVICE ? "device" : "flr");
    p->cursor = 0;
    if (p->cur == VFU_MIGR_STATE_RESUME) {
        p->reset_since_resume = true;
        p->load_failed = false;
    }
    if (p->dest || p->verdict == VERDICT_BAD || p->verdict == VERDICT_LOADING) {
        /* a device that was loading holds no usable state after a reset */
        memset(p->state, 0, p->size);
        p->crc = crc32_of(p->state, p->size);
        p->state_seed = 0;
        p->loaded = 0;
        if (p->verdict != VERDICT_OK) {
            p->verdict = VERDICT_NONE;
        }
    }
    return 0;
}

/* libvfio-user's messages on stderr; at most 20 of them unless --verbose (a desynchronised
 * connection makes it log one line per garbage "header"). */
static void log_fn(vfu_ctx_t *ctx, int level, const char *msg)
{
    static unsigned logged;
    struct peer *p = ctx != NULL ? vfu_get_private(ctx) : NULL;
    if ((p == NULL || !p->verbose) && ++logged > 20) {
        if (logged == 21) {
            fprintf(stderr, "libvfio-user: further messages suppressed (use --verbose)\n");
        }
        return;
    }
    fprintf(stderr, "libvfio-user[%d]: %s\n", level, msg);
}

/* ---- main ---- */

static void usage(void)
{
    fprintf(stderr,
            "usage: migr-device --socket PATH --seed N [--size BYTES] [--precopy BYTES] [--dest] [--verbose]\n"
            "  BYTES takes a K, M or G suffix; --size defaults to 4M, --precopy to half of it\n");
    exit(2);
}

static uint64_t parse_bytes(const char *s, const char *what)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    uint64_t mult = 1;
    if (*end == 'K' || *end == 'k') {
        mult = 1ull << 10, end++;
    } else if (*end == 'M' || *end == 'm') {
        mult = 1ull << 20, end++;
    } else if (*end == 'G' || *end == 'g') {
        mult = 1ull << 30, end++;
    }
    if (errno != 0 || end == s || *end != '\0' || s[0] == '-' || v > UINT64_MAX / mult) {
        fprintf(stderr, "migr-device: bad %s: %s\n", what, s);
        usage();
    }
    return v * mult;
}

static int fail(const char *what)
{
    fprintf(stderr, "migr-device: %s: %s\n", what, strerror(errno));
    return 2;
}

int main(int argc, char **argv)
{
    struct peer p;
    bool have_seed = false, have_precopy = false;

    memset(&p, 0, sizeof(p));
    p.size = 4ull << 20;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--dest") == 0) {
            p.dest = true;
        } else if (strcmp(a, "--verbose") == 0) {
            p.verbose = true;
        } else if (i + 1 < argc && strcmp(a, "--socket") == 0) {
            p.socket = argv[++i];
        } else if (i + 1 < argc && strcmp(a, "--seed") == 0) {
            p.seed = parse_bytes(argv[++i], "--seed");
            have_seed = true;
        } else if (i + 1 < argc && strcmp(a, "--size") == 0) {
            p.size = parse_bytes(argv[++i], "--size");
        } else if (i + 1 < argc && strcmp(a, "--precopy") == 0) {
            p.precopy = parse_bytes(argv[++i], "--precopy");
            have_precopy = true;
        } else {
            usage();
        }
    }
    if (p.socket == NULL || !have_seed || p.size == 0) {
        usage();
    }
    if (!have_precopy) {
        p.precopy = p.size / 2;
    }
    if (p.precopy > p.size) {
        fprintf(stderr, "migr-device: --precopy is larger than --size\n");
        return 2;
    }

    crc_init();
    p.state = malloc(p.size);
    if (p.state == NULL) {
        return fail("allocating the state");
    }
    if (p.dest) {
        memset(p.state, 0, p.size);
        p.state_seed = 0;
    } else {
        generate(p.state, p.size, p.seed);
        p.state_seed = p.seed;
    }
    p.crc = crc32_of(p.state, p.size);
    p.cur = VFU_MIGR_STATE_RUNNING;

    struct stat st;
    if (stat(p.socket, &st) == 0 && S_ISSOCK(st.st_mode)) {
        unlink(p.socket); /* a stale socket from an earlier run */
    }

    vfu_ctx_t *ctx = vfu_create_ctx(VFU_TRANS_SOCK, p.socket, 0, &p, VFU_DEV_TYPE_PCI);
    if (ctx == NULL) {
        return fail("vfu_create_ctx");
    }
    if (vfu_setup_log(ctx, log_fn, p.verbose ? LOG_DEBUG : LOG_ERR) < 0) {
        return fail("vfu_setup_log");
    }
    if (vfu_pci_init(ctx, VFU_PCI_TYPE_CONVENTIONAL, PCI_HEADER_TYPE_NORMAL, 0) < 0) {
        return fail("vfu_pci_init");
    }
    vfu_pci_set_id(ctx, 0x1b36, 0x10ff, 0x1b36, 0x0001); /* Red Hat's QEMU vendor id, a test-only device id */
    vfu_pci_set_class(ctx, 0xff, 0x00, 0x00);
    if (vfu_setup_region(ctx, VFU_PCI_DEV_BAR0_REGION_IDX, BAR0_SIZE, bar0_access, VFU_REGION_FLAG_RW | VFU_REGION_FLAG_MEM,
                         NULL, 0, -1, 0) < 0) {
        return fail("vfu_setup_region BAR0");
    }
    if (vfu_setup_device_reset_cb(ctx, reset) < 0) {
        return fail("vfu_setup_device_reset_cb");
    }
    /* DMA must be set up for the DMA logging features the client may probe. */
    if (vfu_setup_device_dma(ctx, LIBVFIO_USER_MAX_DMA_REGIONS, NULL, NULL) < 0) {
        return fail("vfu_setup_device_dma");
    }
    const vfu_migration_callbacks_t callbacks = {
        .version = VFU_MIGR_CALLBACKS_VERS,
        .transition = transition,
        .read_data = read_data,
        .write_data = write_data,
    };
    if (vfu_setup_device_migration_callbacks(ctx, &callbacks) < 0) {
        return fail("vfu_setup_device_migration_callbacks");
    }
    if (vfu_realize_ctx(ctx) < 0) {
        return fail("vfu_realize_ctx");
    }
    say("PEER-READY role=%s socket=%s seed=%" PRIu64 " size=%" PRIu64 " crc=%08" PRIx32, p.dest ? "dest" : "source",
        p.socket, p.seed, p.size, p.crc);

    if (vfu_attach_ctx(ctx) < 0) {
        return fail("vfu_attach_ctx");
    }
    int ret;
    do {
        ret = vfu_run_ctx(ctx);
    } while (ret >= 0 || errno == EINTR);
    if (errno != ENOTCONN && errno != ESHUTDOWN) {
        fprintf(stderr, "migr-device: vfu_run_ctx: %s\n", strerror(errno));
    }

    const char *v = p.verdict == VERDICT_OK ? "ok" : p.ever_bad ? "BAD" : "none";
    say("PEER-EXIT verdict=%s crc=%08" PRIx32, v, p.crc);
    vfu_destroy_ctx(ctx);
    free(p.state);
    return p.verdict != VERDICT_OK && p.ever_bad ? 1 : 0;
}
