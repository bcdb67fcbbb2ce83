# `cmake --install`: headers, libraries, the CMake package (airmoeConfig.cmake,
# imported targets airmoe::*), a pkg-config file for the C API, and the
# version header. Included last from the top-level CMakeLists.txt.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

# C++ headers keep their folder paths ("router/air_router.h") under
# include/airmoe; the C API's airmoe.h and airmoe_version.h sit in include/.
set(AIRMOE_INSTALL_CXX_INCLUDEDIR ${CMAKE_INSTALL_INCLUDEDIR}/airmoe)
set(airmoe_libraries airmoe_core airmoe_ops airmoe_router airmoe_comm airmoe_runtime)
if(AIRMOE_WITH_MPI)
  list(APPEND airmoe_libraries airmoe_comm_mpi airmoe_c)
endif()
foreach(lib IN LISTS airmoe_libraries)
  string(REPLACE "airmoe_" "" export_name ${lib})
  set_target_properties(${lib} PROPERTIES EXPORT_NAME ${export_name})
endforeach()

install(TARGETS ${airmoe_libraries} EXPORT airmoeTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  PUBLIC_HEADER DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}
  INCLUDES DESTINATION ${AIRMOE_INSTALL_CXX_INCLUDEDIR} ${CMAKE_INSTALL_INCLUDEDIR})
foreach(folder core ops router comm runtime)
  install(DIRECTORY ${PROJECT_SOURCE_DIR}/${folder} DESTINATION ${AIRMOE_INSTALL_CXX_INCLUDEDIR}
          FILES_MATCHING PATTERN "*.h")
endforeach()
install(FILES ${AIRMOE_GENERATED_DIR}/airmoe_version.h DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})

set(airmoe_cmake_dir ${CMAKE_INSTALL_LIBDIR}/cmake/airmoe)
install(EXPORT airmoeTargets NAMESPACE airmoe:: DESTINATION ${airmoe_cmake_dir})
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/airmoeConfig.cmake.in
  ${PROJECT_BINARY_DIR}/airmoeConfig.cmake INSTALL_DESTINATION ${airmoe_cmake_dir})
# 0.x: a minor version may change the API, so only the same minor matches.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/airmoeConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/airmoeConfig.cmake ${PROJECT_BINARY_DIR}/airmoeConfigVersion.cmake
        DESTINATION ${airmoe_cmake_dir})

if(AIRMOE_WITH_MPI)
  # The prefix is substituted at install time, so the file is right for
  # `cmake --install --prefix DIR` as for the configured prefix.
  install(CODE "
    set(CMAKE_INSTALL_PREFIX \"\${CMAKE_INSTALL_PREFIX}\")
    set(CMAKE_INSTALL_LIBDIR \"${CMAKE_INSTALL_LIBDIR}\")
    set(CMAKE_INSTALL_INCLUDEDIR \"${CMAKE_INSTALL_INCLUDEDIR}\")
    set(PROJECT_VERSION \"${PROJECT_VERSION}\")
    configure_file(\"${PROJECT_SOURCE_DIR}/cmake/airmoe_c.pc.in\"
                   \"\${CMAKE_INSTALL_PREFIX}/${CMAKE_INSTALL_LIBDIR}/pkgconfig/airmoe_c.pc\" @ONLY)")
endif()

# The installed tree, used by another project (scripts/check_install.sh):
# not in sanitizer builds, whose archives need the sanitizer runtime.
if(AIRMOE_BUILD_TESTS AND AIRMOE_WITH_MPI AND NOT AIRMOE_SANITIZE)
  add_test(NAME install_consumer COMMAND bash ${PROJECT_SOURCE_DIR}/scripts/check_install.sh
                                         ${PROJECT_BINARY_DIR})
  set_tests_properties(install_consumer PROPERTIES LABELS "unit" TIMEOUT 300)
endif()
