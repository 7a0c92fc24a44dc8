# CMake toolchain: cross-compile pyfork with Zig's C compiler (no docker, no
# sysroot) for a manylinux2014 wheel (glibc 2.17).
#
# Theory of operation: Zig bundles clang, lld, llvm-ar and the headers and
# symbol-versioned stubs of every glibc, so `zig cc -target ARCH-linux-gnu.2.17`
# produces objects and shared objects that need nothing newer than glibc 2.17,
# for either architecture, from this x86_64 host. CMake wants single
# executables for the compiler, archiver and linker, so this file writes four
# one-line wrapper scripts (zig cc / ar / ranlib / ld.lld with the target baked
# in) into the build tree. The linker is only used by CMakeLists.txt's
# `ld -r` partial link of libpyfork.a; llvm-objcopy and llvm-nm (host tools,
# all targets) stand in for binutils' objcopy/nm, which know only x86_64.
#
# Inputs (environment, so they reach try_compile and scikit-build-core alike):
#   PYFORK_ZIG_ARCH  x86_64 or aarch64 (required)
#   PYFORK_ZIG       path of the zig executable (default: `zig` on PATH)
#   PYFORK_GLIBC     glibc version to target (default 2.17, manylinux2014)
# .ci/build-wheels sets them; by hand:
#   PYFORK_ZIG_ARCH=aarch64 PYFORK_ZIG=$(python -c 'import ziglang,os;print(os.path.dirname(ziglang.__file__))')/zig \
#     cmake -S . -B build-arm --toolchain csrc/cmake/zig-toolchain.cmake

set(_arch "$ENV{PYFORK_ZIG_ARCH}")
if(NOT _arch MATCHES "^(x86_64|aarch64)$")
  message(FATAL_ERROR "zig-toolchain.cmake: set PYFORK_ZIG_ARCH to x86_64 or aarch64 (got '${_arch}')")
endif()
set(_zig "$ENV{PYFORK_ZIG}")
if(NOT _zig)
  find_program(_zig zig REQUIRED)
endif()
set(_glibc "$ENV{PYFORK_GLIBC}")
if(NOT _glibc)
  set(_glibc "2.17")
endif()
set(_target "${_arch}-linux-gnu.${_glibc}")

set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR "${_arch}")

# The wrappers live beside the cache, one set per target; rewriting them on
# every inclusion (try_compile includes this file again) is harmless.
set(_bin "${CMAKE_BINARY_DIR}/zig-${_target}")
file(MAKE_DIRECTORY "${_bin}")
foreach(_tool cc ar ranlib ld)
  if(_tool STREQUAL "cc")
    set(_cmd "cc -target ${_target}")
  elseif(_tool MATCHES "^(ar|ranlib)$")
    set(_cmd "${_tool}")
  else()
    set(_cmd "ld.lld")
  endif()
  file(WRITE "${_bin}/zig-${_tool}" "#!/bin/sh\nexec \"${_zig}\" ${_cmd} \"$@\"\n")
  file(CHMOD "${_bin}/zig-${_tool}" PERMISSIONS OWNER_READ OWNER_WRITE OWNER_EXECUTE
       GROUP_READ GROUP_EXECUTE WORLD_READ WORLD_EXECUTE)
endforeach()

set(CMAKE_C_COMPILER "${_bin}/zig-cc")
set(CMAKE_AR "${_bin}/zig-ar" CACHE FILEPATH "zig ar" FORCE)
set(CMAKE_RANLIB "${_bin}/zig-ranlib" CACHE FILEPATH "zig ranlib" FORCE)
set(CMAKE_LINKER "${_bin}/zig-ld" CACHE FILEPATH "zig ld.lld" FORCE)
find_program(_llvm_objcopy NAMES llvm-objcopy llvm-objcopy-19 llvm-objcopy-18 llvm-objcopy-17
             llvm-objcopy-16 llvm-objcopy-15 llvm-objcopy-14 REQUIRED)
find_program(_llvm_nm NAMES llvm-nm llvm-nm-19 llvm-nm-18 llvm-nm-17 llvm-nm-16 llvm-nm-15
             llvm-nm-14 REQUIRED)
set(CMAKE_OBJCOPY "${_llvm_objcopy}" CACHE FILEPATH "llvm-objcopy (all targets)" FORCE)
set(CMAKE_NM "${_llvm_nm}" CACHE FILEPATH "llvm-nm (all targets)" FORCE)

# Nothing from the host's /usr/include or /usr/lib: Zig supplies libc.
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
