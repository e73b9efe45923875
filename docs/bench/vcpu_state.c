/*
 * vcpu_state.c - which state the host's two vCPUs are in right now, for
 * reading a benchmark that ran beside it (docs/PERFORMANCE.md, run 21).
 *
 * On the project's 2-vCPU VM the cost of a cache line that the other vCPU
 * wrote moves between states that last from a second to tens of seconds:
 * a 16 KiB hand-over through one shared buffer (one thread copies its
 * buffer into the shared one and flags it, the other copies it out, then
 * the same back) took about 0.8, 2-3 or 9-12 us per one-way hand-over,
 * and a benchmark's figures from 4 KiB up move with it. The probe runs
 * that ping-pong (plain memcpy, threads pinned to the first two CPUs of
 * the affinity mask) for about 20-100 ms and prints
 *
 *   <tag>,<unix time>,<median us of 5 batches of 1000 hand-overs>
 *
 * to stdout (and appends it to the CSV file given). p2p-goals.py reads the
 * figure taken before and after each measurement: at most 1.5 us "close",
 * at most 5 us "near", above "far".
 * Build: gcc -O2 -Wall -pthread -o vcpu_state vcpu_state.c
 * Run:   ./vcpu_state TAG [out.csv]
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define LEN (16 << 10)
#define BATCHES 5
#define PER_BATCH 1000

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static _Alignas(64) atomic_long posted[2][8];
static char *shared[2], *own[2], *back[2];
static int cpus[2];
static double batch_s[BATCHES];

static void pin(int cpu) {
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    if (sched_setaffinity(0, sizeof s, &s) != 0) perror("vcpu_state: pinning");
}

static void wait_for(int side, long n) {
    while (atomic_load_explicit(&posted[side][0], memory_order_acquire) < n) __builtin_ia32_pause();
}

static void *side(void *arg) {
    int me = (int)(long)arg;
    pin(cpus[me]);
    long n = 0;
    for (int b = 0; b < BATCHES; b++) {
        double t0 = now_s();
        for (int i = 0; i < PER_BATCH; i++) {
            n++;
            if (me == 0) {
                memcpy(shared[0], own[0], LEN);
                atomic_store_explicit(&posted[0][0], n, memory_order_release);
                wait_for(1, n);
                memcpy(back[0], shared[1], LEN);
            } else {
                wait_for(0, n);
                memcpy(back[1], shared[0], LEN);
                memcpy(shared[1], own[1], LEN);
                atomic_store_explicit(&posted[1][0], n, memory_order_release);
            }
        }
        if (me == 0) batch_s[b] = (now_s() - t0) / (2.0 * PER_BATCH);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2) return fprintf(stderr, "usage: vcpu_state TAG [out.csv]\n"), 2;
    cpu_set_t s;
    if (sched_getaffinity(0, sizeof s, &s) != 0) return perror("sched_getaffinity"), 1;
    int found = 0;
    for (int c = 0; c < CPU_SETSIZE && found < 2; c++)
        if (CPU_ISSET(c, &s)) cpus[found++] = c;
    if (found < 2) return fprintf(stderr, "vcpu_state: needs two CPUs\n"), 1;
    for (int j = 0; j < 2; j++) {
        shared[j] = aligned_alloc(4096, LEN);
        own[j] = aligned_alloc(4096, LEN);
        back[j] = aligned_alloc(4096, LEN);
        if (!shared[j] || !own[j] || !back[j]) return fprintf(stderr, "vcpu_state: no memory\n"), 1;
        memset(shared[j], 0, LEN);
        memset(own[j], j + 1, LEN);
        memset(back[j], 0, LEN);
    }
    pthread_t t[2];
    for (long j = 0; j < 2; j++)
        if (pthread_create(&t[j], NULL, side, (void *)j) != 0) return fprintf(stderr, "vcpu_state: no thread\n"), 1;
    for (int j = 0; j < 2; j++) pthread_join(t[j], NULL);
    qsort(batch_s, BATCHES, sizeof(double), cmp_d);
    char line[256];
    snprintf(line, sizeof line, "%s,%.0f,%.3f\n", argv[1], (double)time(NULL), batch_s[BATCHES / 2] * 1e6);
    fputs(line, stdout);
    if (argc > 2) {
        FILE *f = fopen(argv[2], "a");
        if (!f) return perror(argv[2]), 1;
        fputs(line, f);
        fclose(f);
    }
    return 0;
}
