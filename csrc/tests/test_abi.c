/* test_abi.c -- pf_abi_check (abi.c): the header's PF_ABI_CHECK() passes, and
 * another version or any one struct size of another size fails loudly.
 *
 * Theory of operation: PF_ABI_CHECK() expands to a call with this translation
 * unit's view of the structs, which is the library's (same header, same
 * build); the failures are produced by calling pf_abi_check by hand with one
 * argument off. */
#include <errno.h>

#include "pyfork.h"
#include "pf_test.h"

static void test_same_header_passes(void)
{
    CHECK_EQ(PF_ABI_CHECK(), 0);
}

static void test_other_version_is_eproto(void)
{
    CHECK_EQ(pf_abi_check(PF_VERSION + 1, sizeof(pf_msg_hdr), sizeof(pf_slot), sizeof(pf_config),
                          sizeof(pf_event), sizeof(pf_stats), sizeof(pf_worker_stats)), -EPROTO);
    CHECK_EQ(pf_abi_check(0, sizeof(pf_msg_hdr), sizeof(pf_slot), sizeof(pf_config),
                          sizeof(pf_event), sizeof(pf_stats), sizeof(pf_worker_stats)), -EPROTO);
}

static void test_each_size_is_checked(void)
{
    size_t s[6] = {sizeof(pf_msg_hdr), sizeof(pf_slot), sizeof(pf_config),
                   sizeof(pf_event), sizeof(pf_stats), sizeof(pf_worker_stats)};

    for (int i = 0; i < 6; i++) {
        size_t t[6];
        for (int j = 0; j < 6; j++)
            t[j] = s[j];
        t[i] += 8;   /* a field added on one side only */
        CHECK_EQ(pf_abi_check(PF_VERSION, t[0], t[1], t[2], t[3], t[4], t[5]), -EINVAL);
    }
}

static const struct pf_test_case tests[] = {
    PF_CASE(test_same_header_passes),
    PF_CASE(test_other_version_is_eproto),
    PF_CASE(test_each_size_is_checked),
};

int main(int argc, char **argv)
{
    return pf_run_cases(tests, PF_NCASES(tests), argc, argv);
}
