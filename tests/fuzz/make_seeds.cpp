// Seed corpora for the fuzz targets, from real messages and real checkpoints
// (tests/fuzz/make_corpus.sh runs it):
//   <out>/decoders/<strategy>-P<P>-r<rank>: byte 0 the strategy, byte 1 the
//     (P, rank) code, then what that rank received from the others in one
//     real step, as a ScriptedPeers script. Each seed is replayed through
//     ScriptedPeers and must give the real step's results bit for bit.
//   <out>/checkpoint/{manifest,shard}[-resealed]: a real checkpoint's files
//     behind the target's selector byte; manifest-v3-biased and
//     manifest-v3-query: with a selection bias, and with query-aware lists.
//     The corpus keeps older builds' seeds too: manifest[-resealed] of
//     version 1, manifest-v2-biased[-resealed] of version 2.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <stdexcept>
#include <string>

#include "comm/in_process.h"
#include "fuzz_layer.h"
#include "runtime/checkpoint.h"
#include "scripted_peers.h"

namespace airmoe::fuzz {
namespace {

namespace fs = std::filesystem;

// Delegates to a real communicator and appends what arrives from other ranks
// in each all-to-all to a ScriptedPeers script.
class Recorder final : public comm::Communicator {
 public:
  explicit Recorder(comm::Communicator& inner) : Communicator(inner.size()), inner_(inner) {}
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  const char* backend() const override { return "recorder"; }
  void barrier() override { inner_.barrier(); }
  void broadcast(void* data, size_t bytes, int root) override {
    inner_.broadcast(data, bytes, root);
  }
  void allgather(const void* send, size_t bytes, void* recv) override {
    inner_.allgather(send, bytes, recv);
  }
  std::vector<char> allgatherv(const void* send, size_t bytes,
                               std::vector<int64_t>& counts) override {
    return inner_.allgatherv(send, bytes, counts);
  }
  void allreduce_sum(int64_t* data, size_t count) override { inner_.allreduce_sum(data, count); }
  void allreduce_max(double* data, size_t count) override { inner_.allreduce_max(data, count); }
  void allreduce_min(double* data, size_t count) override { inner_.allreduce_min(data, count); }
  comm::ExchangeKind exchange_kind() const override { return inner_.exchange_kind(); }
  const std::vector<uint8_t>& script() const { return script_; }

 protected:
  // Seeds come from valid runs: a failure here is a bug of the seed maker.
  ExchangeFailure exchange_bytes(const comm::ExchangeBuffer& send, comm::ExchangeBuffer& recv,
                                 Stream stream, const std::string& failure) override {
    if (!failure.empty()) throw std::logic_error("make_seeds: " + failure);
    inner_.exchange(send, recv, stream);
    for (int q = 0; q < size(); ++q)
      if (q != rank()) record(recv.begin(q), static_cast<size_t>(recv.bytes(q)));
    return {};
  }
  bool moves_device_buffers() const override { return true; }  // the inner one stages or not

