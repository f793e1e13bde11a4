/*
 * rdmig-guest: the workload of the project's Linux test guest (ci/qemu-guest-setup builds it
 * static into the guest's initramfs; init runs it as its only child).
 *
 * It keeps a working set of pages and rewrites them, one pass after another, at a set rate.
 * Every page it writes carries a stamp: its index, the pass ("generation") that wrote it and a
 * body derived from both. Before it rewrites a page it checks the page still holds exactly what
 * the previous pass wrote there (index, generation and body), so a page lost, torn or left stale
 * by a migration shows up as bad at the latest one pass later. Its own bookkeeping (pass, cursor,
 * counters) lives in guest RAM too and moves with the guest, so after a migration the generations
 * continue from where the source stopped.
 *
 * Once a second it prints on the console:
 *   RDMIG-GUEST ok=<pages verified> bad=<pages wrong> gen=<pass> ws=<pages> rate=<KiB/s>
 * and for the first few bad pages a line RDMIG-GUEST-BAD page=... want=... got=...
 *
 * Parameters (kernel command line, read from /proc/cmdline):
 *   rdmig.ws=<MiB>      working set (default 64)
 *   rdmig.rate=<MiB/s>  rewrite rate (default 16; 0 = write the set once, then only verify it)
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>

#define PAGE 4096u
#define WORDS (PAGE / 8u)
#define MAGIC 0x52444d0000000000ull /* "RDM" in the top three bytes, the index below */

static uint64_t mix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

/* Word w of page `idx` in generation `gen` (words 0 and 1 are the stamp). */
static uint64_t body(uint64_t idx, uint64_t gen, uint64_t w)
{
    return mix(idx * 0x9e3779b97f4a7c15ull ^ (gen << 20) ^ w);
}

static void stamp(volatile uint64_t *p, uint64_t idx, uint64_t gen)
{
    p[0] = MAGIC | (idx & 0xffffffffffull);
    p[1] = gen;
    for (uint64_t w = 2; w < WORDS; w++)
        p[w] = body(idx, gen, w);
}

/* 0 when page `idx` holds generation `gen`; else the generation found (or ~0 for garbage). */
static uint64_t check(volatile const uint64_t *p, uint64_t idx, uint64_t gen, uint64_t *got)
{
    *got = p[1];
    if (p[0] != (MAGIC | (idx & 0xffffffffffull)))
        return 1;
    if (p[1] != gen)
        return 1;
    for (uint64_t w = 2; w < WORDS; w++)
        if (p[w] != body(idx, gen, w))
            return 1;
    return 0;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static unsigned long param(const char *cmdline, const char *key, unsigned long dflt)
{
    const char *p = cmdline;
    size_t n = strlen(key);
    while ((p = strstr(p, key)) != NULL) {
        if ((p == cmdline || p[-1] == ' ') && p[n] == '=')
            return strtoul(p + n + 1, NULL, 10);
        p += n;
    }
    return dflt;
}

int main(void)
{
    char cmdline[4096] = "";
    FILE *f = fopen("/proc/cmdline", "r");
    if (f) {
        if (!fgets(cmdline, sizeof cmdline, f))
            cmdline[0] = 0;
        fclose(f);
    }
    unsigned long ws_mib = param(cmdline, "rdmig.ws", 64);
    unsigned long rate_mib = param(cmdline, "rdmig.rate", 16);
    uint64_t pages = (uint64_t)ws_mib * (1u << 20) / PAGE;
    if (pages == 0)
        pages = 1;
    uint64_t *ws = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (ws == MAP_FAILED) {
        printf("RDMIG-GUEST-FAIL mmap of %lu MiB failed\n", ws_mib);
        return 1;
    }
    mlock(ws, pages * PAGE);
    setvbuf(stdout, NULL, _IOLBF, 0);

    /* Generation 0: the whole set, as fast as possible. */
    for (uint64_t i = 0; i < pages; i++)
        stamp(ws + i * WORDS, i, 0);
    printf("RDMIG-GUEST start ws=%lu rate=%lu pages=%llu\n", ws_mib, rate_mib,
           (unsigned long long)pages);

    uint64_t gen = 1, cursor = 0, ok = 0, bad = 0;
    double per_page = rate_mib ? (double)PAGE / ((double)rate_mib * (1u << 20)) : 0.0;
    double t = now(), next_report = t + 1.0, budget_t = t;
    for (;;) {
        double n = now();
        if (rate_mib == 0) {
            /* Verify only: one pass over the set a second. */
            for (uint64_t i = 0; i < pages; i++) {
                uint64_t got;
                if (check(ws + i * WORDS, i, 0, &got))
                    bad++;
                else
                    ok++;
            }
            budget_t = n + 1.0;
        } else {
            /* Catch up with the clock, at most 100 ms' worth at once (a migration's downtime
             * or a descheduled vCPU must not turn into a burst). */
            if (budget_t < n - 0.1)
                budget_t = n - 0.1;
            while (budget_t < n) {
                volatile uint64_t *p = ws + cursor * WORDS;
                uint64_t got;
                if (check(p, cursor, gen - 1, &got)) {
                    if (bad < 8)
                        printf("RDMIG-GUEST-BAD page=%llu want=%llu got=%llu\n",
                               (unsigned long long)cursor, (unsigned long long)(gen - 1),
                               (unsigned long long)got);
                    bad++;
                } else {
                    ok++;
                }
                stamp(p, cursor, gen);
                budget_t += per_page;
                if (++cursor == pages) {
                    cursor = 0;
                    gen++;
                }
            }
        }
        if (n >= next_report) {
            printf("RDMIG-GUEST ok=%llu bad=%llu gen=%llu ws=%llu rate=%lu\n",
                   (unsigned long long)ok, (unsigned long long)bad, (unsigned long long)gen,
                   (unsigned long long)pages, rate_mib << 10);
            next_report += 1.0;
            if (next_report < n)
                next_report = n + 1.0;
        }
        double sleep_s = budget_t - now();
        if (sleep_s > 0.01)
            sleep_s = 0.01;
        if (rate_mib == 0)
            sleep_s = 1.0;
        if (sleep_s > 0) {
            struct timespec ts = {0, (long)(sleep_s * 1e9)};
            nanosleep(&ts, NULL);
        }
    }
}
