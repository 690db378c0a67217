# Build facts compiled into each library, and where pip puts the libraries: normfold/_ops/ in the
# installed package (scikit-build-core installs into the wheel's platlib folder).
set(_libraries normfold_ops)
if(TARGET normfold_ops_cuda)
  list(APPEND _libraries normfold_ops_cuda)
endif()
foreach(_library IN LISTS _libraries)
  target_sources(${_library} PRIVATE "${CMAKE_CURRENT_LIST_DIR}/build_info.cc")
endforeach()
install(TARGETS ${_libraries} LIBRARY DESTINATION normfold/_ops)
if(NORMFOLD_CUDA_NOT_BUILT)
  file(WRITE "${CMAKE_BINARY_DIR}/CUDA_NOT_BUILT.txt" "${NORMFOLD_CUDA_NOT_BUILT}\n")
  install(FILES "${CMAKE_BINARY_DIR}/CUDA_NOT_BUILT.txt" DESTINATION normfold/_ops)
endif()
