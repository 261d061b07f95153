/*
 * migr-client: a small vfio-user migration client on libvfio-user's own message framing, the independent
 * peer of vfio-migration's vfio-user server (`vfio-mig serve`, see README.md in this directory).
 *
 *   migr-client migrate --from SOCKET --to SOCKET [--save FILE] [options]
 *   migr-client save --from SOCKET --out FILE [options]
 *   migr-client load --to SOCKET --in FILE [--reset-first] [options]
 *   migr-client garbage --socket SOCKET [options]
 *   migr-client garbage --count
 *
 *   options: --read-chunk BYTES (default 64K) --write-chunk BYTES (default 32K) --no-precopy
 *            --timeout SECONDS (default 30) --verbose
 *
 * Every message goes through libvfio-user's transport (lib/tran_sock.c: tran_sock_send_iovec,
 * tran_sock_recv, tran_sock_recv_alloc, tran_sock_msg_iovec) and the capabilities are parsed with its
 * tran_parse_version_json() (lib/tran.c), as its samples/client.c does; the messages are the structs of
 * its include/vfio-user.h. Nothing of libvfio-user is copied here: build.sh compiles this file against
 * the library's source tree and links its static archive.
 *
 * save: VFIO_USER_VERSION (JSON capabilities; the server's max_data_xfer_size, and max_msg_size when it
 * gives one, bound every message), DEVICE_FEATURE PROBE and GET of MIGRATION (STOP_COPY needed; P2P must
 * not be offered), RUNNING -> PRE_COPY (when offered and not --no-precopy), MIG_DATA_READ until a reply
 * shorter than asked, PRE_COPY -> STOP_COPY, MIG_DATA_READ until a short reply, STOP_COPY -> STOP.
 * load: (with --reset-first: VFIO_USER_DEVICE_RESET, then RESUMING -> STOP -> RUNNING when the reset left
 * the device RESUMING, as after a refused load) RUNNING -> STOP -> RESUMING, MIG_DATA_WRITE in chunks (at most --write-chunk, the server's
 * max_data_xfer_size and what fits max_msg_size), RESUMING -> STOP -> RUNNING. Only single arcs of the
 * migration v2 state machine are asked for. migrate: save from --from into memory, then load into --to.
 *
 * garbage: damaged and wrong messages, one connection each (see `cases` below): bad headers, a message
 * over the server's cap, a truncated message, commands before the version, a bad version, an unknown
 * command, bad features and states, reads and writes outside a session, garbage MIG_DATA_WRITEs in
 * RESUMING (after which the client resets the device and sets it RUNNING). Each must get an error reply
 * or make the server drop the connection (a success fails the run; a silent server fails after
 * --timeout). After an error reply a valid request tells whether the server kept the connection (it
 * must then answer it, and find the device RUNNING). Then one good connection must still negotiate and
 * find the device RUNNING.
 * `garbage --count` prints how many connections the garbage mode makes.
 *
 * Output on stdout, one line each (flushed):
 *   MIGR-CLIENT-CASE name=NAME result=error errno=N conn=kept|dropped   garbage: one case, answered
 *   MIGR-CLIENT-CASE name=NAME result=dropped conn=dropped              garbage: one case, unanswered
 *   MIGR-CLIENT ok mode=save|load|migrate bytes=N precopy=P stopcopy=S reads=R writes=W
 *                  read_chunk=X write_chunk=Y max_data_xfer_size=M max_msg_size=Z
 *   MIGR-CLIENT ok mode=garbage cases=N errors=E dropped=D connections=C
 *                  (dropped: connections the server closed; connections: all it made, the good one too)
 *   MIGR-CLIENT FAIL <reason>
 * Exit status: 0 ok, 1 a failure (the FAIL line says which), 2 usage or setup errors.
 *
 * SPDX-License-Identifier: Apache-2.0
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include <json.h>

#include "libvfio-user.h"
#include "vfio-user.h"
/* libvfio-user internals (lib/), as samples/client.c uses them. */
#include "tran_sock.h"

#define CLIENT_MAX_DATA_XFER_SIZE (1u << 20)
/* Our own cap on a whole migration stream held in memory. */
#define MAX_STREAM (1ull << 32)

static unsigned timeout_s = 30;
static bool verbose;
static uint16_t next_msg_id = 1;

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

static void note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void note(const char *fmt, ...)
{
    va_list ap;
    if (!verbose) {
        return;
    }
    va_start(ap, fmt);
    fputs("migr-client: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("MIGR-CLIENT FAIL ", stdout);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
    exit(1);
}

static void usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void usage_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("migr-client: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputs("\nusage: migr-client migrate --from SOCKET --to SOCKET [--save FILE] | save --from SOCKET --out FILE"
          " | load --to SOCKET --in FILE [--reset-first] | garbage --socket SOCKET | garbage --count\n"
          "       [--read-chunk BYTES] [--write-chunk BYTES] [--no-precopy] [--timeout SECONDS] [--verbose]\n",
          stderr);
    va_end(ap);
    exit(2);
}

/* One connection to a vfio-user server and what it negotiated. */
struct conn {
    int fd;
    const char *path;
    size_t max_data_xfer_size; /* the server's */
    size_t max_msg_size;       /* the server's, 0 when it gave none */
    int max_msg_fds;
    size_t pgsize;
    uint16_t minor;
    bool negotiated;
};

