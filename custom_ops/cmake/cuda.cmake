# NORMFOLD_CUDA=AUTO (what pip builds pass unless NORMFOLD_CUDA is set in the environment) becomes ON
# where nvcc is found (on PATH or in /usr/local/cuda/bin), OFF elsewhere. NORMFOLD_CUDA_NOT_BUILT
# says why the CUDA library is not built (installed as normfold/_ops/CUDA_NOT_BUILT.txt for doctor).
if(NORMFOLD_CUDA STREQUAL "AUTO")
  find_program(NORMFOLD_NVCC nvcc HINTS /usr/local/cuda/bin)
  if(NORMFOLD_NVCC)
    set(NORMFOLD_CUDA ON)
    if(NOT CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX})
      set(CMAKE_CUDA_COMPILER "${NORMFOLD_NVCC}")
    endif()
  else()
    set(NORMFOLD_CUDA OFF)
    set(NORMFOLD_CUDA_NOT_BUILT "nvcc not found when normfold was built")
  endif()
elseif(NOT NORMFOLD_CUDA)
  set(NORMFOLD_CUDA_NOT_BUILT "turned off when normfold was built (NORMFOLD_CUDA=${NORMFOLD_CUDA})")
endif()
message(STATUS "normfold: CUDA library: ${NORMFOLD_CUDA} ${NORMFOLD_CUDA_NOT_BUILT}")
