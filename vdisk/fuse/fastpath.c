/* vdisk's compiled FUSE fast path (see vdisk/fuse/fastpath.py for the design).
 *
 * Reader threads take every request from /dev/fuse. A READ or WRITE whose clusters are
 * all in the drive's cluster table (published by the Python block layer: "plain data at
 * this offset of this file", "zeroes", with or without "may be written in place") is
 * served here with pread/pwrite and a reply written straight to /dev/fuse, without the
 * interpreter. Anything else goes to pyfuse3 unchanged: the buffer is queued, an eventfd
 * (which pyfuse3 takes for the session fd) becomes readable, and pyfuse3's own call of
 * fuse_session_receive_buf, redirected to vdfp_receive, hands it over.
 *
 * A table entry is one 64-bit word: bit 0 valid, bit 1 writable, bit 2 zeroes, bits 3-6
 * the file slot, bits 12-63 the host offset (clusters are at least 4 KiB aligned here: a
 * smaller cluster size is not published). Requests hold the drive's lock for reading
 * while they use entries; vdfp_fence takes it for writing, so once it returns no request
 * still uses an entry cleared before it (the block layer fences before it frees or
 * remaps a cluster).
 */
#define FUSE_USE_VERSION 34
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAX_DRIVES 64
#define MAX_FILES 16
#define MAX_THREADS 4
#define QUEUE_CAP 4096

#define E_VALID 1ULL
#define E_WRITE 2ULL
#define E_ZERO 4ULL
#define E_SLOT_SHIFT 3
#define E_HOST_MASK (~0xFFFULL)

/* The counters a drive's fast requests add to its query-blockstats figures. */
struct vdfp_stats {
    _Atomic uint64_t rd_bytes, wr_bytes, rd_operations, wr_operations;
    _Atomic uint64_t rd_total_time_ns, wr_total_time_ns, wr_highest_offset, last_ns;
};

struct drive {
    uint64_t nodeid, size, nclusters;
    unsigned cluster_bits;
    _Atomic uint64_t *map;
    int fds[MAX_FILES];
    pthread_rwlock_t lock;
    struct vdfp_stats stats;
};

typedef int (*receive_fn)(struct fuse_session *, struct fuse_buf *);
typedef void (*session_fn)(struct fuse_session *);
typedef void (*init_fn)(void *, struct fuse_conn_info *);
typedef int (*fd_fn)(struct fuse_session *);

static struct drive *drives[MAX_DRIVES];
static atomic_int ndrives;
static int generation;  /* a handle is generation << 8 | index: old mounts' handles fail */
static struct fuse_session *session;
static int dev_fd = -1, event_fd = -1;
static receive_fn real_receive;
static session_fn real_exit, real_destroy;
static init_fn real_init;
static fd_fn real_fd;
static pthread_t threads[MAX_THREADS];
static int nthreads, want_threads = 2;
static atomic_int stopping;
static atomic_int ended;      /* set when a reader saw the end: vdfp_receive returns it */
static int end_result;

static pthread_mutex_t qlock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t qspace = PTHREAD_COND_INITIALIZER;
static struct fuse_buf queue[QUEUE_CAP];
static unsigned qhead, qlen;
static void *pool[QUEUE_CAP];  /* spare receive buffers (all malloc'd by libfuse) */
static unsigned npool;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* -- the table, from Python ------------------------------------------------------------ */

static struct drive *get(int h) {
    int i = h & 0xFF;
    return h >= 0 && (h >> 8) == generation && i < atomic_load(&ndrives) ? drives[i] : NULL;
}

