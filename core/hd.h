// AIRMOE_HD marks a function that runs on the host and, under nvcc, on the
// device too: the per-element math every backend shares (ops/lane_dot.h,
// ops/topk.h, ops/log_sum_exp.h, ops/expert_ffn.h) is written once with it.
#pragma once

#if defined(__CUDACC__)
#define AIRMOE_HD __host__ __device__
#else
#define AIRMOE_HD
#endif
