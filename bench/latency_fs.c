/* latency_fs: a FUSE pass-through file system that waits a fixed time in every operation
 * that would cost a round trip on a network file system, and counts the operations.
 *
 *     latency_fs BACKING_DIR LATENCY_US THREADS MOUNTPOINT [FUSE options: -f -o ...]
 *
 * Everything under MOUNTPOINT is BACKING_DIR. Before passing an operation on, the thread
 * serving it sleeps LATENCY_US microseconds (0: no wait). Waiting operations: getattr
 * (which the high-level FUSE API also serves lookups with), open, read, readdir, create,
 * write, mkdir, unlink, rename, fsync. Close (flush/release) does not wait. Served by up to
 * THREADS threads, so concurrent callers wait concurrently, as on NFS.
 *
 * Reading MOUNTPOINT/.latency_fs_stats returns the counts so far as "name count" lines;
 * that file neither waits nor counts. bench/startup.py compiles and mounts this.
 */
#define FUSE_USE_VERSION 312
#define _GNU_SOURCE
#include <fuse.h>
#include <fuse_lowlevel.h> /* fuse_parse_cmdline */

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

enum op { GETATTR, OPEN, READ, READDIR, CREATE, WRITE, RELEASE, OTHER, N_OPS };
static const char *OP_NAMES[N_OPS] = {"getattr", "open", "read", "readdir",
                                      "create", "write", "release", "other"};
static atomic_ulong counts[N_OPS];
static char backing[PATH_MAX];
static long latency_us;
static const char STATS_PATH[] = "/.latency_fs_stats";

/* Count the operation; wait the latency if it is one that waits. */
static void cost(enum op op, int wait)
{
    atomic_fetch_add(&counts[op], 1);
    if (!wait || latency_us <= 0)
        return;
    struct timespec t = {latency_us / 1000000, (latency_us % 1000000) * 1000};
    while (nanosleep(&t, &t) == -1 && errno == EINTR)
        ;
}

static int under(char *out, const char *path)
{
    int n = snprintf(out, PATH_MAX, "%s%s", backing, path);
    return n >= PATH_MAX ? -ENAMETOOLONG : 0;
}

#define BACKING(var, path)                  \
    char var[PATH_MAX];                     \
    if (under(var, path) != 0)              \
        return -ENAMETOOLONG;

static int stats_text(char *buf, size_t size)
{
    size_t n = 0;
    for (int i = 0; i < N_OPS && n < size; i++)
        n += snprintf(buf + n, size - n, "%s %lu\n", OP_NAMES[i], atomic_load(&counts[i]));
    return (int)(n < size ? n : size);
}

static void *fs_init(struct fuse_conn_info *conn, struct fuse_config *cfg)
{
    /* Lookups in one directory (1,000 files per class folder) must not queue behind
     * each other: without this flag the kernel serialises them per directory. */
    if (conn->capable & FUSE_CAP_PARALLEL_DIROPS)
        conn->want |= FUSE_CAP_PARALLEL_DIROPS;
    else
        fprintf(stderr, "latency_fs: the kernel serialises lookups per directory\n");
    cfg->use_ino = 0;
    return NULL;
}

static int fs_getattr(const char *path, struct stat *st, struct fuse_file_info *fi)
{
    if (strcmp(path, STATS_PATH) == 0) {
        memset(st, 0, sizeof(*st));
        st->st_mode = S_IFREG | 0444;
        st->st_nlink = 1;
        return 0;
    }
    cost(GETATTR, 1);
    int r;
    if (fi)
        r = fstat((int)fi->fh, st);
    else {
        BACKING(p, path);
        r = lstat(p, st);
    }
    return r == -1 ? -errno : 0;
}

static int fs_readlink(const char *path, char *buf, size_t size)
{
    cost(OTHER, 1);
    BACKING(p, path);
    ssize_t n = readlink(p, buf, size - 1);
    if (n == -1)
        return -errno;
    buf[n] = '\0';
    return 0;
}