int vdfp_drive_add(uint64_t nodeid, uint64_t size, unsigned cluster_bits) {
    if (ndrives >= MAX_DRIVES || cluster_bits < 12 || cluster_bits > 30)
        return -EINVAL;
    struct drive *d = calloc(1, sizeof(*d));
    if (!d)
        return -ENOMEM;
    d->nodeid = nodeid;
    d->size = size;
    d->cluster_bits = cluster_bits;
    d->nclusters = (size + (1ULL << cluster_bits) - 1) >> cluster_bits;
    size_t bytes = d->nclusters * sizeof(uint64_t);
    if (bytes == 0)
        bytes = sizeof(uint64_t);
    /* untouched pages of the table cost no memory */
    void *m = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (m == MAP_FAILED) {
        free(d);
        return -errno;
    }
    d->map = m;
    for (int i = 0; i < MAX_FILES; i++)
        d->fds[i] = -1;
    pthread_rwlockattr_t a;
    pthread_rwlockattr_init(&a);
    pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&d->lock, &a);
    pthread_rwlockattr_destroy(&a);
    int i = atomic_load(&ndrives);
    drives[i] = d;
    atomic_store(&ndrives, i + 1);
    return generation << 8 | i;
}

/* Use fd (duplicated: the caller may close its own) as file slot `slot` of drive h. */
int vdfp_drive_file(int h, int slot, int fd) {
    struct drive *d = get(h);
    if (!d || slot < 0 || slot >= MAX_FILES)
        return -EINVAL;
    int nfd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (nfd < 0)
        return -errno;
    pthread_rwlock_wrlock(&d->lock);
    int old = d->fds[slot];
    d->fds[slot] = nfd;
    pthread_rwlock_unlock(&d->lock);
    if (old >= 0)
        close(old);
    return 0;
}

void vdfp_set(int h, uint64_t cluster, uint64_t entry) {
    struct drive *d = get(h);
    if (d && cluster < d->nclusters)
        atomic_store(&d->map[cluster], entry);
}

void vdfp_clear(int h, uint64_t first, uint64_t count) {
    struct drive *d = get(h);
    if (!d)
        return;
    for (uint64_t c = first; c < first + count && c < d->nclusters; c++)
        if (atomic_load_explicit(&d->map[c], memory_order_relaxed))
            atomic_store(&d->map[c], 0);
}

static void fence(struct drive *d) {
    pthread_rwlock_wrlock(&d->lock);
    pthread_rwlock_unlock(&d->lock);
}

/* Wait until no request uses an entry cleared before this call. */
void vdfp_fence(int h) {
    struct drive *d = get(h);
    if (d)
        fence(d);
}

/* vdfp_fence if no request is in the table now (1), else 0 at once: the caller fences
 * in a thread that may wait (a request may be waiting for the disk). */
int vdfp_try_fence(int h) {
    struct drive *d = get(h);
    if (!d)
        return 1;
    if (pthread_rwlock_trywrlock(&d->lock) != 0)
        return 0;
    pthread_rwlock_unlock(&d->lock);
    return 1;
}

/* Clear every entry, fence, and close the drive's file slots. */
static void reset(struct drive *d) {
    pthread_rwlock_wrlock(&d->lock);
    size_t bytes = d->nclusters * sizeof(uint64_t);
    if (bytes)  /* gives the pages back too */
        madvise((void *)d->map, bytes, MADV_DONTNEED);
    for (int i = 0; i < MAX_FILES; i++) {
        if (d->fds[i] >= 0)
            close(d->fds[i]);
        d->fds[i] = -1;
    }
    pthread_rwlock_unlock(&d->lock);
}

void vdfp_reset(int h) {
    struct drive *d = get(h);
    if (d)
        reset(d);
}

/* Drop the drives of an earlier mount that never ran (-EBUSY while a session runs). */
int vdfp_drives_clear(void) {
    if (session)
        return -EBUSY;
    int n = atomic_load(&ndrives);
    atomic_store(&ndrives, 0);
    generation++;
    for (int i = 0; i < n; i++) {
        reset(drives[i]);
        munmap((void *)drives[i]->map, drives[i]->nclusters * sizeof(uint64_t) ?: 8);
        pthread_rwlock_destroy(&drives[i]->lock);
        free(drives[i]);
        drives[i] = NULL;
    }
    return 0;
}

struct vdfp_stats *vdfp_stats(int h) {
    struct drive *d = get(h);
    return d ? &d->stats : NULL;
}

