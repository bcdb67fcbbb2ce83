#include "bench_baselines.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "bench_common.h"
#include "core/npy.h"

namespace airmoe::bench {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// 'text' for /bin/sh, any quote inside closed and reopened.
std::string shell_quoted(const std::string& text) {
  std::string out = "'";
  for (const char c : text) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

// The interpreter as given when it holds a '/', else the first match on
// PATH; empty when there is no executable file of that name.
std::string executable_path(const std::string& name) {
  if (name.find('/') != std::string::npos) return access(name.c_str(), X_OK) == 0 ? name : "";
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "";
  for (size_t start = 0; start <= dirs.size();) {
    const size_t end = std::min(dirs.find(':', start), dirs.size());
    const std::string candidate = dirs.substr(start, end - start) + "/" + name;
    if (end > start && access(candidate.c_str(), X_OK) == 0) return candidate;
    start = end + 1;
  }
  return "";
}

// Every row the helper would give, each with `note` and no figure.
std::vector<BaselineRow> unmeasured(const BaselineOptions& o, const std::string& note) {
  std::vector<BaselineRow> rows = {{"torch_f32", 0, 0.0, note, {}},
                                   {"torch_bf16", 0, 0.0, note, {}}};
  for (int m : o.probes) rows.push_back({"faiss_cpu", m, 0.0, note, {}});
  return rows;
}

// The folder the helper reads: tokens, centers, AIR's codewords and lists.
void write_data(const fs::path& dir, MatrixView tokens, MatrixView centers, const AirRouter& air,
                const Matrix* bias) {
  write_npy(dir / "tokens.npy", tokens.data, tokens.rows, tokens.cols);
  write_npy(dir / "centers.npy", centers.data, centers.rows, centers.cols);
  const MatrixView codewords = air.codebook().codewords();
  write_npy(dir / "codewords.npy", codewords.data, codewords.rows, codewords.cols);
  const std::vector<int32_t>& lists = air.lists().assignment();
  write_npy(dir / "assignment.npy", lists.data(), static_cast<int64_t>(lists.size()), 1);
  if (bias) write_npy(dir / "bias.npy", bias->data(), bias->rows(), bias->cols());
}

// A row's chosen experts (raw little-endian int32 [T, k]) with their
// logits <w_e, h> (accumulated in double); -1 (fewer than k found) keeps
// no logit, as mass_recall skips it.
Routes read_routes(const fs::path& file, MatrixView tokens, MatrixView centers, int k) {
  Routes r = make_routes(tokens.rows, k, GateMode::kChosen);
  const auto bytes = static_cast<std::streamsize>(r.experts.size() * sizeof(int32_t));
  std::ifstream in(file, std::ios::binary);
  if (!in.read(reinterpret_cast<char*>(r.experts.data()), bytes) || in.peek() != EOF)
    throw std::runtime_error(file.string() + " does not hold " + std::to_string(r.tokens) + " x " +
                             std::to_string(k) + " int32 experts");
  for (int64_t t = 0; t < r.tokens; ++t)
    for (int j = 0; j < k; ++j) {
      const int32_t e = r.experts[t * k + j];
      if (e >= centers.rows) throw std::runtime_error(file.string() + ": expert id out of range");
      double z = 0.0;
      for (int64_t c = 0; e >= 0 && c < centers.cols; ++c)
        z += static_cast<double>(tokens.row(t)[c]) * centers.row(e)[c];
      r.logits[t * k + j] = static_cast<float>(z);
    }
  return r;
}

Baselines read_rows(const fs::path& dir, MatrixView tokens, MatrixView centers, int k) {
  std::ifstream in(dir / "baselines.json");
  const json j = json::parse(in);
  Baselines out;
  out.meta = j.at("meta").dump();
  for (const json& row : j.at("rows")) {
    BaselineRow r{row.at("router"), row.at("probes"), 0.0, row.at("note"), {}};
    if (!row.at("seconds").is_null()) {
      r.seconds = row.at("seconds");
      r.routes = read_routes(dir / row.at("experts").get<std::string>(), tokens, centers, k);
    }
    out.rows.push_back(std::move(r));
  }
  return out;
}

// Runs the helper in `dir`; the reason when it gave no rows.
std::string run_helper(const BaselineOptions& o, const std::string& python, const fs::path& dir) {
  std::string probes;
  for (int m : o.probes) {
    if (!probes.empty()) probes += ',';
    probes += std::to_string(m);
  }
  const std::string cmd =
      shell_quoted(python) + " " + shell_quoted(o.script) + " " + shell_quoted(dir.string()) +
      " --k " + std::to_string(o.k) + " --probes " + shell_quoted(probes) + " --threads " +
      std::to_string(o.threads) + " --repeats " + std::to_string(o.repeats) + " 1>&2";
  const int status = std::system(cmd.c_str());
  if (status != 0 || !fs::exists(dir / "baselines.json"))
    return "failed: " + python + " " + o.script + " exited with status " +
           std::to_string(WIFEXITED(status) ? WEXITSTATUS(status) : status) +
           " (its messages are on stderr above)";
  return "";
}

}  // namespace

Baselines run_baselines(const BaselineOptions& o, MatrixView tokens, MatrixView centers,
                        const AirRouter& air, const Matrix* bias) {
  const std::string python = executable_path(o.python);
  if (python.empty())
    return {unmeasured(
                o, "not installed: no Python interpreter '" + o.python + "' (--baselines-python)"),
            "{}"};
  if (!fs::exists(o.script))
    return {unmeasured(o, "not found: the helper '" + o.script + "' (--baselines-script)"), "{}"};
  std::string pattern = (fs::temp_directory_path() / "airmoe_baselines_XXXXXX").string();
  if (!mkdtemp(pattern.data()))
    return {unmeasured(o, "failed: cannot create a temporary folder for the data"), "{}"};
  const fs::path dir = pattern;
  Baselines out;
  try {
    write_data(dir, tokens, centers, air, bias);
    progress("baselines: %s %s (torch, faiss-cpu) on the same data", python.c_str(),
             o.script.c_str());
    const std::string failure = run_helper(o, python, dir);
    out = failure.empty() ? read_rows(dir, tokens, centers, o.k)
                          : Baselines{unmeasured(o, failure), "{}"};
  } catch (const std::exception& e) {
    out = {unmeasured(o, std::string("failed: ") + e.what()), "{}"};
  }
  std::error_code ignored;
  fs::remove_all(dir, ignored);
  return out;
}

}  // namespace airmoe::bench
