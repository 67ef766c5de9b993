/* Power-cut recorder, loaded with LD_PRELOAD into a process under test.
 *
 * Every write, truncate, unlink and fsync/fdatasync that the process makes to files under
 * $POWERCUT_DIR is passed through unchanged and also appended to $POWERCUT_LOG.  After the
 * process is killed, tests/_powercut.py rebuilds what a disk could hold after a power
 * cut at that instant: everything a file had when it was last fsynced, plus any subset of
 * the writes that came after (torn at 512-byte sectors).  A kill -9 alone cannot show this:
 * the kernel's page cache keeps unsynced writes that a power cut would lose.
 *
 * Log record: u8 op, u8[3] pad, u32 file id, u64 offset, u64 length, then `length` bytes
 * for 'N' (file id's path, relative to $POWERCUT_DIR) and 'W' (the data written).
 * Ops: N name, W write, T truncate (offset = new size), S fsync/fdatasync, U unlink.
 * An op is logged after the real call succeeded; an fsync after it returned.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_FD 65536
#define MAX_FILES 1024

struct rec {
    uint8_t op;
    uint8_t pad[3];
    uint32_t id;
    uint64_t off;
    uint64_t len;
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int log_fd = -1;
static char dir[PATH_MAX];
static size_t dir_len;
static int fd_file[MAX_FD]; /* file id + 1, 0 = not watched */
static char *names[MAX_FILES];
static int n_names;
static int ready;

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_openat64)(int, const char *, int, ...);
static int (*real_close)(int);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_ftruncate)(int, off_t);
static int (*real_ftruncate64)(int, off_t);
static int (*real_unlink)(const char *);
static int (*real_unlinkat)(int, const char *, int);

__attribute__((constructor)) static void init(void) {
    real_write = dlsym(RTLD_NEXT, "write");
    real_pwrite = dlsym(RTLD_NEXT, "pwrite");
    real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    real_writev = dlsym(RTLD_NEXT, "writev");
    real_open = dlsym(RTLD_NEXT, "open");
    real_open64 = dlsym(RTLD_NEXT, "open64");
    real_openat = dlsym(RTLD_NEXT, "openat");
    real_openat64 = dlsym(RTLD_NEXT, "openat64");
    real_close = dlsym(RTLD_NEXT, "close");
    real_fsync = dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    real_ftruncate = dlsym(RTLD_NEXT, "ftruncate");
    real_ftruncate64 = dlsym(RTLD_NEXT, "ftruncate64");
    real_unlink = dlsym(RTLD_NEXT, "unlink");
    real_unlinkat = dlsym(RTLD_NEXT, "unlinkat");
    const char *d = getenv("POWERCUT_DIR"), *l = getenv("POWERCUT_LOG");
    if (!d || !l || !realpath(d, dir))
        return;
    dir_len = strlen(dir);
    log_fd = real_open(l, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    ready = log_fd >= 0;
}

static void put(const void *p, size_t n) {
    const char *c = p;
    while (n) {
        ssize_t k = real_write(log_fd, c, n);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            abort(); /* a log that silently misses writes would prove nothing */
        }
        c += k;
        n -= (size_t)k;
    }
}

static void emit(uint8_t op, int id, uint64_t off, const void *data, uint64_t len) {
    struct rec r = {op, {0, 0, 0}, (uint32_t)id, off, len};
    put(&r, sizeof r);
    if (data && len)
        put(data, len);
}

/* The file id of an absolute or cwd-relative path under the watched directory, or -1. */
static int watch_path(const char *path) {
    char full[PATH_MAX];
    if (path[0] == '/') {
        if (strlen(path) >= sizeof full)
            return -1;
        strcpy(full, path);
    } else {
        if (!getcwd(full, sizeof full) || strlen(full) + strlen(path) + 2 > sizeof full)
            return -1;
        strcat(full, "/");
        strcat(full, path);
    }
    if (strncmp(full, dir, dir_len) != 0 || (full[dir_len] != '/' && full[dir_len] != 0))
        return -1;
    const char *rel = full[dir_len] ? full + dir_len + 1 : ".";
    for (int i = 0; i < n_names; i++)
        if (strcmp(names[i], rel) == 0)
            return i;
    if (n_names == MAX_FILES)
        abort();
    names[n_names] = strdup(rel);
    emit('N', n_names, 0, rel, strlen(rel));
    return n_names++;
}

static int tracked(int fd) { return ready && fd >= 0 && fd < MAX_FD ? fd_file[fd] - 1 : -1; }

