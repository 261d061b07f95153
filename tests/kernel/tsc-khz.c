// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//
// Prints this host's TSC rate in kHz, measured against CLOCK_MONOTONIC (the clock QEMU's emulated
// timers follow). Under software emulation the guest's TSC is the host's, so the rig passes the
// result to the nested boot's kernel as `tsc_early_khz=`: see tests/kernel/run.
//
// Five 100 ms samples; a sample whose bracketing clock reads are more than 20 us apart (the
// process was preempted between them) is taken again. Prints the median; exits 1 (printing
// nothing) when no stable reading can be had.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <x86intrin.h>

static int64_t ns_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

// One clock read paired with one TSC read; returns the pair's uncertainty in ns.
static int64_t pair(int64_t *ns, uint64_t *tsc) {
    int64_t before = ns_now();
    *tsc = __rdtsc();
    int64_t after = ns_now();
    *ns = before + (after - before) / 2;
    return after - before;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(void) {
    double khz[5];
    int got = 0;
    for (int tries = 0; got < 5 && tries < 50; tries++) {
        int64_t n0, n1;
        uint64_t t0, t1;
        if (pair(&n0, &t0) > 20000) continue;
        struct timespec nap = {0, 100000000};
        nanosleep(&nap, NULL);
        if (pair(&n1, &t1) > 20000 || n1 <= n0 || t1 <= t0) continue;
        khz[got++] = (double)(t1 - t0) * 1e6 / (double)(n1 - n0);
    }
    if (got < 5) return 1;
    qsort(khz, 5, sizeof khz[0], cmp);
    printf("%.0f\n", khz[2]);
    return 0;
}
