# onnxruntime's C/C++ API headers (onnxruntime_lite_custom_op.h and friends) into ORT_INCLUDE_DIR,
# looked for in this order:
#   1. the folder the user gives: -DORT_INCLUDE_DIR=... (pip: environment ONNXRUNTIME_INCLUDE_DIR);
#   2. headers installed on the system (e.g. Debian/Ubuntu's libonnxruntime-dev);
#   3. fetched (NORMFOLD_FETCH_ORT_HEADERS, ON by default): Debian trixie's libonnxruntime-dev,
#      downloaded with a private apt configuration and unpacked in the build folder.
# Otherwise configuring fails with one line saying which of the three to provide.
# Sets NORMFOLD_ORT_API_VERSION (ORT_API_VERSION of those headers) and NORMFOLD_ORT_HEADERS_FROM.
# NORMFOLD_HARNESS_ONLY=ON (build.sh's CUDA harness build, which needs no onnxruntime) skips all this.
option(NORMFOLD_HARNESS_ONLY "configure for the CUDA harness alone: no onnxruntime headers needed" OFF)
if(NORMFOLD_HARNESS_ONLY)
  return()
endif()
option(NORMFOLD_FETCH_ORT_HEADERS "fetch onnxruntime's headers (Debian libonnxruntime-dev) when none are found" ON)
set(_ort_header onnxruntime_lite_custom_op.h)
set(_ort_choices "give their folder (ONNXRUNTIME_INCLUDE_DIR=... or -DORT_INCLUDE_DIR=...), install them on the system (e.g. apt-get install libonnxruntime-dev), or allow fetching them (NORMFOLD_FETCH_ORT_HEADERS=ON, needs apt-get, dpkg and access to Debian); NORMFOLD_NO_KERNELS=1 installs normfold without its kernels")

function(normfold_headers_fail reason)
  # message(NOTICE) prints the line as it is; FATAL_ERROR alone would wrap and indent it
  message(NOTICE "normfold: ${reason}: ${_ort_choices}")
  message(FATAL_ERROR "onnxruntime headers not found (see the line above)")
endfunction()

if(ORT_INCLUDE_DIR)
  if(NOT EXISTS "${ORT_INCLUDE_DIR}/${_ort_header}")
    normfold_headers_fail("onnxruntime C/C++ API headers not found: the folder given (${ORT_INCLUDE_DIR}) has no ${_ort_header}")
  endif()
  set(NORMFOLD_ORT_HEADERS_FROM "given")
else()
  find_path(NORMFOLD_SYSTEM_ORT_INCLUDE_DIR ${_ort_header} PATH_SUFFIXES onnxruntime onnxruntime/core/session)
  if(NORMFOLD_SYSTEM_ORT_INCLUDE_DIR)
    set(ORT_INCLUDE_DIR "${NORMFOLD_SYSTEM_ORT_INCLUDE_DIR}")
    set(NORMFOLD_ORT_HEADERS_FROM "system")
  elseif(NORMFOLD_FETCH_ORT_HEADERS)
    set(_fetched "${CMAKE_BINARY_DIR}/onnxruntime-headers")
    if(NOT EXISTS "${_fetched}/usr/include/onnxruntime/${_ort_header}")
      message(STATUS "normfold: fetching onnxruntime's headers (Debian trixie libonnxruntime-dev) into ${_fetched}")
      execute_process(COMMAND bash "${CMAKE_CURRENT_LIST_DIR}/fetch_onnxruntime_headers.sh" "${_fetched}"
                      RESULT_VARIABLE _rc ERROR_VARIABLE _why ERROR_STRIP_TRAILING_WHITESPACE)
      if(NOT _rc EQUAL 0)
        normfold_headers_fail("onnxruntime C/C++ API headers not found on the system, and fetching them failed (${_why})")
      endif()
    endif()
    set(ORT_INCLUDE_DIR "${_fetched}/usr/include/onnxruntime")
    set(NORMFOLD_ORT_HEADERS_FROM "fetched")
  else()
    normfold_headers_fail("onnxruntime C/C++ API headers not found (none given, none on the system, fetching is off)")
  endif()
endif()

file(STRINGS "${ORT_INCLUDE_DIR}/onnxruntime_c_api.h" _api_line REGEX "^#define ORT_API_VERSION [0-9]+")
string(REGEX MATCH "[0-9]+" NORMFOLD_ORT_API_VERSION "${_api_line}")
message(STATUS "normfold: onnxruntime headers (${NORMFOLD_ORT_HEADERS_FROM}, API version ${NORMFOLD_ORT_API_VERSION}): ${ORT_INCLUDE_DIR}")