uint64_t vdfp_entry(int h, uint64_t cluster) {
    struct drive *d = get(h);
    return d && cluster < d->nclusters ? atomic_load(&d->map[cluster]) : 0;
}

/* -- serving ----------------------------------------------------------------------------- */

static struct drive *drive_of(uint64_t nodeid) {
    int n = atomic_load(&ndrives);
    for (int i = 0; i < n; i++)
        if (drives[i]->nodeid == nodeid)
            return drives[i];
    return NULL;
}

static int reply(uint64_t unique, int error, const void *data, size_t n) {
    struct fuse_out_header out = {.len = sizeof(out) + n, .error = error, .unique = unique};
    struct iovec iov[2] = {{&out, sizeof(out)}, {(void *)data, n}};
    ssize_t r = writev(dev_fd, iov, n ? 2 : 1);
    return r == (ssize_t)(sizeof(out) + n) ? 0 : -1;
}

static void count(_Atomic uint64_t *bytes, _Atomic uint64_t *ops, _Atomic uint64_t *ns,
                  struct drive *d, uint64_t n, uint64_t t0) {
    uint64_t t1 = now_ns();
    atomic_fetch_add(bytes, n);
    atomic_fetch_add(ops, 1);
    atomic_fetch_add(ns, t1 - t0);
    atomic_store(&d->stats.last_ns, t1);
}

/* Copy [off, off+n) of the drive through its table; 0, or -1 if an entry is missing
 * (or not writable, for a write) or the I/O came up short. Caller holds d->lock. */
static int run(struct drive *d, uint64_t off, char *mem, uint64_t n, int write) {
    uint64_t cs = 1ULL << d->cluster_bits;
    uint64_t c = off >> d->cluster_bits, last = (off + n - 1) >> d->cluster_bits;
    for (uint64_t i = c; i <= last; i++) {  /* all or nothing: check before any I/O */
        uint64_t e = atomic_load(&d->map[i]);
        if (!(e & E_VALID) || (write && !(e & E_WRITE)) ||
            d->fds[(e >> E_SLOT_SHIFT) & (MAX_FILES - 1)] < 0)
            return -1;
    }
    while (n) {
        uint64_t e = atomic_load(&d->map[c]);
        uint64_t inner = off & (cs - 1);
        uint64_t piece = cs - inner < n ? cs - inner : n;
        if (!(e & E_VALID) || (write && !(e & E_WRITE)))
            return -1;  /* cleared meanwhile: the slow path redoes the whole request */
        if (e & E_ZERO) {
            memset(mem, 0, piece);
        } else {
            int fd = d->fds[(e >> E_SLOT_SHIFT) & (MAX_FILES - 1)];
            off_t host = (off_t)((e & E_HOST_MASK) + inner);
            ssize_t r = write ? pwrite(fd, mem, piece, host) : pread(fd, mem, piece, host);
            if (r != (ssize_t)piece)
                return -1;
        }
        mem += piece;
        off += piece;
        n -= piece;
        c++;
    }
    return 0;
}

static __thread char *rbuf;
static __thread size_t rbuf_size;