static int connect_socket(const char *path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    struct timeval tv = {.tv_sec = timeout_s};
    int fd;

    if (strlen(path) >= sizeof(addr.sun_path)) {
        fail("socket path %s is too long", path);
    }
    strcpy(addr.sun_path, path);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        fail("socket: %s", strerror(errno));
    }
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) < 0) {
        fail("setsockopt: %s", strerror(errno));
    }
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        fail("connect %s: %s", path, strerror(errno));
    }
    return fd;
}

/* Send VFIO_USER_VERSION with our capabilities; returns 0 or -1 (errno set, hdr the reply's header). */
static int send_version(int fd, uint16_t major, uint16_t minor, const char *json, struct vfio_user_header *hdr,
                        void **reply, size_t *reply_len)
{
    struct vfio_user_version v = {.major = major, .minor = minor};
    struct iovec iov[3] = {{0}, {.iov_base = &v, .iov_len = sizeof(v)}, {.iov_base = (void *)json}};
    uint16_t id = next_msg_id++;

    iov[2].iov_len = strlen(json) + 1; /* with the NUL */
    if (tran_sock_send_iovec(fd, id, false, VFIO_USER_VERSION, iov, 3, NULL, 0, 0) < 0) {
        return -1;
    }
    memset(hdr, 0, sizeof(*hdr));
    return tran_sock_recv_alloc(fd, hdr, true, &id, reply, reply_len);
}

static void negotiate(struct conn *c)
{
    char caps[256];
    struct vfio_user_header hdr;
    struct vfio_user_version *sv = NULL;
    size_t len = 0;

    snprintf(caps, sizeof(caps), "{\"capabilities\":{\"max_msg_fds\":0,\"max_data_xfer_size\":%u}}",
             CLIENT_MAX_DATA_XFER_SIZE);
    if (send_version(c->fd, LIB_VFIO_USER_MAJOR, LIB_VFIO_USER_MINOR, caps, &hdr, (void **)&sv, &len) < 0) {
        fail("%s: VFIO_USER_VERSION: %s", c->path, strerror(errno));
    }
    if (hdr.cmd != VFIO_USER_VERSION) {
        fail("%s: version reply for command %u", c->path, hdr.cmd);
    }
    if (len < sizeof(*sv)) {
        fail("%s: version reply of %zu bytes", c->path, len);
    }
    if (sv->major != LIB_VFIO_USER_MAJOR || sv->minor > LIB_VFIO_USER_MINOR) {
        fail("%s: server version %u.%u (we speak %u.%u)", c->path, sv->major, sv->minor, LIB_VFIO_USER_MAJOR,
             LIB_VFIO_USER_MINOR);
    }
    c->minor = sv->minor;
    c->negotiated = true;
    c->max_msg_fds = 1;
    c->max_data_xfer_size = VFIO_USER_DEFAULT_MAX_DATA_XFER_SIZE;
    c->max_msg_size = 0;
    c->pgsize = (size_t)sysconf(_SC_PAGESIZE);
    if (len > sizeof(*sv)) {
        const char *json = (const char *)sv->data;
        size_t jlen = len - sizeof(*sv);
        struct json_object *top, *jcaps, *jo;

        if (json[jlen - 1] != '\0') {
            fail("%s: version JSON not NUL-terminated", c->path);
        }
        if (tran_parse_version_json(json, &c->max_msg_fds, &c->max_data_xfer_size, &c->pgsize, NULL) < 0) {
            fail("%s: bad version JSON %s: %s", c->path, json, strerror(errno));
        }
        /* max_msg_size is not one libvfio-user parses; take it when a server gives it. */
        top = json_tokener_parse(json);
        if (top != NULL && json_object_object_get_ex(top, "capabilities", &jcaps) &&
            json_object_object_get_ex(jcaps, "max_msg_size", &jo) && json_object_get_type(jo) == json_type_int) {
            int64_t v = json_object_get_int64(jo);
            if (v < (int64_t)(sizeof(struct vfio_user_header) + 64)) {
                fail("%s: max_msg_size %" PRId64 " too small", c->path, v);
            }
            c->max_msg_size = (size_t)v;
        }
        if (top != NULL) {
            json_object_put(top);
        }
        note("%s: server capabilities %s", c->path, json);
    }
    if (c->max_data_xfer_size == 0) {
        fail("%s: max_data_xfer_size 0", c->path);
    }
    free(sv);
}

static struct conn open_conn(const char *path)
{
    struct conn c = {.fd = connect_socket(path), .path = path};
    negotiate(&c);
    return c;
}

/*
 * One request and its reply: of exactly reply_len bytes (tran_sock_msg_iovec: a longer or shorter reply
 * fails), or, with reply NULL, of any length (discarded). Returns 0, or the error reply's errno, or -1 on
 * a transport failure (errno set).
 */
