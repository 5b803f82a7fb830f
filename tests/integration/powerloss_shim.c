/* LD_PRELOAD journal of every write, size change and sync a process makes on one file.
 *
 * Built by tests/test_powerloss_journal.py at test time:
 *   gcc -shared -fPIC -O2 -o shim.so powerloss_shim.c -ldl -pthread
 *
 * Environment:
 *   POWERLOSS_TARGET   absolute real path of the file to journal (the top image)
 *   POWERLOSS_JOURNAL  the journal, appended to (O_APPEND: several processes may share it)
 *   POWERLOSS_MARKER   optional: what a process writes to this file is journaled as a
 *                      marker ('M'), so a workload can say where its fsyncs returned
 *
 * A record is four little-endian 64-bit words, op, offset, length, aux, then `length`
 * bytes of data for 'W' and 'M':
 *   'W' data written at offset (pwrite*, pwritev*, write; copy_file_range, aux = 1: the
 *       bytes that landed are read back from the file right after the call)
 *   'A' fallocate(offset, length), aux = mode;  'T' ftruncate to offset
 *   'S' fsync/fdatasync returned 0;             'R' sync_file_range (no durability)
 * An fd belongs to the target when /proc/self/fd/N names it, checked on every call, so
 * fds opened in any way (open, openat, dup, inherited) are seen. One mutex orders each
 * journaled call with its record: the journal is the order the calls completed in.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

enum { NOT_OURS = 0, TARGET = 1, MARKER = 2 };

static char target[4096];
static char marker[4096];
static int journal_fd = -1;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);
static ssize_t (*real_pwritev64)(int, const struct iovec *, int, off_t);
static ssize_t (*real_pwritev2)(int, const struct iovec *, int, off_t, int);
static ssize_t (*real_pwritev64v2)(int, const struct iovec *, int, off_t, int);
static ssize_t (*real_copy_file_range)(int, off_t *, int, off_t *, size_t, unsigned int);
static int (*real_fallocate)(int, int, off_t, off_t);
static int (*real_fallocate64)(int, int, off_t, off_t);
static int (*real_ftruncate)(int, off_t);
static int (*real_ftruncate64)(int, off_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_sync_file_range)(int, off_t, off_t, unsigned int);

static void die(const char *what) {
    char buf[256];
    int n = snprintf(buf, sizeof buf, "powerloss_shim: %s: %s\n", what, strerror(errno));
    if (real_write != NULL && n > 0)
        real_write(2, buf, (size_t)n);
    _exit(99);
}

static void *sym(const char *name) {
    void *p = dlsym(RTLD_NEXT, name);
    if (p == NULL) {
        errno = ENOSYS;
        die(name);
    }
    return p;
}

static void shim_init(void) {
    real_write = sym("write");
    real_pwrite = sym("pwrite");
    real_pwrite64 = sym("pwrite64");
    real_pwritev = sym("pwritev");
    real_pwritev64 = sym("pwritev64");
    real_pwritev2 = sym("pwritev2");
    real_pwritev64v2 = sym("pwritev64v2");
    real_copy_file_range = sym("copy_file_range");
    real_fallocate = sym("fallocate");
    real_fallocate64 = sym("fallocate64");
    real_ftruncate = sym("ftruncate");
    real_ftruncate64 = sym("ftruncate64");
    real_fsync = sym("fsync");
    real_fdatasync = sym("fdatasync");
    real_sync_file_range = sym("sync_file_range");
    const char *t = getenv("POWERLOSS_TARGET");
    const char *j = getenv("POWERLOSS_JOURNAL");
    const char *m = getenv("POWERLOSS_MARKER");
    if (t == NULL || j == NULL)
        return; /* journal nothing */
    snprintf(target, sizeof target, "%s", t);
    if (m != NULL)
        snprintf(marker, sizeof marker, "%s", m);
    journal_fd = open(j, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (journal_fd < 0)
        die(j);
}

static pthread_once_t once = PTHREAD_ONCE_INIT;

/* Every hook starts with ENSURE(): the real functions are looked up before their first
 * use, even if another library's constructor calls a hook before shim_load ran. */
#define ENSURE() pthread_once(&once, shim_init)

__attribute__((constructor)) static void shim_load(void) {
    ENSURE();
}