/* Serve the request in mem if it can be; 1 if it was answered here. */
static int fast(char *mem, size_t len) {
    struct fuse_in_header *in = (struct fuse_in_header *)mem;
    if (len < sizeof(*in) || atomic_load(&stopping))
        return 0;
    if (in->opcode == FUSE_READ && len >= sizeof(*in) + sizeof(struct fuse_read_in)) {
        struct fuse_read_in *r = (struct fuse_read_in *)(in + 1);
        struct drive *d = drive_of(in->nodeid);
        if (!d || r->size == 0 || r->offset >= d->size || r->size > d->size - r->offset)
            return 0;
        if (rbuf_size < r->size) {
            free(rbuf);
            rbuf_size = r->size > (1u << 20) ? r->size : (1u << 20);
            rbuf = malloc(rbuf_size);
            if (!rbuf) {
                rbuf_size = 0;
                return 0;
            }
        }
        uint64_t t0 = now_ns();
        pthread_rwlock_rdlock(&d->lock);  /* stopping again: vdfp_session_exit fences */
        int bad = atomic_load(&stopping) || run(d, r->offset, rbuf, r->size, 0);
        pthread_rwlock_unlock(&d->lock);
        if (bad)
            return 0;
        reply(in->unique, 0, rbuf, r->size);
        count(&d->stats.rd_bytes, &d->stats.rd_operations, &d->stats.rd_total_time_ns, d,
              r->size, t0);
        return 1;
    }
    if (in->opcode == FUSE_WRITE && len >= sizeof(*in) + sizeof(struct fuse_write_in)) {
        struct fuse_write_in *w = (struct fuse_write_in *)(in + 1);
        struct drive *d = drive_of(in->nodeid);
        if (!d || w->size == 0 || w->offset >= d->size || w->size > d->size - w->offset ||
            len < sizeof(*in) + sizeof(*w) + w->size)
            return 0;
        uint64_t t0 = now_ns();
        pthread_rwlock_rdlock(&d->lock);
        int bad = atomic_load(&stopping) || run(d, w->offset, (char *)(w + 1), w->size, 1);
        pthread_rwlock_unlock(&d->lock);
        if (bad)
            return 0;  /* rewriting what was written is harmless: the slow path redoes it */
        struct fuse_write_out o = {.size = w->size};
        reply(in->unique, 0, &o, sizeof(o));
        count(&d->stats.wr_bytes, &d->stats.wr_operations, &d->stats.wr_total_time_ns, d,
              w->size, t0);
        uint64_t end = w->offset + w->size, hi = atomic_load(&d->stats.wr_highest_offset);
        while (end > hi && !atomic_compare_exchange_weak(&d->stats.wr_highest_offset, &hi, end))
            ;
        return 1;
    }
    return 0;
}

static void wake_python(void) {
    uint64_t one = 1;
    ssize_t r = write(event_fd, &one, sizeof(one));
    (void)r;
}

static void on_signal(int sig) { (void)sig; }  /* only interrupts a blocking read */

static void *reader(void *arg) {
    (void)arg;
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGRTMIN + 5);
    pthread_sigmask(SIG_UNBLOCK, &s, NULL);
    struct fuse_buf buf = {0};
    while (!atomic_load(&stopping)) {
        if (!buf.mem) {
            pthread_mutex_lock(&qlock);
            buf.mem = npool ? pool[--npool] : NULL;  /* NULL: libfuse allocates one */
            pthread_mutex_unlock(&qlock);
        }
        buf.flags = 0;
        int res = real_receive(session, &buf);
        if (res == -EINTR || res == -EAGAIN)
            continue;
        if (res <= 0) {
            pthread_mutex_lock(&qlock);
            if (!atomic_load(&ended)) {
                end_result = res;
                atomic_store(&ended, 1);
            }
            pthread_mutex_unlock(&qlock);
            uint64_t many = 1ULL << 40;  /* every pyfuse3 worker sees the end */
            ssize_t r = write(event_fd, &many, sizeof(many));
            (void)r;
            break;
        }
        if (fast(buf.mem, (size_t)res))
            continue;
        pthread_mutex_lock(&qlock);
        while (qlen == QUEUE_CAP && !atomic_load(&stopping))
            pthread_cond_wait(&qspace, &qlock);
        queue[(qhead + qlen++) % QUEUE_CAP] = buf;
        pthread_mutex_unlock(&qlock);
        buf.mem = NULL;
        wake_python();
    }
    free(buf.mem);
    free(rbuf);
    rbuf = NULL;
    rbuf_size = 0;
    return NULL;
}

/* -- the libfuse calls pyfuse3 makes, redirected --------------------------------------- */

/* pyfuse3's fuse_session_receive_buf: the next queued request. -EINTR when there is none
 * (pyfuse3 then waits for the fd again); 0 at the end. */