static int request(struct conn *c, enum vfio_user_command cmd, struct iovec *iov, size_t n, void *reply,
                   size_t reply_len)
{
    struct vfio_user_header hdr = {0};
    uint16_t id = next_msg_id++;
    int r;
    if (reply != NULL) {
        r = tran_sock_msg_iovec(c->fd, id, cmd, iov, n, NULL, 0, &hdr, reply, reply_len, NULL, NULL);
    } else {
        void *body = NULL;
        size_t len = 0;
        r = tran_sock_send_iovec(c->fd, id, false, cmd, iov, n, NULL, 0, 0);
        if (r == 0) {
            r = tran_sock_recv_alloc(c->fd, &hdr, true, &id, &body, &len);
            free(body);
        }
    }
    if (r == 0) {
        return 0;
    }
    if (hdr.flags & VFIO_USER_F_ERROR) {
        return errno;
    }
    return -1;
}

/* DEVICE_FEATURE: PROBE of MIGRATION, then GET of its flags. */
static uint64_t migration_flags(struct conn *c)
{
    struct vfio_user_device_feature req = {.argsz = sizeof(req),
                                           .flags = VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_GET |
                                                    VFIO_DEVICE_FEATURE_MIGRATION};
    struct {
        struct vfio_user_device_feature f;
        struct vfio_user_device_feature_migration m;
    } __attribute__((packed)) reply;
    struct iovec iov[2] = {{0}, {.iov_base = &req, .iov_len = sizeof(req)}};
    int r = request(c, VFIO_USER_DEVICE_FEATURE, iov, 2, &reply, sizeof(reply.f));
    if (r != 0) {
        fail("%s: DEVICE_FEATURE PROBE MIGRATION: %s", c->path, strerror(r < 0 ? errno : r));
    }
    if (reply.f.flags != req.flags) {
        fail("%s: PROBE MIGRATION answered flags %#x", c->path, reply.f.flags);
    }
    req.argsz = sizeof(reply);
    req.flags = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION;
    r = request(c, VFIO_USER_DEVICE_FEATURE, iov, 2, &reply, sizeof(reply));
    if (r != 0) {
        fail("%s: DEVICE_FEATURE GET MIGRATION: %s", c->path, strerror(r < 0 ? errno : r));
    }
    if (reply.f.flags != req.flags) {
        fail("%s: GET MIGRATION answered flags %#x", c->path, reply.f.flags);
    }
    if (!(reply.m.flags & VFIO_MIGRATION_STOP_COPY)) {
        fail("%s: migration flags %#" PRIx64 " lack STOP_COPY", c->path, (uint64_t)reply.m.flags);
    }
    if (reply.m.flags & VFIO_MIGRATION_P2P) {
        fail("%s: migration flags %#" PRIx64 " offer P2P, which vfio-user does not use", c->path,
             (uint64_t)reply.m.flags);
    }
    note("%s: migration flags %#" PRIx64, c->path, (uint64_t)reply.m.flags);
    return reply.m.flags;
}

struct mig_state_msg {
    struct vfio_user_device_feature f;
    struct vfio_user_device_feature_mig_state s;
} __attribute__((packed));

/* SET MIG_DEVICE_STATE; returns 0, an error reply's errno, or -1 (transport). */
static int try_set_state(struct conn *c, uint32_t state)
{
    struct mig_state_msg req = {
        .f = {.argsz = sizeof(req), .flags = VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE},
        .s = {.device_state = state, .data_fd = UINT32_MAX}};
    struct mig_state_msg reply;
    struct iovec iov[2] = {{0}, {.iov_base = &req, .iov_len = sizeof(req)}};
    int r = request(c, VFIO_USER_DEVICE_FEATURE, iov, 2, &reply, sizeof(reply));
    if (r == 0 && (reply.f.flags != req.f.flags || reply.s.device_state != state)) {
        fail("%s: SET MIG_DEVICE_STATE %u answered flags %#x state %u", c->path, state, reply.f.flags,
             reply.s.device_state);
    }
    return r;
}

static void set_state(struct conn *c, uint32_t state)
{
    int r = try_set_state(c, state);
    if (r != 0) {
        fail("%s: SET MIG_DEVICE_STATE %u: %s", c->path, state, strerror(r < 0 ? errno : r));
    }
    note("%s: state %u", c->path, state);
}

/* GET MIG_DEVICE_STATE; returns the state, or fails. */
static uint32_t get_state(struct conn *c)
{
    struct mig_state_msg req = {
        .f = {.argsz = sizeof(req), .flags = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE}};
    struct mig_state_msg reply;
    struct iovec iov[2] = {{0}, {.iov_base = &req.f, .iov_len = sizeof(req.f)}};
    int r = request(c, VFIO_USER_DEVICE_FEATURE, iov, 2, &reply, sizeof(reply));
    if (r != 0) {
        fail("%s: GET MIG_DEVICE_STATE: %s", c->path, strerror(r < 0 ? errno : r));
    }
    return reply.s.device_state;
}

static size_t min_size(size_t a, size_t b)
{
    return a < b ? a : b;
}

/* The largest data chunk of a read (its reply must also fit libvfio-user's reply cap). */
static size_t read_chunk(const struct conn *c, size_t want)
{
    size_t n = min_size(want, c->max_data_xfer_size);
    n = min_size(n, VFIO_USER_DEFAULT_MAX_DATA_XFER_SIZE); /* tran_sock_recv's SERVER_MAX_DATA_XFER_SIZE */
    if (c->max_msg_size) {
        n = min_size(n, c->max_msg_size - sizeof(struct vfio_user_header) - sizeof(struct vfio_user_mig_data));
    }
    return n;
}

