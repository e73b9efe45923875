/*
 * xcore_copy.c - what one copy of a buffer costs on this host, three ways,
 * to read the shared-memory sendrecv ratios against (docs/PERFORMANCE.md,
 * run 17):
 *
 *   hot        memcpy of a buffer this thread just copied (source and
 *              destination in this core's caches; the anchors' memcpy_bw)
 *   cross      memcpy of a buffer another thread, pinned to another CPU,
 *              has just written: what a copy from one process to another
 *              on two cores moves at best
 *   cma        process_vm_readv of this process's own memory: the
 *              kernel's copy path that the split copy takes
 *   cma_thp    the same between two 2 MiB-aligned buffers advised as
 *              transparent huge pages (sizes from 4 MiB): what the kernel's
 *              copy costs when the pages it pins are huge
 *
 * Each figure is the median over repetitions, in microseconds. Then the
 * cross-core copy of 1 MiB again, in WINDOWS windows of WINDOW_REPS copies
 * with WINDOW_GAP_MS between them (rows `cross_window`): the cost of a
 * line another core wrote moves with the host's placement of the two
 * vCPUs, and on the machine of docs/PERFORMANCE.md (run 18) it flipped
 * between about 1.1x and 2.7x the hot copy within one process, in
 * stretches of a few hundred milliseconds.
 * Build: gcc -O2 -Wall -pthread -o xcore_copy xcore_copy.c
 * Run:   ./xcore_copy [out.csv]     (needs two CPUs in the affinity mask)
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAX_REPS 400
#define WINDOWS 16
#define WINDOW_REPS 40
#define WINDOW_GAP_MS 60

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof(double), cmp_d);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static int cpus[2];

static int pin(int cpu) {
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    return sched_setaffinity(0, sizeof s, &s);
}

/* The writer thread fills `src` whenever `turn` is 0, then hands it over. */
struct shared {
    char *src;
    size_t len;
    int reps;
    atomic_int turn;
};

static void *writer(void *arg) {
    struct shared *sh = arg;
    /* Unpinned, the figure is less telling but the run still ends. */
    if (pin(cpus[1]) != 0) perror("xcore_copy: pinning the writer");
    for (int i = 0; i < sh->reps; i++) {
        while (atomic_load_explicit(&sh->turn, memory_order_acquire) != 0) sched_yield();
        memset(sh->src, i & 0xff, sh->len);
        atomic_store_explicit(&sh->turn, 1, memory_order_release);
    }
    return NULL;
}

/* Median seconds of `reps` copies of `src` into `dst` on cpus[0], each of a
 * buffer the writer thread on cpus[1] has just filled. */
static int cross(char *src, char *dst, size_t len, int reps, double *out) {
    static double t[MAX_REPS];
    if (pin(cpus[0]) != 0) return perror("sched_setaffinity"), 1;
    struct shared sh = {.src = src, .len = len, .reps = reps};
    atomic_init(&sh.turn, 0);
    pthread_t th;
    if (pthread_create(&th, NULL, writer, &sh) != 0) return fprintf(stderr, "xcore_copy: no thread\n"), 1;
    for (int i = 0; i < reps; i++) {
        while (atomic_load_explicit(&sh.turn, memory_order_acquire) != 1) sched_yield();
        double t0 = now_s();
        memcpy(dst, src, len);
        __asm__ volatile("" : : "r"(dst) : "memory");
        t[i] = now_s() - t0;
        atomic_store_explicit(&sh.turn, 0, memory_order_release);
    }
    pthread_join(th, NULL);
    *out = median(t, reps);
    return 0;
}

/* A buffer of `len` bytes at a 2 MiB boundary, advised as transparent huge
 * pages before its first touch; NULL when the mapping fails. The mapping is
 * left to the process's exit. */