int vdfp_receive(struct fuse_session *se, struct fuse_buf *buf) {
    (void)se;
    uint64_t v;
    if (read(event_fd, &v, sizeof(v)) != sizeof(v))
        return -EINTR;
    pthread_mutex_lock(&qlock);
    if (!qlen) {
        int res = atomic_load(&ended) ? end_result : -EINTR;
        pthread_mutex_unlock(&qlock);
        return res;
    }
    struct fuse_buf got = queue[qhead];
    qhead = (qhead + 1) % QUEUE_CAP;
    qlen--;
    if (buf->mem && npool < QUEUE_CAP)
        pool[npool++] = buf->mem;
    else
        free(buf->mem);
    pthread_cond_signal(&qspace);
    pthread_mutex_unlock(&qlock);
    *buf = got;
    return (int)got.size;
}

/* pyfuse3's fuse_session_fd (called once, right after the mount): start the readers and
 * give pyfuse3 the eventfd to wait on. */
int vdfp_session_fd(struct fuse_session *se) {
    if (event_fd >= 0)
        return event_fd;
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;  /* no SA_RESTART: a read() returns EINTR */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGRTMIN + 5, &sa, NULL);
    event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK | EFD_SEMAPHORE);
    if (event_fd < 0)
        return -1;
    session = se;
    dev_fd = real_fd(se);
    for (int i = 0; i < want_threads && i < MAX_THREADS; i++)
        if (pthread_create(&threads[i], NULL, reader, NULL) == 0)
            nthreads++;
    return event_fd;
}

static void stop_readers(void) {
    atomic_store(&stopping, 1);
    pthread_mutex_lock(&qlock);
    pthread_cond_broadcast(&qspace);
    pthread_mutex_unlock(&qlock);
    for (int i = 0; i < nthreads; i++) {
        for (;;) {
            pthread_kill(threads[i], SIGRTMIN + 5);
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += 20000000;
            if (ts.tv_nsec >= 1000000000) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000;
            }
            if (pthread_timedjoin_np(threads[i], NULL, &ts) == 0)
                break;
        }
    }
    nthreads = 0;
}

/* pyfuse3's fuse_session_exit (pyfuse3.terminate): no request is served after it, by
 * the readers either; once it returns, no fast request is in flight. */
void vdfp_session_exit(struct fuse_session *se) {
    real_exit(se);
    atomic_store(&stopping, 1);
    int n = atomic_load(&ndrives);
    for (int i = 0; i < n; i++)
        fence(drives[i]);
}

/* pyfuse3's fuse_session_destroy (pyfuse3.close): join the readers first. */
void vdfp_session_destroy(struct fuse_session *se) {
    stop_readers();
    pthread_mutex_lock(&qlock);
    while (qlen) {
        free(queue[qhead].mem);
        qhead = (qhead + 1) % QUEUE_CAP;
        qlen--;
    }
    while (npool)
        free(pool[--npool]);
    pthread_mutex_unlock(&qlock);
    real_destroy(se);
    if (event_fd >= 0)
        close(event_fd);
    event_fd = -1;
    session = NULL;
    dev_fd = -1;
    atomic_store(&stopping, 0);
    atomic_store(&ended, 0);
    vdfp_drives_clear();
}

/* The ops table's init, wrapped: requests are read with read(), never spliced (a spliced
 * request lives in the reader thread's pipe, which pyfuse3 cannot be handed). */
void vdfp_init(void *userdata, struct fuse_conn_info *conn) {
    real_init(userdata, conn);
    conn->want &= ~(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE);
}

/* The real libfuse functions, and how many reader threads to start. */
void vdfp_setup(void *receive, void *exit_fn, void *destroy, void *init, void *fd,
                int threads_wanted) {
    real_receive = (receive_fn)receive;
    real_fd = (fd_fn)fd;
    real_exit = (session_fn)exit_fn;
    real_destroy = (session_fn)destroy;
    real_init = (init_fn)init;
    if (threads_wanted > 0)
        want_threads = threads_wanted;
}