static size_t write_chunk(const struct conn *c, size_t want)
{
    size_t n = min_size(want, c->max_data_xfer_size);
    if (c->max_msg_size) {
        n = min_size(n, c->max_msg_size - sizeof(struct vfio_user_header) - sizeof(struct vfio_user_mig_data));
    }
    return n;
}

/*
 * MIG_DATA_READ of up to len bytes into buf. Returns the bytes of data (a reply may be padded to the
 * length asked for: `size` tells the data), or -(errno of an error reply), or fails on a transport error.
 */
static ssize_t mig_read(struct conn *c, void *buf, size_t len)
{
    struct vfio_user_mig_data req = {.argsz = sizeof(req) + len, .size = len};
    struct iovec iov[2] = {{0}, {.iov_base = &req, .iov_len = sizeof(req)}};
    struct vfio_user_header hdr = {0};
    struct vfio_user_mig_data *res = NULL;
    size_t res_len = 0;
    uint16_t id = next_msg_id++;
    ssize_t got;

    if (tran_sock_send_iovec(c->fd, id, false, VFIO_USER_MIG_DATA_READ, iov, 2, NULL, 0, 0) < 0) {
        fail("%s: MIG_DATA_READ send: %s", c->path, strerror(errno));
    }
    if (tran_sock_recv_alloc(c->fd, &hdr, true, &id, (void **)&res, &res_len) < 0) {
        if (hdr.flags & VFIO_USER_F_ERROR) {
            return -(ssize_t)errno;
        }
        fail("%s: MIG_DATA_READ reply: %s", c->path, strerror(errno));
    }
    if (hdr.cmd != VFIO_USER_MIG_DATA_READ || res_len < sizeof(*res) || res->size > len ||
        res_len < sizeof(*res) + res->size || res->argsz < sizeof(*res) + res->size) {
        fail("%s: bad MIG_DATA_READ reply (cmd %u, %zu bytes, argsz %u, size %u for %zu asked)", c->path, hdr.cmd,
             res_len, res ? res->argsz : 0, res ? res->size : 0, len);
    }
    memcpy(buf, res->data, res->size);
    got = res->size;
    free(res);
    return got;
}

/* MIG_DATA_WRITE of len bytes (size_field in its `size`); returns as request() does. */
static int mig_write(struct conn *c, const void *buf, size_t len, uint32_t size_field)
{
    struct vfio_user_mig_data req = {.argsz = sizeof(req) + len, .size = size_field};
    struct iovec iov[3] = {{0}, {.iov_base = &req, .iov_len = sizeof(req)}, {.iov_base = (void *)buf, .iov_len = len}};
    return request(c, VFIO_USER_MIG_DATA_WRITE, iov, 3, NULL, 0);
}

struct stream {
    uint8_t *data;
    size_t len, cap;
    size_t precopy, stopcopy;
    unsigned reads, writes;
    size_t read_chunk, write_chunk;
    size_t max_data_xfer_size, max_msg_size;
};

static size_t opt_read_chunk = 64 << 10;
static size_t opt_write_chunk = 32 << 10;
static bool opt_no_precopy;

/* MIG_DATA_READ until a reply shorter than asked; returns the bytes read. */
static size_t read_phase(struct conn *c, struct stream *s)
{
    size_t chunk = read_chunk(c, opt_read_chunk);
    size_t total = 0;
    for (;;) {
        ssize_t n;
        if (s->cap - s->len < chunk) {
            size_t cap = s->cap ? s->cap * 2 : 1 << 20;
            while (cap - s->len < chunk) {
                cap *= 2;
            }
            if (cap > MAX_STREAM || (s->data = realloc(s->data, cap)) == NULL) {
                fail("%s: migration data over %zu bytes", c->path, cap);
            }
            s->cap = cap;
        }
        n = mig_read(c, s->data + s->len, chunk);
        if (n < 0) {
            fail("%s: MIG_DATA_READ: %s", c->path, strerror((int)-n));
        }
        s->reads++;
        s->len += (size_t)n;
        total += (size_t)n;
        if ((size_t)n < chunk) {
            break;
        }
    }
    s->read_chunk = chunk;
    return total;
}

static void save(const char *path, struct stream *s)
{
    struct conn c = open_conn(path);
    uint64_t flags = migration_flags(&c);
    uint32_t st = get_state(&c);

    if (st != VFIO_USER_DEVICE_STATE_RUNNING) {
        fail("%s: source in state %u, not RUNNING", path, st);
    }
    s->max_data_xfer_size = c.max_data_xfer_size;
    s->max_msg_size = c.max_msg_size;
    if ((flags & VFIO_MIGRATION_PRE_COPY) && !opt_no_precopy) {
        set_state(&c, VFIO_USER_DEVICE_STATE_PRE_COPY);
        s->precopy = read_phase(&c, s);
        set_state(&c, VFIO_USER_DEVICE_STATE_STOP_COPY);
    } else {
        set_state(&c, VFIO_USER_DEVICE_STATE_STOP);
        set_state(&c, VFIO_USER_DEVICE_STATE_STOP_COPY);
    }
    s->stopcopy = read_phase(&c, s);
    set_state(&c, VFIO_USER_DEVICE_STATE_STOP);
    close(c.fd);
}

