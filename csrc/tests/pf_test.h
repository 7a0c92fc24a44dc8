/* pf_test.h -- the tiny assertion kit shared by the C unit tests.
 *
 * Theory of operation: every csrc/tests/test_*.c is its own executable,
 * registered with ctest by CMakeLists.txt (one ctest test per file). A test
 * file defines functions `static void test_xxx(void)` and a main() that calls
 * PF_RUN(test_xxx) for each and returns PF_DONE(). A failing CHECK prints
 * file:line and the expression and exits 1 at once (no unwinding: the process
 * is thrown away, which also keeps forked children from reporting success).
 * ctest shows the "PASS name" / "FAIL ..." lines with --output-on-failure or -V.
 *
 * Header-only, no globals shared across files (each test is one translation
 * unit plus the pyfork_core static library).
 */
#ifndef PF_TEST_H
#define PF_TEST_H

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Fail the whole executable: print where and why, exit 1. */
#define CHECK(cond)                                                          \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "FAIL %s:%d: CHECK(%s) errno=%d (%s)\n",         \
                    __FILE__, __LINE__, #cond, errno, strerror(errno));      \
            fflush(stderr);                                                  \
            exit(1);                                                         \
        }                                                                    \
    } while (0)

/* Compare two integers and print both values on failure. */
#define CHECK_EQ(a, b)                                                       \
    do {                                                                     \
        long long pf_a_ = (long long)(a), pf_b_ = (long long)(b);            \
        if (pf_a_ != pf_b_) {                                                \
            fprintf(stderr, "FAIL %s:%d: CHECK_EQ(%s, %s): %lld != %lld\n",  \
                    __FILE__, __LINE__, #a, #b, pf_a_, pf_b_);               \
            fflush(stderr);                                                  \
            exit(1);                                                         \
        }                                                                    \
    } while (0)

/* A pf_* call that must return >= 0; prints the -errno name otherwise. */
#define CHECK_OK(expr)                                                       \
    do {                                                                     \
        long long pf_rc_ = (long long)(expr);                                \
        if (pf_rc_ < 0) {                                                    \
            fprintf(stderr, "FAIL %s:%d: %s returned %lld (%s)\n",           \
                    __FILE__, __LINE__, #expr, pf_rc_,                       \
                    strerror((int)-pf_rc_));                                 \
            fflush(stderr);                                                  \
            exit(1);                                                         \
        }                                                                    \
    } while (0)

/* Run one test function and print a line ctest's log can show. */
#define PF_RUN(fn)                                                           \
    do {                                                                     \
        fprintf(stdout, "RUN  %s\n", #fn);                                   \
        fflush(stdout);                                                      \
        fn();                                                                \
        fprintf(stdout, "PASS %s\n", #fn);                                   \
        fflush(stdout);                                                      \
    } while (0)

/* End of main(): reaching it means every CHECK held. */
#define PF_DONE() (fprintf(stdout, "PASS all (%s)\n", __FILE__), fflush(stdout), 0)

#endif