static int fs_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t off,
                      struct fuse_file_info *fi, enum fuse_readdir_flags flags)
{
    (void)off; (void)fi; (void)flags;
    cost(READDIR, 1);
    BACKING(p, path);
    DIR *d = opendir(p);
    if (!d)
        return -errno;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        struct stat st = {.st_ino = e->d_ino, .st_mode = (mode_t)DTTOIF(e->d_type)};
        if (fill(buf, e->d_name, &st, 0, 0))
            break;
    }
    closedir(d);
    return 0;
}

static int fs_open(const char *path, struct fuse_file_info *fi)
{
    if (strcmp(path, STATS_PATH) == 0) {
        fi->direct_io = 1; /* size 0 in getattr: read whatever the counts give */
        fi->fh = (uint64_t)-1;
        return 0;
    }
    cost(OPEN, 1);
    BACKING(p, path);
    int fd = open(p, fi->flags);
    if (fd == -1)
        return -errno;
    fi->fh = (uint64_t)fd;
    return 0;
}

static int fs_create(const char *path, mode_t mode, struct fuse_file_info *fi)
{
    cost(CREATE, 1);
    BACKING(p, path);
    int fd = open(p, fi->flags, mode);
    if (fd == -1)
        return -errno;
    fi->fh = (uint64_t)fd;
    return 0;
}

static int fs_read(const char *path, char *buf, size_t size, off_t off,
                   struct fuse_file_info *fi)
{
    if (fi->fh == (uint64_t)-1) {
        char text[1024];
        int n = stats_text(text, sizeof(text));
        if (off >= n)
            return 0;
        size_t len = (size_t)(n - off) < size ? (size_t)(n - off) : size;
        memcpy(buf, text + off, len);
        return (int)len;
    }
    (void)path;
    cost(READ, 1);
    ssize_t n = pread((int)fi->fh, buf, size, off);
    return n == -1 ? -errno : (int)n;
}

static int fs_write(const char *path, const char *buf, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
    (void)path;
    cost(WRITE, 1);
    ssize_t n = pwrite((int)fi->fh, buf, size, off);
    return n == -1 ? -errno : (int)n;
}

static int fs_release(const char *path, struct fuse_file_info *fi)
{
    (void)path;
    if (fi->fh != (uint64_t)-1) {
        cost(RELEASE, 0);
        close((int)fi->fh);
    }
    return 0;
}

static int fs_fsync(const char *path, int datasync, struct fuse_file_info *fi)
{
    (void)path;
    cost(OTHER, 1);
    if (fi->fh == (uint64_t)-1)
        return 0;
    int r = datasync ? fdatasync((int)fi->fh) : fsync((int)fi->fh);
    return r == -1 ? -errno : 0;
}

static int fs_fsyncdir(const char *path, int datasync, struct fuse_file_info *fi)
{
    (void)datasync; (void)fi;
    cost(OTHER, 1);
    BACKING(p, path);
    int fd = open(p, O_RDONLY | O_DIRECTORY);
    if (fd == -1)
        return -errno;
    int r = fsync(fd);
    close(fd);
    return r == -1 ? -errno : 0;
}

static int fs_mkdir(const char *path, mode_t mode)
{
    cost(OTHER, 1);
    BACKING(p, path);
    return mkdir(p, mode) == -1 ? -errno : 0;
}

static int fs_unlink(const char *path)
{
    cost(OTHER, 1);
    BACKING(p, path);
    return unlink(p) == -1 ? -errno : 0;
}

static int fs_rmdir(const char *path)
{
    cost(OTHER, 1);
    BACKING(p, path);
    return rmdir(p) == -1 ? -errno : 0;
}

static int fs_rename(const char *from, const char *to, unsigned int flags)
{
    cost(OTHER, 1);
    BACKING(a, from);
    BACKING(b, to);
    return renameat2(AT_FDCWD, a, AT_FDCWD, b, flags) == -1 ? -errno : 0;
}

static int fs_link(const char *from, const char *to)
{
    cost(OTHER, 1);
    BACKING(a, from);
    BACKING(b, to);
    return link(a, b) == -1 ? -errno : 0;
}

