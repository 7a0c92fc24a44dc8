/* pf_test.h -- the tiny assertion kit shared by the C unit tests.
 *
 * Theory of operation: every csrc/tests/test_*.c is its own executable,
 * registered with ctest by CMakeLists.txt (one ctest test per file). Every
 * test file follows one convention:
 *
 *     static void test_xxx(void) { ... CHECK(...); ... }
 *     static const struct pf_test_case tests[] = {
 *         PF_CASE(test_xxx), PF_CASE(test_yyy),
 *     };
 *     int main(int argc, char **argv)
 *     {
 *         return pf_run_cases(tests, PF_NCASES(tests), argc, argv);
 *     }
 *
 * The table runs in order; `./test_xxx NAME` runs only the cases whose name
 * contains NAME (a debugging aid; ctest runs them all). main() may set up
 * what the whole file needs first (an alarm() liveness guard, SIGPIPE
 * ignored). A failing CHECK prints file:line and the expression and exits 1
 * at once (no unwinding: the process is thrown away, which also keeps forked
 * children from reporting success). ctest shows the "RUN name" / "PASS name"
 * / "FAIL ..." lines with --output-on-failure or -V.
 *
 * Header-only, no globals shared across files (each test is one translation
 * unit plus the pyfork_core static library).
 */
#ifndef PF_TEST_H
#define PF_TEST_H

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Print "FAIL file:line: " and a printf-style message, then exit 1. */
#define PF_FAIL(...)                                                         \
    do {                                                                     \
        fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                 \
        fprintf(stderr, __VA_ARGS__);                                        \
        fputc('\n', stderr);                                                 \
        fflush(stderr);                                                      \
        exit(1);                                                             \
    } while (0)

/* Fail the whole executable: print where and why, exit 1. */
#define CHECK(cond)                                                          \
    do {                                                                     \
        if (!(cond)) {                                                       \
            int pf_e_ = errno;                                               \
            PF_FAIL("CHECK(%s) errno=%d (%s)", #cond, pf_e_, strerror(pf_e_)); \
        }                                                                    \
    } while (0)

/* Compare two integers and print both values on failure. */
#define CHECK_EQ(a, b)                                                       \
    do {                                                                     \
        long long pf_a_ = (long long)(a), pf_b_ = (long long)(b);            \
        if (pf_a_ != pf_b_)                                                  \
            PF_FAIL("CHECK_EQ(%s, %s): %lld != %lld", #a, #b, pf_a_, pf_b_); \
    } while (0)

/* A pf_* call that must return >= 0; prints the -errno name otherwise. */
#define CHECK_OK(expr)                                                       \
    do {                                                                     \
        long long pf_rc_ = (long long)(expr);                                \
        if (pf_rc_ < 0)                                                      \
            PF_FAIL("%s returned %lld (%s)", #expr, pf_rc_,                  \
                    strerror((int)-pf_rc_));                                 \
    } while (0)

/* Scans /proc/self/fd: returns how many fds are open (not counting the
 * scan's own) and, if hi is not NULL, stores the highest of them in *hi. */
static inline int pf_scan_fds(int *hi)
{
    DIR *dir = opendir("/proc/self/fd");
    struct dirent *e;
    int n = 0, self;

    CHECK(dir != NULL);
    self = dirfd(dir);
    if (hi != NULL)
        *hi = -1;
    while ((e = readdir(dir)) != NULL) {
        int fd = atoi(e->d_name);
        if (e->d_name[0] == '.' || fd == self)
            continue;
        n++;
        if (hi != NULL && fd > *hi)
            *hi = fd;
    }
    closedir(dir);
    return n;
}

/* How many fds this process has open: tests compare it before and after. */
static inline int count_fds(void)
{
    return pf_scan_fds(NULL);
}

/* One entry of a test file's table: the test function and its name. */
struct pf_test_case {
    const char *name;
    void (*fn)(void);
};
#define PF_CASE(fn) { #fn, fn }
/* The number of entries in a table (an array, not a pointer). */
#define PF_NCASES(table) (sizeof(table) / sizeof((table)[0]))

/* Returns 0 (main's exit status) after running, in order, the n cases whose
 * name contains argv[1] (all of them without one), each between a RUN and a
 * PASS line. A failing case never returns: its CHECK exits 1. */
static inline int pf_run_cases(const struct pf_test_case *t, size_t n, int argc, char **argv)
{
    for (size_t i = 0; i < n; i++) {
        if (argc > 1 && strstr(t[i].name, argv[1]) == NULL)
            continue;
        fprintf(stdout, "RUN  %s\n", t[i].name);
        fflush(stdout);
        t[i].fn();
        fprintf(stdout, "PASS %s\n", t[i].name);
        fflush(stdout);
    }
    fprintf(stdout, "PASS all (%s)\n", argv[0]);
    fflush(stdout);
    return 0;
}

#endif
