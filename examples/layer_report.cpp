#include "layer_report.h"

#include <set>

#include "bench_output.h"

namespace airmoe::bench {

using nlohmann::json;

json strategy_row(const std::string& strategy, int ranks, const PhaseFigures& f, double tokens,
                  double router_flops, double expert_flops) {
  json bytes = json::object(), messages = json::object();
  const std::vector<PhaseEntry> entries = reported_phases(f);
  for (const PhaseEntry& p : entries) {
    bytes[p.name] = p.bytes;
    messages[p.name] = p.messages;
  }
  const PhaseTotals t = phase_totals(entries);
  const double forward = t.forward, backward = t.backward, msgs = t.messages;
  return {{"strategy", strategy},
          {"ranks", ranks},
          {"bytes", bytes},
          {"messages", messages},
          {"messages_total", msgs},
          {"bytes_forward", forward},
          {"bytes_backward", backward},
          {"bytes_total", forward + backward},
          {"bytes_per_token_forward", tokens > 0 ? forward / tokens : 0.0},
          {"router_flops_per_token", router_flops},
          {"expert_flops_per_token", expert_flops}};
}

void finish_rows(std::vector<json>& rows) {
  for (json& row : rows) {
    double floor = 0.0;
    for (const json& other : rows)
      if (other["strategy"] == "dense-replicated" && other["ranks"] == row["ranks"])
        floor = other["bytes_forward"].get<double>();
    row["bytes_vs_floor"] = ratio_or_null(row["bytes_forward"].get<double>(), floor);
  }
}

void write_csv(std::ostream& out, const std::vector<json>& rows) {
  const std::vector<std::string> scalars = {"strategy",
                                            "ranks",
                                            "probes",
                                            "bytes_total",
                                            "bytes_forward",
                                            "bytes_backward",
                                            "bytes_vs_floor",
                                            "messages_total",
                                            "router_flops_per_token",
                                            "expert_flops_per_token",
                                            "recall_at_k",
                                            "mass_recall"};
  std::set<std::string> phases, seconds;
  for (const json& r : rows) {
    for (auto it = r["bytes"].begin(); it != r["bytes"].end(); ++it) phases.insert(it.key());
    if (r.contains("seconds"))
      for (auto it = r["seconds"].begin(); it != r["seconds"].end(); ++it) seconds.insert(it.key());
  }
  bool first = true;
  for (const auto& s : scalars) out << (first ? "" : ",") << s, first = false;
  for (const auto& p : phases) out << ",bytes:" << p;
  for (const auto& s : seconds) out << ",seconds:" << s;
  out << "\n";
  for (const json& r : rows) {
    first = true;
    for (const auto& s : scalars) {
      out << (first ? "" : ",");
      first = false;
      if (!r.contains(s) || r[s].is_null()) continue;
      if (r[s].is_string())
        out << r[s].get<std::string>();
      else
        out << r[s].dump();
    }
    for (const auto& p : phases) out << "," << (r["bytes"].contains(p) ? r["bytes"][p].dump() : "");
    for (const auto& s : seconds)
      out << ","
          << (r.contains("seconds") && r["seconds"].contains(s) ? r["seconds"][s].dump() : "");
    out << "\n";
  }
}

}  // namespace airmoe::bench