 private:
  void record(const char* data, size_t bytes) {
    if (bytes > 0xffff) throw std::runtime_error("a message too long for a script chunk");
    script_.push_back(static_cast<uint8_t>(bytes & 0xff));
    script_.push_back(static_cast<uint8_t>(bytes >> 8));
    script_.insert(script_.end(), data, data + bytes);
  }
  comm::Communicator& inner_;
  std::vector<uint8_t> script_;
};

void write(const fs::path& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write " + path.string());
}

void decoder_seeds(const fs::path& dir) {
  const FuzzLayer& layer = FuzzLayer::get();
  for (int s = 0; s < 3; ++s)
    for (int P = 2; P <= 4; ++P) {
      const auto strategy = static_cast<runtime::Strategy>(s);
      std::vector<std::vector<uint8_t>> scripts(static_cast<size_t>(P));
      std::vector<std::vector<float>> results(static_cast<size_t>(P));
      comm::run_ranks(P, [&](comm::Communicator& comm) {
        Recorder recorder(comm);
        results[comm.rank()] = layer.step(recorder, strategy, /*replan=*/true);
        scripts[comm.rank()] = recorder.script();
      });
      for (int me = 0; me < P; ++me) {
        // Byte 1 decodes as P = 2 + b % 3, rank = (b / 3) % P.
        std::vector<uint8_t> seed{static_cast<uint8_t>(s), static_cast<uint8_t>(3 * me + P - 2)};
        seed.insert(seed.end(), scripts[me].begin(), scripts[me].end());
        if (scripted_step(seed.data(), seed.size()) != results[me])
          throw std::runtime_error("a replayed seed differs from the real step");
        write(dir / (std::string(runtime::to_string(strategy)) + "-P" + std::to_string(P) + "-r" +
                     std::to_string(me)),
              seed);
      }
    }
}

// What a checkpoint seed's layer holds beside its parameters: the
// manifest's optional sections.
enum class Extra { kNone, kBias, kQueryLists };

// A real checkpoint's files, saved with `extra`; `tag` names the seeds.
void checkpoint_seeds(const fs::path& dir, Extra extra, const std::string& tag) {
  const FuzzLayer& f = FuzzLayer::get();
  const fs::path tmp = fs::temp_directory_path() / "airmoe-fuzz-seed-ckpt";
  comm::run_ranks(2, [&](comm::Communicator& comm) {
    runtime::MoELayer layer(comm, runtime::Strategy::kAir, FuzzLayer::config(), f.codebook,
                            f.assignment, f.placement(2), f.data.centers.view(), 7);
    if (extra == Extra::kBias) {
      Matrix bias(f.data.centers.rows(), 1);
      for (int64_t e = 0; e < bias.rows(); ++e) bias(e, 0) = std::sin(static_cast<float>(e));
      layer.set_bias(bias.view());
    }
    if (extra == Extra::kQueryLists) {
      QueryListOptions options;
      options.codewords = 4;
      options.list_length = 6;
      options.k = FuzzLayer::config().k;
      options.kmeans_iterations = 2;
      layer.refresh_query_lists(f.tokens_of(comm.rank(), comm.size()), options);
    }
    runtime::save_checkpoint(layer, tmp.string());
  });
  const auto seed = [&](const std::string& path, uint8_t selector) {
    std::ifstream in(path, std::ios::binary);
    std::vector<uint8_t> bytes{selector};
    bytes.insert(bytes.end(), std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    return bytes;
  };
  write(dir / ("manifest" + tag), seed(runtime::manifest_path(tmp.string()), 0));
  write(dir / ("manifest" + tag + "-resealed"), seed(runtime::manifest_path(tmp.string()), 2));
  if (extra == Extra::kNone) {  // the shard files do not depend on the extras
    write(dir / "shard", seed(runtime::shard_path(tmp.string(), 1), 1));
    write(dir / "shard-resealed", seed(runtime::shard_path(tmp.string(), 1), 3));
  }
  fs::remove_all(tmp);
}

}  // namespace
}  // namespace airmoe::fuzz

int main(int argc, char** argv) {
  namespace fs = std::filesystem;
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR  (writes OUT_DIR/decoders, OUT_DIR/checkpoint)\n",
                 argv[0]);
    return 2;
  }
  const fs::path out = argv[1];
  fs::create_directories(out / "decoders");
  fs::create_directories(out / "checkpoint");
  airmoe::fuzz::decoder_seeds(out / "decoders");
  using airmoe::fuzz::Extra;
  airmoe::fuzz::checkpoint_seeds(out / "checkpoint", Extra::kNone, "-v3");
  airmoe::fuzz::checkpoint_seeds(out / "checkpoint", Extra::kBias, "-v3-biased");
  airmoe::fuzz::checkpoint_seeds(out / "checkpoint", Extra::kQueryLists, "-v3-query");
  return 0;
}