static int kind(int fd) {
    char link[64], path[4096];
    if (journal_fd < 0 || fd < 0)
        return NOT_OURS;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0)
        return NOT_OURS;
    path[n] = 0;
    if (strcmp(path, target) == 0)
        return TARGET;
    if (marker[0] && strcmp(path, marker) == 0)
        return MARKER;
    return NOT_OURS;
}

/* Append one record in a single write (atomic with O_APPEND). data may be NULL. */
static void record(uint64_t op, int64_t off, int64_t len, uint64_t aux, const void *data) {
    size_t dlen = data != NULL && len > 0 ? (size_t)len : 0;
    size_t total = 32 + dlen;
    unsigned char *buf = malloc(total);
    if (buf == NULL)
        die("malloc");
    uint64_t words[4] = {op, (uint64_t)off, (uint64_t)len, aux};
    memcpy(buf, words, 32); /* x86-64 and aarch64 are little-endian */
    if (dlen)
        memcpy(buf + 32, data, dlen);
    size_t done = 0;
    while (done < total) {
        ssize_t k = real_write(journal_fd, buf + done, total - done);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            die("journal write");
        done += (size_t)k;
    }
    free(buf);
}

/* Record what the call just wrote at [off, off+n) by reading it back from the file. */
static void record_from_file(int fd, off_t off, ssize_t n) {
    if (n <= 0)
        return;
    unsigned char *buf = malloc((size_t)n);
    if (buf == NULL)
        die("malloc");
    ssize_t done = 0;
    while (done < n) {
        ssize_t k = pread(fd, buf + done, (size_t)(n - done), off + done);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            die("reading back written data");
        done += k;
    }
    record('W', off, n, 1, buf);
    free(buf);
}

static void record_iov(const struct iovec *iov, int cnt, off_t off, ssize_t n) {
    if (n <= 0)
        return;
    unsigned char *buf = malloc((size_t)n);
    if (buf == NULL)
        die("malloc");
    size_t done = 0;
    for (int i = 0; i < cnt && done < (size_t)n; i++) {
        size_t k = iov[i].iov_len;
        if (k > (size_t)n - done)
            k = (size_t)n - done;
        memcpy(buf + done, iov[i].iov_base, k);
        done += k;
    }
    record('W', off, n, 0, buf);
    free(buf);
}

/* Where a write without an offset lands: the file position, or the end for O_APPEND. */
static off_t current_pos(int fd) {
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0 && (fl & O_APPEND)) {
        struct stat st;
        if (fstat(fd, &st) == 0)
            return st.st_size;
    }
    return lseek(fd, 0, SEEK_CUR);
}

ssize_t write(int fd, const void *b, size_t n) {
    ENSURE();
    int k = kind(fd);
    if (k == NOT_OURS)
        return real_write(fd, b, n);
    pthread_mutex_lock(&mu);
    off_t pos = k == TARGET ? current_pos(fd) : 0;
    ssize_t r = real_write(fd, b, n);
    int e = errno;
    if (r > 0)
        record(k == TARGET ? 'W' : 'M', pos, r, 0, b);
    pthread_mutex_unlock(&mu);
    errno = e;
    return r;
}

static ssize_t do_pwrite(ssize_t (*fn)(int, const void *, size_t, off_t), int fd,
                         const void *b, size_t n, off_t off) {
    if (kind(fd) != TARGET)
        return fn(fd, b, n, off);
    pthread_mutex_lock(&mu);
    ssize_t r = fn(fd, b, n, off);
    int e = errno;
    if (r > 0)
        record('W', off, r, 0, b);
    pthread_mutex_unlock(&mu);
    errno = e;
    return r;
}

ssize_t pwrite(int fd, const void *b, size_t n, off_t off) {
    ENSURE();
    return do_pwrite(real_pwrite, fd, b, n, off);
}

ssize_t pwrite64(int fd, const void *b, size_t n, off_t off) {
    ENSURE();
    return do_pwrite(real_pwrite64, fd, b, n, off);
}

static ssize_t do_pwritev(ssize_t (*fn)(int, const struct iovec *, int, off_t), int fd,
                          const struct iovec *iov, int cnt, off_t off) {
    if (kind(fd) != TARGET)
        return fn(fd, iov, cnt, off);
    pthread_mutex_lock(&mu);
    ssize_t r = fn(fd, iov, cnt, off);
    int e = errno;
    record_iov(iov, cnt, off, r);
    pthread_mutex_unlock(&mu);
    errno = e;
    return r;
}

ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off) {
    ENSURE();
    return do_pwritev(real_pwritev, fd, iov, cnt, off);
}

ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off_t off) {
    ENSURE();
    return do_pwritev(real_pwritev64, fd, iov, cnt, off);
}

