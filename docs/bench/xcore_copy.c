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
 *
 * Each figure is the median over repetitions, in microseconds.
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
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAX_REPS 400

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
    printf("%10s %10s %10s %10s   (median us; cpus %d and %d)\n", "bytes", "hot", "cross", "cma", cpus[0], cpus[1]);
    static double t[MAX_REPS];
    for (size_t len = 64 << 10; len <= (64u << 20); len *= 4) {
        char *src = aligned_alloc(4096, len), *dst = aligned_alloc(4096, len);
        if (!src || !dst) return fprintf(stderr, "xcore_copy: out of memory\n"), 1;
        memset(src, 1, len);
        memset(dst, 2, len);
        int reps = (int)(400e6 / (double)len);
        reps = reps < 9 ? 9 : reps > MAX_REPS ? MAX_REPS : reps;
        double res[3];

        if (pin(cpus[0]) != 0) return perror("sched_setaffinity"), 1;
        for (int i = 0; i < reps; i++) {
            double t0 = now_s();
            memcpy(dst, src, len);
            __asm__ volatile("" : : "r"(dst) : "memory");
            t[i] = now_s() - t0;
        }
        res[0] = median(t, reps);

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
        res[1] = median(t, reps);

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

        printf("%10zu %10.1f %10.1f %10.1f\n", len, res[0] * 1e6, res[1] * 1e6, res[2] * 1e6);
        if (csv) {
            const char *ops[3] = {"hot", "cross", "cma"};
            for (int k = 0; k < 3; k++) fprintf(csv, "%s,%zu,%d,%.3f\n", ops[k], len, reps, res[k] * 1e6);
        }
        free(src);
        free(dst);
    }
    if (csv) fclose(csv);
    return 0;
}