static int fs_symlink(const char *target, const char *path)
{
    cost(OTHER, 1);
    BACKING(p, path);
    return symlink(target, p) == -1 ? -errno : 0;
}

static int fs_chmod(const char *path, mode_t mode, struct fuse_file_info *fi)
{
    cost(OTHER, 1);
    if (fi)
        return fchmod((int)fi->fh, mode) == -1 ? -errno : 0;
    BACKING(p, path);
    return chmod(p, mode) == -1 ? -errno : 0;
}

static int fs_truncate(const char *path, off_t size, struct fuse_file_info *fi)
{
    cost(OTHER, 1);
    if (fi)
        return ftruncate((int)fi->fh, size) == -1 ? -errno : 0;
    BACKING(p, path);
    return truncate(p, size) == -1 ? -errno : 0;
}

static int fs_utimens(const char *path, const struct timespec tv[2], struct fuse_file_info *fi)
{
    cost(OTHER, 1);
    if (fi)
        return futimens((int)fi->fh, tv) == -1 ? -errno : 0;
    BACKING(p, path);
    return utimensat(AT_FDCWD, p, tv, AT_SYMLINK_NOFOLLOW) == -1 ? -errno : 0;
}

static int fs_statfs(const char *path, struct statvfs *st)
{
    BACKING(p, path);
    return statvfs(p, st) == -1 ? -errno : 0;
}

static const struct fuse_operations ops = {
    .init = fs_init,       .getattr = fs_getattr, .readlink = fs_readlink,
    .readdir = fs_readdir, .open = fs_open,       .create = fs_create,
    .read = fs_read,       .write = fs_write,     .release = fs_release,
    .fsync = fs_fsync,     .fsyncdir = fs_fsyncdir, .mkdir = fs_mkdir,
    .unlink = fs_unlink,   .rmdir = fs_rmdir,     .rename = fs_rename,
    .link = fs_link,       .symlink = fs_symlink, .chmod = fs_chmod,
    .truncate = fs_truncate, .utimens = fs_utimens, .statfs = fs_statfs,
};

int main(int argc, char *argv[])
{
    if (argc < 5) {
        fprintf(stderr, "usage: %s BACKING_DIR LATENCY_US THREADS MOUNTPOINT [FUSE options]\n",
                argv[0]);
        return 2;
    }
    if (!realpath(argv[1], backing)) {
        perror(argv[1]);
        return 2;
    }
    latency_us = atol(argv[2]);
    unsigned threads = (unsigned)atoi(argv[3]);
    /* FUSE parses: prog MOUNTPOINT [options]. fuse_main would cap the threads at its
     * default of 10 (its -o max_threads is not honoured by this libfuse), and callers
     * waiting the latency must not queue behind each other. */
    argv[3] = argv[0];
    struct fuse_args args = FUSE_ARGS_INIT(argc - 3, argv + 3);
    struct fuse_cmdline_opts opts;
    if (fuse_parse_cmdline(&args, &opts) != 0 || !opts.mountpoint) {
        fprintf(stderr, "%s: no mount point\n", argv[0]);
        return 2;
    }
    struct fuse *fuse = fuse_new(&args, &ops, sizeof(ops), NULL);
    if (!fuse || fuse_mount(fuse, opts.mountpoint) != 0)
        return 1;
    struct fuse_session *se = fuse_get_session(fuse);
    fuse_set_signal_handlers(se);
    fuse_daemonize(opts.foreground);
    struct fuse_loop_config *loop = fuse_loop_cfg_create();
    fuse_loop_cfg_set_max_threads(loop, threads);
    fuse_loop_cfg_set_idle_threads(loop, threads);
    int r = fuse_loop_mt(fuse, loop);
    fuse_loop_cfg_destroy(loop);
    fuse_remove_signal_handlers(se);
    fuse_unmount(fuse);
    fuse_destroy(fuse);
    free(opts.mountpoint);
    fuse_opt_free_args(&args);
    return r ? 1 : 0;
}
