# libFuzzer targets for the runtime's message decoders and the checkpoint
# reader, their seed generator, and a replay of the committed corpora as
# CTest entries. Included from tests/fuzz/CMakeLists.txt, which the top level
# adds when AIRMOE_FUZZ is on (clang only); scripts/fuzz.sh builds and runs
# them. By hand:
#   CC=clang CXX=clang++ cmake -S . -B build-fuzz -DAIRMOE_FUZZ=ON \
#     -DAIRMOE_SANITIZE=ON -DAIRMOE_WITH_MPI=OFF -DAIRMOE_BUILD_PYTHON=OFF \
#     -DAIRMOE_BUILD_EXAMPLES=OFF
#   cmake --build build-fuzz --target airmoe_fuzz_decoders airmoe_fuzz_checkpoint
#   ./build-fuzz/tests/airmoe_fuzz_decoders -max_total_time=60 tests/fuzz/corpus/decoders
# (tests/fuzz/make_corpus.sh regenerates the seed corpora.)
if(AIRMOE_FUZZ)
  # Coverage feedback from the code under test, not only from the harness.
  foreach(lib airmoe_core airmoe_router airmoe_comm airmoe_runtime)
    target_compile_options(${lib} PRIVATE -fsanitize=fuzzer-no-link)
  endforeach()
  foreach(target decoders checkpoint key_records)
    add_executable(airmoe_fuzz_${target} ${CMAKE_CURRENT_LIST_DIR}/fuzz_${target}.cpp)
    target_compile_options(airmoe_fuzz_${target} PRIVATE -fsanitize=fuzzer)
    target_link_options(airmoe_fuzz_${target} PRIVATE -fsanitize=fuzzer)
    target_link_libraries(airmoe_fuzz_${target} PRIVATE airmoe_runtime)
    # Every committed seed runs once, without fuzzing.
    add_test(NAME fuzz_corpus_${target}
      COMMAND airmoe_fuzz_${target} -runs=0 ${CMAKE_CURRENT_LIST_DIR}/corpus/${target})
    set_tests_properties(fuzz_corpus_${target} PROPERTIES LABELS "fuzz" TIMEOUT 300)
  endforeach()
  add_executable(airmoe_fuzz_seeds ${CMAKE_CURRENT_LIST_DIR}/make_seeds.cpp)
  target_link_libraries(airmoe_fuzz_seeds PRIVATE airmoe_runtime)
endif()
