// One row per strategy in the layer and simulate reports: the same fields,
// whether the bytes were metered in a real run or simulated.
#pragma once

#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <vector>

#include "bench/layer_measure.h"

namespace airmoe::bench {

// bytes_forward / bytes_backward / bytes_total include each phase's control
// messages (":counts" of alltoallv, ":barrier" of a sparse exchange);
// bytes_vs_floor is filled by finish_rows().
nlohmann::json strategy_row(const std::string& strategy, int ranks, const PhaseFigures& f,
                            double tokens, double router_flops, double expert_flops);

// bytes_vs_floor = bytes_forward / dense-replicated's, per group of rows
// with the same "ranks"; null where there is no such row or it sent nothing
// (P = 1).
void finish_rows(std::vector<nlohmann::json>& rows);

// One CSV row per strategy row, to a stream the caller opened (OutputFile);
// a null figure is an empty field.
void write_csv(std::ostream& out, const std::vector<nlohmann::json>& rows);

}  // namespace airmoe::bench