static bool opt_reset_first;
static void recover(struct conn *c);

static void load(const char *path, struct stream *s)
{
    struct conn c = open_conn(path);
    size_t chunk, off;
    uint32_t st;
    int r;

    migration_flags(&c);
    if (opt_reset_first) {
        recover(&c);
    }
    st = get_state(&c);
    if (st != VFIO_USER_DEVICE_STATE_RUNNING && st != VFIO_USER_DEVICE_STATE_STOP) {
        fail("%s: destination in state %u, not RUNNING or STOP", path, st);
    }
    if (st == VFIO_USER_DEVICE_STATE_RUNNING) {
        set_state(&c, VFIO_USER_DEVICE_STATE_STOP);
    }
    set_state(&c, VFIO_USER_DEVICE_STATE_RESUMING);
    chunk = write_chunk(&c, opt_write_chunk);
    for (off = 0; off < s->len; off += chunk) {
        size_t n = min_size(chunk, s->len - off);
        if ((r = mig_write(&c, s->data + off, n, (uint32_t)n)) != 0) {
            fail("%s: MIG_DATA_WRITE at %zu (%zu bytes): %s", path, off, n, strerror(r < 0 ? errno : r));
        }
        s->writes++;
    }
    set_state(&c, VFIO_USER_DEVICE_STATE_STOP);
    set_state(&c, VFIO_USER_DEVICE_STATE_RUNNING);
    s->write_chunk = chunk;
    if (s->max_data_xfer_size == 0) {
        s->max_data_xfer_size = c.max_data_xfer_size;
        s->max_msg_size = c.max_msg_size;
    }
    close(c.fd);
}

static void report(const char *mode, const struct stream *s)
{
    say("MIGR-CLIENT ok mode=%s bytes=%zu precopy=%zu stopcopy=%zu reads=%u writes=%u read_chunk=%zu "
        "write_chunk=%zu max_data_xfer_size=%zu max_msg_size=%zu",
        mode, s->len, s->precopy, s->stopcopy, s->reads, s->writes, s->read_chunk, s->write_chunk,
        s->max_data_xfer_size, s->max_msg_size);
}

static void write_file(const char *file, const struct stream *s)
{
    FILE *f = fopen(file, "wb");
    if (f == NULL || (s->len && fwrite(s->data, 1, s->len, f) != s->len) || fclose(f) != 0) {
        fail("writing %s: %s", file, strerror(errno));
    }
}

static void read_file(const char *file, struct stream *s)
{
    FILE *f = fopen(file, "rb");
    long n;
    if (f == NULL || fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fail("reading %s: %s", file, strerror(errno));
    }
    s->len = s->cap = (size_t)n;
    s->data = malloc(s->len ? s->len : 1);
    if (s->data == NULL || (s->len && fread(s->data, 1, s->len, f) != s->len)) {
        fail("reading %s: %s", file, strerror(errno));
    }
    fclose(f);
}

/* ---- garbage ---------------------------------------------------------------------------------------- */

/* How a case ended: the server's error reply (errno), a dropped connection, or a success (wrong). */
enum outcome { OUT_ERROR, OUT_DROPPED, OUT_SUCCESS };

struct result {
    enum outcome out;
    int err;
};

/* Read the reply to a message we sent raw: classify it. */
static struct result await_reply(struct conn *c, uint16_t id)
{
    struct vfio_user_header hdr = {0};
    void *body = NULL;
    size_t len = 0;
    int r = tran_sock_recv_alloc(c->fd, &hdr, true, &id, &body, &len);
    free(body);
    if (r == 0) {
        return (struct result){OUT_SUCCESS, 0};
    }
    if (hdr.flags & VFIO_USER_F_ERROR) {
        return (struct result){OUT_ERROR, errno};
    }
    if (errno == ENOMSG || errno == ECONNRESET || errno == EPIPE) {
        return (struct result){OUT_DROPPED, errno};
    }
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
        fail("%s: no answer within %u s (the server neither replied nor dropped the connection)", c->path,
             timeout_s);
    }
    fail("%s: reading the reply: %s", c->path, strerror(errno));
}

/* Send raw bytes (a header we made ourselves, and what follows); a send the server refused is a drop. */
static bool send_raw(struct conn *c, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    while (len > 0) {
        ssize_t n = send(c->fd, p, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EPIPE || errno == ECONNRESET) {
                return false;
            }
            fail("%s: send: %s", c->path, strerror(errno));
        }
        p += n;
        len -= (size_t)n;
    }
    return true;
}

static struct result raw_message(struct conn *c, uint16_t cmd, uint32_t msg_size, uint32_t flags, const void *body,
                                 size_t body_len)
{
    struct vfio_user_header hdr = {.msg_id = next_msg_id++, .cmd = cmd, .msg_size = msg_size, .flags = flags};
    if (!send_raw(c, &hdr, sizeof(hdr)) || (body_len && !send_raw(c, body, body_len))) {
        return (struct result){OUT_DROPPED, EPIPE};
    }
    return await_reply(c, hdr.msg_id);
}

