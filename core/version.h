// The library's version as macros (AIRMOE_VERSION_MAJOR, _MINOR, _PATCH,
// _STRING and AIRMOE_VERSION = major * 10000 + minor * 100 + patch), the same
// for the C++ libraries and the C API. airmoe_version.h is generated from the
// CMake project version at configure time.
#pragma once

#include "airmoe_version.h"
