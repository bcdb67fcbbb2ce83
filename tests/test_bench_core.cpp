// The layer benchmark's core pieces that need no MPI (bench/): the JSON
// writer the in-process front end writes its results with, and the phase
// list and totals both front ends report.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <sstream>
#include <stdexcept>

#include "bench/json_writer.h"
#include "bench/layer_measure.h"

namespace airmoe::bench {
namespace {

TEST(JsonWriter, WritesNestedObjectsArraysAndScalars) {
  std::ostringstream out;
  JsonWriter w(out);
  w.begin_object()
      .value("name", "air")
      .value("count", int64_t{-3})
      .value("half", 0.5)
      .value("on", true)
      .null("none")
      .array("xs", {1.0, 2.5})
      .begin_object("empty")
      .end_object()
      .begin_array("rows")
      .begin_object()
      .value("n", 1)
      .end_object()
      .end_array()
      .end_object()
      .finish();
  EXPECT_EQ(out.str(),
            "{\n"
            "  \"name\": \"air\",\n"
            "  \"count\": -3,\n"
            "  \"half\": 0.5,\n"
            "  \"on\": true,\n"
            "  \"none\": null,\n"
            "  \"xs\": [\n"
            "    1,\n"
            "    2.5\n"
            "  ],\n"
            "  \"empty\": {},\n"
            "  \"rows\": [\n"
            "    {\n"
            "      \"n\": 1\n"
            "    }\n"
            "  ]\n"
            "}\n");
}

TEST(JsonWriter, EscapesStringsAndWritesNonFiniteAsNull) {
  EXPECT_EQ(JsonWriter::quoted("a\"b\\c\nd\te\x01"), "\"a\\\"b\\\\c\\nd\\te\\u0001\"");
  std::ostringstream out;
  JsonWriter w(out);
  w.begin_array()
      .value(nullptr, std::numeric_limits<double>::quiet_NaN())
      .value(nullptr, std::numeric_limits<double>::infinity())
      .value(nullptr, 0.1)
      .end_array()
      .finish();
  EXPECT_EQ(out.str(), "[\n  null,\n  null,\n  0.10000000000000001\n]\n");  // 0.1 round-trips
}

TEST(JsonWriter, RefusesUnbalancedBrackets) {
  std::ostringstream out;
  JsonWriter w(out);
  w.begin_object();
  EXPECT_THROW(w.end_array(), std::logic_error);
  EXPECT_THROW(w.finish(), std::logic_error);
}

TEST(ReportedPhases, EveryPhaseWithItsCountsAndBarriersOnlyWhereMetered) {
  PhaseFigures f;
  f.bytes = {{"dispatch", 100}, {"dispatch:barrier", 4}, {"grad_combine", 30}};
  f.messages = {{"dispatch", 2}, {"dispatch:barrier", 1}, {"grad_combine", 3}};
  const std::vector<PhaseEntry> entries = reported_phases(f);
  // 8 phases with their ":counts", one barrier.
  ASSERT_EQ(entries.size(), 2 * (kForwardPhases.size() + kBackwardPhases.size()) + 1);
  EXPECT_EQ(entries.front().name, "requests");
  EXPECT_EQ(entries.back().name, "grad_combine:counts");
  int barriers = 0;
  for (const PhaseEntry& e : entries) {
    barriers += e.name.ends_with(":barrier");
    EXPECT_EQ(e.forward, e.name.rfind("grad_", 0) != 0) << e.name;
  }
  EXPECT_EQ(barriers, 1);
  const PhaseTotals t = phase_totals(entries);
  EXPECT_EQ(t.forward, 104);
  EXPECT_EQ(t.backward, 30);
  EXPECT_EQ(t.messages, 6);
}

TEST(NamedSeconds, EveryPhaseInStepOrder) {
  runtime::PhaseSeconds s{1, 2, 3, 4, 5, 6, 7};
  const auto named = named_seconds(s);
  const std::vector<std::string> names = {
      "route",           "dispatch", "experts", "combine", "backward_dispatch", "backward_experts",
      "backward_combine"};
  ASSERT_EQ(named.size(), names.size());
  for (size_t i = 0; i < names.size(); ++i) {
    EXPECT_EQ(named[i].first, names[i]);
    EXPECT_EQ(named[i].second, static_cast<double>(i + 1));
  }
}

}  // namespace
}  // namespace airmoe::bench