/* A request through libvfio-user's transport whose reply we classify (any reply length). */
static struct result framed(struct conn *c, enum vfio_user_command cmd, const void *body, size_t len)
{
    uint16_t id = next_msg_id++;
    if (tran_sock_send(c->fd, id, false, cmd, (void *)body, len) < 0) {
        if (errno == ECONNRESET) {
            return (struct result){OUT_DROPPED, errno};
        }
        fail("%s: send: %s", c->path, strerror(errno));
    }
    return await_reply(c, id);
}

static struct conn raw_conn(const char *path)
{
    struct conn c = {.fd = connect_socket(path), .path = path};
    return c;
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint8_t rnd_byte(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint8_t)(rng >> 24);
}

/* Each case: on its own connection; returns its result (the connection is closed by the caller). */
static struct result case_reply_flag(struct conn *c)
{
    return raw_message(c, VFIO_USER_VERSION, sizeof(struct vfio_user_header), VFIO_USER_F_TYPE_REPLY, NULL, 0);
}

static struct result case_short_size(struct conn *c)
{
    return raw_message(c, VFIO_USER_VERSION, 8, VFIO_USER_F_TYPE_COMMAND, NULL, 0);
}

static struct result case_bad_version_json(struct conn *c)
{
    static const char junk[] = "\x00\x00\x02\x00{\"capabilities\":{\"max_data_xfer_size\":\"many\"";
    return framed(c, VFIO_USER_VERSION, junk, sizeof(junk));
}

static struct result case_before_version(struct conn *c)
{
    struct vfio_user_device_feature req = {.argsz = sizeof(req),
                                           .flags = VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_GET |
                                                    VFIO_DEVICE_FEATURE_MIGRATION};
    return framed(c, VFIO_USER_DEVICE_FEATURE, &req, sizeof(req));
}

static struct result case_oversize(struct conn *c)
{
    negotiate(c);
    /* A MIG_DATA_WRITE header announcing 2 GiB; nothing follows. */
    return raw_message(c, VFIO_USER_MIG_DATA_WRITE, 0x80000000u, VFIO_USER_F_TYPE_COMMAND, NULL, 0);
}

static struct result case_truncated(struct conn *c)
{
    uint8_t part[100] = {0};
    struct vfio_user_header hdr = {.msg_id = next_msg_id++,
                                   .cmd = VFIO_USER_MIG_DATA_WRITE,
                                   .msg_size = sizeof(hdr) + 1000,
                                   .flags = VFIO_USER_F_TYPE_COMMAND};
    negotiate(c);
    if (!send_raw(c, &hdr, sizeof(hdr)) || !send_raw(c, part, sizeof(part))) {
        return (struct result){OUT_DROPPED, EPIPE};
    }
    shutdown(c->fd, SHUT_WR);
    return await_reply(c, hdr.msg_id);
}

static struct result case_unknown_command(struct conn *c)
{
    uint8_t body[32];
    struct result r;
    memset(body, 0xa5, sizeof(body));
    negotiate(c);
    r = framed(c, (enum vfio_user_command)0x4242, body, sizeof(body));
    return r;
}

static struct result case_unknown_feature(struct conn *c)
{
    struct vfio_user_device_feature req = {.argsz = sizeof(req), .flags = VFIO_DEVICE_FEATURE_GET | 0x7777};
    struct result r;
    negotiate(c);
    r = framed(c, VFIO_USER_DEVICE_FEATURE, &req, sizeof(req));
    return r;
}

static struct result case_short_feature(struct conn *c)
{
    static const uint8_t two[2] = {8, 0};
    struct result r;
    negotiate(c);
    r = framed(c, VFIO_USER_DEVICE_FEATURE, two, sizeof(two));
    return r;
}

static struct result case_bad_state(struct conn *c)
{
    int r;
    negotiate(c);
    r = try_set_state(c, 99);
    if (r == 0) {
        return (struct result){OUT_SUCCESS, 0};
    }
    if (r < 0) {
        return (struct result){OUT_DROPPED, errno};
    }
    /* P2P states are not used in vfio-user. */
    r = try_set_state(c, VFIO_USER_DEVICE_STATE_RUNNING_P2P);
    if (r == 0) {
        return (struct result){OUT_SUCCESS, 0};
    }
    if (r < 0) {
        return (struct result){OUT_DROPPED, errno};
    }
    return (struct result){OUT_ERROR, r};
}

static struct result case_read_outside_session(struct conn *c)
{
    struct vfio_user_mig_data req = {.argsz = sizeof(req) + 4096, .size = 4096};
    struct result r;
    negotiate(c);
    r = framed(c, VFIO_USER_MIG_DATA_READ, &req, sizeof(req));
    return r;
}

/* RUNNING -> STOP -> RESUMING on a negotiated connection. */
static void enter_resuming(struct conn *c)
{
    migration_flags(c);
    if (get_state(c) != VFIO_USER_DEVICE_STATE_RUNNING) {
        fail("%s: device not RUNNING before a garbage load", c->path);
    }
    set_state(c, VFIO_USER_DEVICE_STATE_STOP);
    set_state(c, VFIO_USER_DEVICE_STATE_RESUMING);
}

