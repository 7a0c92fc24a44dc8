/* abi.c -- the run-time check that an embedder's header matches this library.
 *
 * Theory of operation: the wheel ships pyfork.h and libpyfork.a together
 * (pyfork.get_include(), pyfork.get_library_dir()). A program built with one
 * wheel's header and another's library would pass structs of the wrong size
 * or layout without any compiler noticing. PF_ABI_CHECK() in pyfork.h expands
 * to a call here with the caller's PF_VERSION and sizeof of every public
 * struct; this file compares them with the values the library itself was
 * compiled with. Sizes are compared at run time, so the rule holds whatever
 * fields a struct gains: PF_VERSION is bumped for any change to a struct's
 * layout, a function's signature or the channel's wire format, and a size
 * that differs under an equal version means the header was altered.
 * The Python binding needs none of this (cffi compiles against the header).
 */
#include <errno.h>
#include <stddef.h>

#include "pyfork.h"

/* Returns 0 when version == PF_VERSION and every size matches this library's,
 * -EPROTO for another version, -EINVAL for a size mismatch. */
int pf_abi_check(int version, size_t sizeof_msg_hdr, size_t sizeof_slot,
                 size_t sizeof_config, size_t sizeof_event, size_t sizeof_stats,
                 size_t sizeof_worker_stats)
{
    if (version != PF_VERSION)
        return -EPROTO;
    if (sizeof_msg_hdr != sizeof(pf_msg_hdr) || sizeof_slot != sizeof(pf_slot) ||
        sizeof_config != sizeof(pf_config) || sizeof_event != sizeof(pf_event) ||
        sizeof_stats != sizeof(pf_stats) || sizeof_worker_stats != sizeof(pf_worker_stats))
        return -EINVAL;
    return 0;
}
