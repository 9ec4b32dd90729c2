// test_main.cpp — doctest's main() for the CPU test runner; the checks live in the
// other test/*.cpp files, one per area.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
