// Shared by the kernels that multiply a few rows by a quantized matrix (gemv_4bit.cpp, gemv_int8.cpp):
// call FN<MM>(...) with MM, the rows in this group (1-8), as a compile-time count, so that each row's
// accumulators stay in registers (with a run-time count they went to the stack and the loop ran ~10x
// slower).
#pragma once

#define RECFM_DISPATCH(FN, MM, ...) \
  switch (MM) {                     \
    case 1: FN<1>(__VA_ARGS__); break; \
    case 2: FN<2>(__VA_ARGS__); break; \
    case 3: FN<3>(__VA_ARGS__); break; \
    case 4: FN<4>(__VA_ARGS__); break; \
    case 5: FN<5>(__VA_ARGS__); break; \
    case 6: FN<6>(__VA_ARGS__); break; \
    case 7: FN<7>(__VA_ARGS__); break; \
    default: FN<8>(__VA_ARGS__); break; \
  }