/*
 * After a refused load (and for load --reset-first): VFIO_USER_DEVICE_RESET, and the device must be
 * RUNNING (or made so: libvfio-user's reset leaves the migration state alone).
 */
static void recover(struct conn *c)
{
    struct iovec iov[1] = {{0}};
    uint32_t st;
    int r = request(c, VFIO_USER_DEVICE_RESET, iov, 1, NULL, 0);
    if (r != 0) {
        fail("%s: DEVICE_RESET after a refused load: %s", c->path, strerror(r < 0 ? errno : r));
    }
    st = get_state(c);
    if (st == VFIO_USER_DEVICE_STATE_RESUMING) {
        set_state(c, VFIO_USER_DEVICE_STATE_STOP);
        st = VFIO_USER_DEVICE_STATE_STOP;
    }
    if (st == VFIO_USER_DEVICE_STATE_STOP) {
        set_state(c, VFIO_USER_DEVICE_STATE_RUNNING);
    } else if (st != VFIO_USER_DEVICE_STATE_RUNNING) {
        fail("%s: device in state %u after a reset", c->path, st);
    }
}

static struct result case_garbage_write(struct conn *c)
{
    uint8_t junk[4096];
    size_t i;
    int r;
    for (i = 0; i < sizeof(junk); i++) {
        junk[i] = rnd_byte();
    }
    negotiate(c);
    enter_resuming(c);
    r = mig_write(c, junk, sizeof(junk), sizeof(junk));
    if (r < 0) {
        return (struct result){OUT_DROPPED, errno};
    }
    if (r == 0) {
        /* Accepted for now: then RESUMING -> STOP must refuse it. */
        r = try_set_state(c, VFIO_USER_DEVICE_STATE_STOP);
        if (r == 0) {
            return (struct result){OUT_SUCCESS, 0};
        }
        if (r < 0) {
            return (struct result){OUT_DROPPED, errno};
        }
    }
    recover(c);
    return (struct result){OUT_ERROR, r};
}

static struct result case_write_size_mismatch(struct conn *c)
{
    uint8_t data[64] = {0};
    int r;
    negotiate(c);
    enter_resuming(c);
    /* size says 4096, 64 bytes follow. */
    r = mig_write(c, data, sizeof(data), 4096);
    if (r < 0) {
        return (struct result){OUT_DROPPED, errno};
    }
    if (r == 0) {
        return (struct result){OUT_SUCCESS, 0};
    }
    recover(c);
    return (struct result){OUT_ERROR, r};
}

static struct result case_write_outside_session(struct conn *c)
{
    uint8_t data[64] = {0};
    int r;
    negotiate(c);
    r = mig_write(c, data, sizeof(data), sizeof(data));
    if (r < 0) {
        return (struct result){OUT_DROPPED, errno};
    }
    if (r == 0) {
        return (struct result){OUT_SUCCESS, 0};
    }
    return (struct result){OUT_ERROR, r};
}

/*
 * After an error reply: did the server keep the connection? A valid request tells: GET MIG_DEVICE_STATE
 * (which must find the device RUNNING) on a negotiated connection, else VFIO_USER_VERSION. Returns true
 * when the connection was kept, false when the server closed it.
 */
static bool kept(struct conn *c, const char *name)
{
    int r;
    if (c->negotiated) {
        struct mig_state_msg req = {
            .f = {.argsz = sizeof(req), .flags = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE}};
        struct mig_state_msg reply;
        struct iovec iov[2] = {{0}, {.iov_base = &req.f, .iov_len = sizeof(req.f)}};
        r = request(c, VFIO_USER_DEVICE_FEATURE, iov, 2, &reply, sizeof(reply));
        if (r == 0 && reply.s.device_state != VFIO_USER_DEVICE_STATE_RUNNING) {
            fail("%s: case %s left the device in state %u, not RUNNING", c->path, name, reply.s.device_state);
        }
    } else {
        struct vfio_user_header hdr;
        void *body = NULL;
        size_t len = 0;
        r = send_version(c->fd, LIB_VFIO_USER_MAJOR, LIB_VFIO_USER_MINOR, "{}", &hdr, &body, &len);
        free(body);
        if (r < 0 && (hdr.flags & VFIO_USER_F_ERROR)) {
            r = errno;
        }
    }
    if (r == 0) {
        return true;
    }
    if (r < 0 && (errno == ENOMSG || errno == ECONNRESET || errno == EPIPE)) {
        return false;
    }
    if (r < 0) {
        fail("%s: after case %s: %s", c->path, name, strerror(errno));
    }
    fail("%s: after case %s the server kept the connection but refused a valid request: %s", c->path, name,
         strerror(r));
}