static void opened(int fd, const char *path, int flags) {
    if (!ready || fd < 0 || fd >= MAX_FD)
        return;
    pthread_mutex_lock(&mu);
    int id = watch_path(path);
    fd_file[fd] = id + 1;
    if (id >= 0 && (flags & O_TRUNC))
        emit('T', id, 0, NULL, 0);
    pthread_mutex_unlock(&mu);
}

static void wrote(int fd, off_t off, const void *buf, ssize_t n) {
    int id = tracked(fd);
    if (id < 0 || n <= 0)
        return;
    pthread_mutex_lock(&mu);
    emit('W', id, (uint64_t)off, buf, (uint64_t)n);
    pthread_mutex_unlock(&mu);
}

static void simple(uint8_t op, int fd, uint64_t off) {
    int id = tracked(fd);
    if (id < 0)
        return;
    pthread_mutex_lock(&mu);
    emit(op, id, off, NULL, 0);
    pthread_mutex_unlock(&mu);
}

#define OPEN_MODE(flags, mode)                                                                 \
    mode_t mode = 0;                                                                           \
    if ((flags) & (O_CREAT | O_TMPFILE)) {                                                     \
        va_list ap;                                                                            \
        va_start(ap, flags);                                                                   \
        mode = va_arg(ap, mode_t);                                                             \
        va_end(ap);                                                                            \
    }

int open(const char *path, int flags, ...) {
    OPEN_MODE(flags, mode);
    int fd = real_open(path, flags, mode);
    opened(fd, path, flags);
    return fd;
}

int open64(const char *path, int flags, ...) {
    OPEN_MODE(flags, mode);
    int fd = real_open64(path, flags, mode);
    opened(fd, path, flags);
    return fd;
}

static int opened_at(int dirfd, const char *path, int flags, int fd) {
    if (fd >= 0 && (path[0] == '/' || dirfd == AT_FDCWD))
        opened(fd, path, flags);
    else if (fd >= 0 && fd < MAX_FD)
        fd_file[fd] = 0;
    return fd;
}

int openat(int dirfd, const char *path, int flags, ...) {
    OPEN_MODE(flags, mode);
    return opened_at(dirfd, path, flags, real_openat(dirfd, path, flags, mode));
}

int openat64(int dirfd, const char *path, int flags, ...) {
    OPEN_MODE(flags, mode);
    return opened_at(dirfd, path, flags, real_openat64(dirfd, path, flags, mode));
}

int close(int fd) {
    if (fd >= 0 && fd < MAX_FD)
        fd_file[fd] = 0;
    return real_close(fd);
}

ssize_t write(int fd, const void *buf, size_t n) {
    off_t off = tracked(fd) >= 0 ? lseek(fd, 0, SEEK_CUR) : 0;
    ssize_t k = real_write(fd, buf, n);
    wrote(fd, off, buf, k);
    return k;
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    ssize_t k = real_pwrite(fd, buf, n, off);
    wrote(fd, off, buf, k);
    return k;
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) {
    ssize_t k = real_pwrite64(fd, buf, n, off);
    wrote(fd, off, buf, k);
    return k;
}

ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    off_t off = tracked(fd) >= 0 ? lseek(fd, 0, SEEK_CUR) : 0;
    ssize_t k = real_writev(fd, iov, cnt), left = k;
    for (int i = 0; left > 0 && i < cnt; i++) {
        ssize_t part = (size_t)left < iov[i].iov_len ? left : (ssize_t)iov[i].iov_len;
        wrote(fd, off, iov[i].iov_base, part);
        off += part;
        left -= part;
    }
    return k;
}

int fsync(int fd) {
    int r = real_fsync(fd);
    if (r == 0)
        simple('S', fd, 0);
    return r;
}

int fdatasync(int fd) {
    int r = real_fdatasync(fd);
    if (r == 0)
        simple('S', fd, 0);
    return r;
}

int ftruncate(int fd, off_t len) {
    int r = real_ftruncate(fd, len);
    if (r == 0)
        simple('T', fd, (uint64_t)len);
    return r;
}

int ftruncate64(int fd, off_t len) {
    int r = real_ftruncate64(fd, len);
    if (r == 0)
        simple('T', fd, (uint64_t)len);
    return r;
}

static void unlinked(const char *path) {
    if (!ready)
        return;
    pthread_mutex_lock(&mu);
    int id = watch_path(path);
    if (id >= 0)
        emit('U', id, 0, NULL, 0);
    pthread_mutex_unlock(&mu);
}

int unlink(const char *path) {
    int r = real_unlink(path);
    if (r == 0)
        unlinked(path);
    return r;
}

int unlinkat(int dirfd, const char *path, int flags) {
    int r = real_unlinkat(dirfd, path, flags);
    if (r == 0 && (path[0] == '/' || dirfd == AT_FDCWD))
        unlinked(path);
    return r;
}