static ssize_t do_pwritev2(ssize_t (*fn)(int, const struct iovec *, int, off_t, int), int fd,
                           const struct iovec *iov, int cnt, off_t off, int flags) {
    if (kind(fd) != TARGET)
        return fn(fd, iov, cnt, off, flags);
    pthread_mutex_lock(&mu);
    off_t pos = off == -1 || (flags & RWF_APPEND) ? current_pos(fd) : off;
    ssize_t r = fn(fd, iov, cnt, off, flags);
    int e = errno;
    record_iov(iov, cnt, pos, r);
    pthread_mutex_unlock(&mu);
    errno = e;
    return r;
}

ssize_t pwritev2(int fd, const struct iovec *iov, int cnt, off_t off, int flags) {
    ENSURE();
    return do_pwritev2(real_pwritev2, fd, iov, cnt, off, flags);
}

ssize_t pwritev64v2(int fd, const struct iovec *iov, int cnt, off_t off, int flags) {
    ENSURE();
    return do_pwritev2(real_pwritev64v2, fd, iov, cnt, off, flags);
}

ssize_t copy_file_range(int fd_in, off_t *off_in, int fd_out, off_t *off_out, size_t n,
                        unsigned int flags) {
    ENSURE();
    if (kind(fd_out) != TARGET)
        return real_copy_file_range(fd_in, off_in, fd_out, off_out, n, flags);
    pthread_mutex_lock(&mu);
    off_t pos = off_out != NULL ? *off_out : lseek(fd_out, 0, SEEK_CUR);
    ssize_t r = real_copy_file_range(fd_in, off_in, fd_out, off_out, n, flags);
    int e = errno;
    record_from_file(fd_out, pos, r);
    pthread_mutex_unlock(&mu);
    errno = e;
    return r;
}

static int do_fallocate(int (*fn)(int, int, off_t, off_t), int fd, int mode, off_t off,
                        off_t len) {
    if (kind(fd) != TARGET)
        return fn(fd, mode, off, len);
    pthread_mutex_lock(&mu);
    int r = fn(fd, mode, off, len);
    int e = errno;
    if (r == 0)
        record('A', off, len, (uint64_t)mode, NULL);
    pthread_mutex_unlock(&mu);
    errno = e;
    return r;
}

int fallocate(int fd, int mode, off_t off, off_t len) {
    ENSURE();
    return do_fallocate(real_fallocate, fd, mode, off, len);
}

int fallocate64(int fd, int mode, off_t off, off_t len) {
    ENSURE();
    return do_fallocate(real_fallocate64, fd, mode, off, len);
}

static int do_ftruncate(int (*fn)(int, off_t), int fd, off_t size) {
    if (kind(fd) != TARGET)
        return fn(fd, size);
    pthread_mutex_lock(&mu);
    int r = fn(fd, size);
    int e = errno;
    if (r == 0)
        record('T', size, 0, 0, NULL);
    pthread_mutex_unlock(&mu);
    errno = e;
    return r;
}

int ftruncate(int fd, off_t size) {
    ENSURE();
    return do_ftruncate(real_ftruncate, fd, size);
}

int ftruncate64(int fd, off_t size) {
    ENSURE();
    return do_ftruncate(real_ftruncate64, fd, size);
}

static int do_sync(int (*fn)(int), int fd) {
    if (kind(fd) != TARGET)
        return fn(fd);
    pthread_mutex_lock(&mu);
    int r = fn(fd);
    int e = errno;
    if (r == 0)
        record('S', 0, 0, 0, NULL);
    pthread_mutex_unlock(&mu);
    errno = e;
    return r;
}

int fsync(int fd) {
    ENSURE();
    return do_sync(real_fsync, fd);
}

int fdatasync(int fd) {
    ENSURE();
    return do_sync(real_fdatasync, fd);
}

int sync_file_range(int fd, off_t off, off_t n, unsigned int flags) {
    ENSURE();
    if (kind(fd) != TARGET)
        return real_sync_file_range(fd, off, n, flags);
    pthread_mutex_lock(&mu);
    int r = real_sync_file_range(fd, off, n, flags);
    int e = errno;
    if (r == 0)
        record('R', off, n, flags, NULL);
    pthread_mutex_unlock(&mu);
    errno = e;
    return r;
}