static const struct {
    const char *name;
    struct result (*run)(struct conn *c);
} cases[] = {
    {"reply-flag", case_reply_flag},
    {"short-size", case_short_size},
    {"bad-version-json", case_bad_version_json},
    {"before-version", case_before_version},
    {"oversize", case_oversize},
    {"truncated", case_truncated},
    {"unknown-command", case_unknown_command},
    {"unknown-feature", case_unknown_feature},
    {"short-feature", case_short_feature},
    {"bad-state", case_bad_state},
    {"read-outside-session", case_read_outside_session},
    {"write-outside-session", case_write_outside_session},
    {"garbage-write-resuming", case_garbage_write},
    {"write-size-mismatch", case_write_size_mismatch},
};
#define NUM_CASES (sizeof(cases) / sizeof(cases[0]))
/* The cases, then one good connection. */
#define GARBAGE_CONNECTIONS (NUM_CASES + 1)

static void garbage(const char *path)
{
    unsigned errors = 0, dropped = 0;
    size_t i;
    struct conn c;

    for (i = 0; i < NUM_CASES; i++) {
        struct result r;
        c = raw_conn(path);
        r = cases[i].run(&c);
        switch (r.out) {
        case OUT_SUCCESS:
            fail("%s: case %s: the server answered with success", path, cases[i].name);
        case OUT_ERROR: {
            bool k = kept(&c, cases[i].name);
            errors++;
            dropped += !k;
            say("MIGR-CLIENT-CASE name=%s result=error errno=%d conn=%s", cases[i].name, r.err,
                k ? "kept" : "dropped");
            break;
        }
        case OUT_DROPPED:
            dropped++;
            say("MIGR-CLIENT-CASE name=%s result=dropped conn=dropped", cases[i].name);
            break;
        }
        close(c.fd);
    }
    /* A good connection still works. */
    c = open_conn(path);
    migration_flags(&c);
    if (get_state(&c) != VFIO_USER_DEVICE_STATE_RUNNING) {
        fail("%s: device not RUNNING after the garbage", path);
    }
    close(c.fd);
    say("MIGR-CLIENT ok mode=garbage cases=%zu errors=%u dropped=%u connections=%zu", NUM_CASES, errors, dropped,
        (size_t)GARBAGE_CONNECTIONS);
}

/* ---- main ------------------------------------------------------------------------------------------- */

static size_t parse_bytes(const char *opt, const char *s)
{
    char *end;
    unsigned long long v;
    errno = 0;
    v = strtoull(s, &end, 0);
    if (errno || end == s) {
        usage_error("%s: bad size %s", opt, s);
    }
    switch (*end) {
    case 'K': case 'k': v <<= 10; end++; break;
    case 'M': case 'm': v <<= 20; end++; break;
    default: break;
    }
    if (*end || v == 0 || v > (1ull << 30)) {
        usage_error("%s: bad size %s", opt, s);
    }
    return (size_t)v;
}

int main(int argc, char **argv)
{
    const char *mode, *from = NULL, *to = NULL, *sock = NULL, *save_file = NULL, *in = NULL, *out = NULL;
    bool count = false;
    struct stream s = {0};
    int i;

    signal(SIGPIPE, SIG_IGN);
    if (argc < 2) {
        usage_error("no mode");
    }
    mode = argv[1];
    for (i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define VALUE() (v ? (i++, v) : (usage_error("%s needs a value", a), NULL))
        if (!strcmp(a, "--from")) {
            from = VALUE();
        } else if (!strcmp(a, "--to")) {
            to = VALUE();
        } else if (!strcmp(a, "--socket")) {
            sock = VALUE();
        } else if (!strcmp(a, "--save")) {
            save_file = VALUE();
        } else if (!strcmp(a, "--in")) {
            in = VALUE();
        } else if (!strcmp(a, "--out")) {
            out = VALUE();
        } else if (!strcmp(a, "--read-chunk")) {
            opt_read_chunk = parse_bytes(a, VALUE());
        } else if (!strcmp(a, "--write-chunk")) {
            opt_write_chunk = parse_bytes(a, VALUE());
        } else if (!strcmp(a, "--timeout")) {
            timeout_s = (unsigned)parse_bytes(a, VALUE());
        } else if (!strcmp(a, "--reset-first")) {
            opt_reset_first = true;
        } else if (!strcmp(a, "--no-precopy")) {
            opt_no_precopy = true;
        } else if (!strcmp(a, "--count")) {
            count = true;
        } else if (!strcmp(a, "--verbose")) {
            verbose = true;
        } else {
            usage_error("unknown argument %s", a);
        }
#undef VALUE
    }

    if (!strcmp(mode, "migrate")) {
        if (!from || !to) {
            usage_error("migrate needs --from and --to");
        }
        save(from, &s);
        if (save_file) {
            write_file(save_file, &s);
        }
        load(to, &s);
        report("migrate", &s);
    } else if (!strcmp(mode, "save")) {
        if (!from || !out) {
            usage_error("save needs --from and --out");
        }
        save(from, &s);
        write_file(out, &s);
        report("save", &s);
    } else if (!strcmp(mode, "load")) {
        if (!to || !in) {
            usage_error("load needs --to and --in");
        }
        read_file(in, &s);
        load(to, &s);
        report("load", &s);
    } else if (!strcmp(mode, "garbage")) {
        if (count) {
            say("%zu", (size_t)GARBAGE_CONNECTIONS);
        } else if (!sock) {
            usage_error("garbage needs --socket (or --count)");
        } else {
            garbage(sock);
        }
    } else {
        usage_error("unknown mode %s", mode);
    }
    free(s.data);
    return 0;
}
