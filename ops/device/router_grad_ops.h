// The routers' backward in the device composition: logit_grads (one thread
// per contribution) and accumulate_row_grads (stable grouping, then one
// thread per output entry summing its group in the stated order, in double).
#pragma once

#include <thrust/copy.h>
#include <thrust/for_each.h>
#include <thrust/sort.h>

#include <cmath>
#include <cstdint>

#include "ops/device/exec.h"
#include "ops/gate_function.h"
#include "ops/op_args.h"
#include "ops/ops.h"

namespace airmoe::inline ops::device {

// coef[i] for contribution i: p_i ([expert chosen] dL/dg - sum_j g_j dL/dg_j)
// with p_i = exp(z_i - log_normalizer[token]), in double.
template <typename D>
struct LogitGrad {
  Vec<const int32_t> token, expert;
  Vec<const float> z;
  Rows<const int32_t> chosen;
  Rows<const float> gates;
  Rows<const D> d_gates;
  Vec<const double> log_normalizer;
  Vec<double> coef;
  int64_t k;
  GateFunction fn;
  AIRMOE_HD void operator()(int64_t i) const {
    const int64_t t = token[i];
    double weighted = 0.0, own = 0.0;
    for (int64_t j = 0; j < k; ++j) {
      const float dg = load_float(d_gates.row(t), j);
      weighted += static_cast<double>(gates(t, j)) * dg;
      if (chosen(t, j) == expert[i]) own = dg;
    }
    const double p = std::exp(gate_input(fn, z[i]) - log_normalizer[t]);
    coef[i] = p * (own - weighted) * gate_input_slope(fn, z[i]);
  }
};

template <typename X>
void logit_grads(const X& x, const OpArgs& args, TensorView token, TensorView expert, TensorView z,
                 TensorView chosen_ids, TensorView gates, TensorView d_gates,
                 TensorView log_normalizer, TensorView coef, GateFunction fn) {
  args.vector(token, "token", DType::kI32);
  const int64_t n = vector_size(token);
  args.vector(expert, "expert", DType::kI32, n);
  args.vector(z, "z", DType::kF32, n);
  args.vector(coef, "coef", DType::kF64, n);
  args.dtype(chosen_ids, "chosen_ids", {DType::kI32});
  const int64_t T = chosen_ids.rows, k = chosen_ids.cols;
  args.matrix(gates, "gates", DType::kF32, T, k);
  args.float_dtype(d_gates, "d_gates");
  args.shape(d_gates, "d_gates", T, k);
  args.vector(log_normalizer, "log_normalizer", DType::kF64, T);
  if (n == 0) return;
  check_indices(x, args, "entry", "token", token, T);
  with_float_type(d_gates, [&](auto td) {
    using D = decltype(td);
    thrust::for_each(
        x.policy(), count_from(0), count_from(n),
        LogitGrad<D>{vec_of<const int32_t>(token), vec_of<const int32_t>(expert),
                     vec_of<const float>(z), rows_of<const int32_t>(chosen_ids),
                     rows_of<const float>(gates), rows_of<const D>(d_gates),
                     vec_of<const double>(log_normalizer), vec_of<double>(coef), k, fn});
  });
}

// ---- accumulate_row_grads -----------------------------------------------------

struct Contributions {
  Vec<const int32_t> token, row;
  Vec<const double> coef;
};

struct NonzeroCoef {
  Vec<const double> coef;
  AIRMOE_HD bool operator()(int64_t i) const { return coef[i] != 0.0; }
};

// Token of the q-th live contribution.
struct LiveToken {
  Vec<const int32_t> token;
  const int64_t* live;
  AIRMOE_HD int32_t operator()(int64_t q) const { return token[live[q]]; }
};

// d_tokens(t, c) = sum of coef * rows(row, c) over token t's contributions
// in contribution order (double, rounded once).
template <typename K>
struct TokenGradEntry {
  Contributions in;
  Rows<const K> keys;
  const int64_t* live;
  const int64_t* items;    // live positions, token after token
  const int64_t* offsets;  // [T + 1]
  Rows<float> d_tokens;
  int64_t width;
  AIRMOE_HD void operator()(int64_t e) const {
    const int64_t t = e / width, c = e % width;
    double sum = 0.0;
    for (int64_t q = offsets[t]; q < offsets[t + 1]; ++q) {
      const int64_t i = live[items[q]];
      sum += in.coef[i] * load_float(keys.row(in.row[i]), c);
    }
    d_tokens(t, c) = static_cast<float>(sum);
  }
};

struct RowTokenKey {
  Contributions in;
  const int64_t* live;
  uint64_t* keys;
  AIRMOE_HD void operator()(int64_t q) const {
    const int64_t i = live[q];
    keys[q] = (static_cast<uint64_t>(static_cast<uint32_t>(in.row[i])) << 32) |
              static_cast<uint32_t>(in.token[i]);
  }
};

struct RunStart {
  const uint64_t* keys;
  AIRMOE_HD bool operator()(int64_t q) const {
    return q == 0 || (keys[q] >> 32) != (keys[q - 1] >> 32);
  }
};

// values(r, c) = sum of coef * tokens(token, c) over row r's contributions
// in token order (double, rounded once); rows[r] = the row's id.
template <typename T>
struct KeyGradEntry {
  Contributions in;
  Rows<const T> tokens;
  const int64_t* order;   // contribution indices by (row, token)
  const int64_t* starts;  // [R + 1]: each row's first position in order
  Rows<float> values;
  int32_t* rows;
  int64_t width;
  AIRMOE_HD void operator()(int64_t e) const {
    const int64_t r = e / width, c = e % width;
    double sum = 0.0;
    for (int64_t q = starts[r]; q < starts[r + 1]; ++q) {
      const int64_t i = order[q];
      sum += in.coef[i] * load_float(tokens.row(in.token[i]), c);
    }
    values(r, c) = static_cast<float>(sum);
    if (c == 0) rows[r] = in.row[order[starts[r]]];
  }
};

// d_tokens(t) = sum of coef * keys[row] over token t's live contributions.
template <typename X>
void token_grads(const X& x, const Contributions& in, TensorView keys, const int64_t* live,
                 int64_t n, TensorView d_tokens) {
  const int64_t T = d_tokens.rows, width = d_tokens.cols;
  const Grouping<X> by_token = group_by(x, n, T, LiveToken{in.token, live});
  with_float_type(keys, [&](auto tk) {
    using K = decltype(tk);
    thrust::for_each(x.policy(), count_from(0), count_from(T * width),
                     TokenGradEntry<K>{in, rows_of<const K>(keys), live, by_token.items.get(),
                                       by_token.offsets.get(), rows_of<float>(d_tokens), width});
  });
}

template <typename X>
RowGrads key_grads(const X& x, const Contributions& in, TensorView tokens, const int64_t* live,
                   int64_t n) {
  Scratch<uint64_t, X> keys(x, n);
  Scratch<int64_t, X> order(x, n), starts(x, n + 1);
  thrust::for_each(x.policy(), count_from(0), count_from(n), RowTokenKey{in, live, keys.get()});
  thrust::copy_n(x.policy(), live, n, order.get());
  thrust::stable_sort_by_key(x.policy(), keys.get(), keys.get() + n, order.get());
  const int64_t R = thrust::copy_if(x.policy(), count_from(0), count_from(n), starts.get(),
                                    RunStart{keys.get()}) -
                    starts.get();
  from_host(x, starts.get() + R, std::vector<int64_t>{n});
  const int64_t width = tokens.cols;
  RowGrads out;
  out.count = R;
  out.rows = Tensor(x.allocator(), DType::kI32, R, 1);
  out.values = Tensor(x.allocator(), DType::kF32, R, width);
  if (R * width == 0) return out;
  with_float_type(tokens, [&](auto tt) {
    using T = decltype(tt);
    thrust::for_each(
        x.policy(), count_from(0), count_from(R * width),
        KeyGradEntry<T>{in, rows_of<const T>(tokens), order.get(), starts.get(),
                        rows_of<float>(out.values.view()), out.rows.as<int32_t>(), width});
  });
  return out;
}

template <typename X>
RowGrads accumulate_row_grads(const X& x, const OpArgs& args, TensorView tokens, TensorView keys,
                              RowContributionsView contributions, TensorView d_tokens) {
  args.float_dtype(tokens, "tokens");
  args.float_dtype(keys, "keys");
  const int64_t T = tokens.rows, width = tokens.cols;
  if (keys.cols != width)
    args.fail("keys have " + std::to_string(keys.cols) + " columns and tokens " +
              std::to_string(width));
  const bool with_d_tokens = !d_tokens.empty();  // else the key gradients alone
  if (with_d_tokens) args.matrix(d_tokens, "d_tokens", DType::kF32, T, width);
  args.vector(contributions.token, "contributions.token", DType::kI32);
  const int64_t N = vector_size(contributions.token);
  args.vector(contributions.row, "contributions.row", DType::kI32, N);
  args.vector(contributions.coef, "contributions.coef", DType::kF64, N);
  check_indices(x, args, "contribution", "token", contributions.token, T);
  check_indices(x, args, "contribution", "row", contributions.row, keys.rows);
  const Contributions in{vec_of<const int32_t>(contributions.token),
                         vec_of<const int32_t>(contributions.row),
                         vec_of<const double>(contributions.coef)};
  // Zero coefficients contribute nothing: not even a row of zeros.
  Scratch<int64_t, X> live(x, N);
  const int64_t n = N == 0 ? 0
                           : thrust::copy_if(x.policy(), count_from(0), count_from(N), live.get(),
                                             NonzeroCoef{in.coef}) -
                                 live.get();
  if (with_d_tokens) token_grads(x, in, keys, live.get(), n, d_tokens);
  return key_grads(x, in, tokens, live.get(), n);
}

}  // namespace airmoe::inline ops::device