static char *thp_buffer(size_t len, int fill) {
    size_t huge = 2u << 20;
    char *p = mmap(NULL, len + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    char *q = (char *)(((unsigned long)p + huge - 1) & ~(unsigned long)(huge - 1));
    (void)madvise(q, len, MADV_HUGEPAGE); /* refused where THP is off: plain pages */
    memset(q, fill, len);
    return q;
}

/* Median seconds of `reps` process_vm_readv copies between two huge-page
 * buffers of `len` bytes (0, and no row, when they cannot be mapped or
 * read). */
static double cma_thp(size_t len, int reps) {
    static double t[MAX_REPS];
    char *src = thp_buffer(len, 1), *dst = thp_buffer(len, 2);
    if (!src || !dst) return 0.0;
    struct iovec local = {dst, len}, remote = {src, len};
    for (int i = 0; i < reps; i++) {
        double t0 = now_s();
        if (process_vm_readv(getpid(), &local, 1, &remote, 1, 0) != (ssize_t)len) return 0.0;
        t[i] = now_s() - t0;
    }
    return median(t, reps);
}

int main(int argc, char **argv) {
    cpu_set_t mask;
    if (sched_getaffinity(0, sizeof mask, &mask) != 0) return perror("sched_getaffinity"), 1;
    int found = 0;
    for (int c = 0; c < CPU_SETSIZE && found < 2; c++)
        if (CPU_ISSET(c, &mask)) cpus[found++] = c;
    if (found < 2) return fprintf(stderr, "xcore_copy: needs two CPUs\n"), 1;
    FILE *csv = argc > 1 ? fopen(argv[1], "w") : NULL;
    if (argc > 1 && !csv) return perror(argv[1]), 1;
    if (csv) fprintf(csv, "op,bytes,reps,median_us\n");
    printf("%10s %10s %10s %10s %10s   (median us; cpus %d and %d)\n", "bytes", "hot", "cross", "cma", "cma_thp", cpus[0],
           cpus[1]);
    static double t[MAX_REPS];
    for (size_t len = 64 << 10; len <= (64u << 20); len *= 4) {
        char *src = aligned_alloc(4096, len), *dst = aligned_alloc(4096, len);
        if (!src || !dst) return fprintf(stderr, "xcore_copy: out of memory\n"), 1;
        memset(src, 1, len);
        memset(dst, 2, len);
        int reps = (int)(400e6 / (double)len);
        reps = reps < 9 ? 9 : reps > MAX_REPS ? MAX_REPS : reps;
        double res[4];

        if (pin(cpus[0]) != 0) return perror("sched_setaffinity"), 1;
        for (int i = 0; i < reps; i++) {
            double t0 = now_s();
            memcpy(dst, src, len);
            __asm__ volatile("" : : "r"(dst) : "memory");
            t[i] = now_s() - t0;
        }
        res[0] = median(t, reps);

        if (cross(src, dst, len, reps, &res[1]) != 0) return 1;

        struct iovec local = {dst, len}, remote = {src, len};
        for (int i = 0; i < reps; i++) {
            double t0 = now_s();
            if (process_vm_readv(getpid(), &local, 1, &remote, 1, 0) != (ssize_t)len) {
                perror("process_vm_readv");
                return 1;
            }
            t[i] = now_s() - t0;
        }
        res[2] = median(t, reps);
        res[3] = len >= (4u << 20) ? cma_thp(len, reps) : 0.0;

        printf("%10zu %10.1f %10.1f %10.1f", len, res[0] * 1e6, res[1] * 1e6, res[2] * 1e6);
        if (res[3] > 0) printf(" %10.1f", res[3] * 1e6);
        printf("\n");
        if (csv) {
            const char *ops[4] = {"hot", "cross", "cma", "cma_thp"};
            for (int k = 0; k < 4; k++)
                if (res[k] > 0) fprintf(csv, "%s,%zu,%d,%.3f\n", ops[k], len, reps, res[k] * 1e6);
        }
        free(src);
        free(dst);
    }

    /* The cross-core copy of 1 MiB over about a second, window by window. */
    size_t len = 1u << 20;
    char *src = aligned_alloc(4096, len), *dst = aligned_alloc(4096, len);
    if (!src || !dst) return fprintf(stderr, "xcore_copy: out of memory\n"), 1;
    memset(dst, 2, len);
    printf("cross-core copy of %zu bytes, %d windows of %d copies %d ms apart:", len, WINDOWS, WINDOW_REPS,
           WINDOW_GAP_MS);
    for (int w = 0; w < WINDOWS; w++) {
        double m;
        if (cross(src, dst, len, WINDOW_REPS, &m) != 0) return 1;
        printf(" %.1f", m * 1e6);
        if (csv) fprintf(csv, "cross_window,%zu,%d,%.3f\n", len, WINDOW_REPS, m * 1e6);
        struct timespec gap = {0, WINDOW_GAP_MS * 1000000L};
        nanosleep(&gap, NULL);
    }
    printf("\n");
    free(src);
    free(dst);
    if (csv) fclose(csv);
    return 0;
}
