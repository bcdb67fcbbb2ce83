// The checkpoint file formats in memory (docs/checkpoints.md): encoders and
// the decoders that refuse anything but a well-formed file. A decoder checks,
// in order: the magic and version, the header's fields, the size the header
// promises, the checksum, then the body's values; allocations follow the
// size check, so they are bounded by the bytes actually given.
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/checks.h"
#include "core/hash.h"
#include "router/spilled_lists.h"
#include "runtime/checkpoint.h"
#include "runtime/wire.h"

namespace airmoe::runtime {

static_assert(std::endian::native == std::endian::little,
              "checkpoint files are little-endian and written as this host stores them");

namespace {

constexpr char kManifestMagic[8] = {'A', 'I', 'R', 'M', 'O', 'E', 'M', 'F'};
constexpr char kShardMagic[8] = {'A', 'I', 'R', 'M', 'O', 'E', 'S', 'H'};
constexpr size_t kChecksumBytes = 8;
// magic, version, strategy, k, probes, d, h, activation, P, E, C; then,
// from version 2, whether a bias follows the owners (0 or 1); from version 3,
// whether query lists follow (0 or 1) and their entries (0 without)
constexpr size_t kManifestHeaderV1 = 8 + 4 + 4 + 4 + 4 + 8 + 8 + 4 + 4 + 8 + 8;
constexpr size_t manifest_header(uint32_t version) {
  return kManifestHeaderV1 + (version >= 2 ? 4 : 0) + (version >= 3 ? 4 + 8 : 0);
}
// The query-list section before its lists: L, k, k-means iterations, seed,
// build FLOPs; then a count per expert and the entries.
constexpr int64_t kQueryOptionsBytes = 8 + 4 + 4 + 8 + 8;
// magic, version, rank, P, d, h, records
constexpr size_t kShardHeader = 8 + 4 + 4 + 4 + 8 + 8 + 8;
constexpr int64_t kMaxDim = int64_t{1} << 24;    // d and h
constexpr int64_t kMaxRanks = int64_t{1} << 20;  // P

std::string quoted(const std::string& name) {
  return "'" + name + "'";
}

template <typename T>
void put1(std::vector<char>& out, T value) {
  wire::put(out, &value, 1);
}

// Appends the checksum of everything before it.
void seal(std::vector<char>& out) {
  put1(out, fnv1a64(out.data(), out.size()));
}

// The magic says which kind of file this is; the version, which layout
// (one of oldest..newest). Returns the version.
uint32_t check_magic_and_version(std::span<const char> bytes, const char (&magic)[8],
                                 uint32_t oldest, uint32_t newest, const char* kind,
                                 const std::string& name) {
  if (bytes.size() < sizeof(magic) || std::memcmp(bytes.data(), magic, sizeof(magic)) != 0)
    fail(kind + (" " + quoted(name)) + " is not an airmoe checkpoint " + kind +
         " (its first bytes are not the magic '" + std::string(magic, sizeof(magic)) + "')");
  uint32_t version = 0;
  if (bytes.size() >= sizeof(magic) + sizeof(version))
    std::memcpy(&version, bytes.data() + sizeof(magic), sizeof(version));
  else
    fail(kind + (" " + quoted(name)) + " is truncated: " + std::to_string(bytes.size()) +
         " bytes, it ends inside its format version");
  if (version < oldest || version > newest) {
    // Appended: g++ 12 sees a false overlap in const char* + string here
    // (-Wrestrict).
    std::string message = std::string(kind) + " " + quoted(name);
    message.append(" has format version ").append(std::to_string(version));
    message.append(oldest == newest ? "; this build reads version "
                                    : "; this build reads versions ");
    if (oldest != newest) message.append(std::to_string(oldest)).append(" to ");
    fail(message.append(std::to_string(newest)));
  }
  return version;
}

void check_header_fits(std::span<const char> bytes, size_t header, const char* kind,
                       const std::string& name) {
  if (bytes.size() < header + kChecksumBytes)
    fail(kind + (" " + quoted(name)) + " is truncated: " + std::to_string(bytes.size()) +
         " bytes, less than its " + std::to_string(header + kChecksumBytes) +
         "-byte header and checksum");
}

void check_size_and_checksum(std::span<const char> bytes, int64_t promised, const char* kind,
                             const std::string& name) {
  const auto held = static_cast<int64_t>(bytes.size());
  if (held < promised)
    fail(kind + (" " + quoted(name)) + " is truncated: its header promises " +
         std::to_string(promised) + " bytes, the file holds " + std::to_string(held));
  if (held > promised)
    fail(kind + (" " + quoted(name)) + " holds " + std::to_string(held) + " bytes, more than the " +
         std::to_string(promised) + " its header promises");
  const size_t body = bytes.size() - kChecksumBytes;
  uint64_t stored = 0;
  std::memcpy(&stored, bytes.data() + body, sizeof(stored));
  const uint64_t computed = fnv1a64(bytes.data(), body);
  if (stored != computed)
    fail(kind + (" " + quoted(name)) + " is corrupted: its checksum is " + std::to_string(stored) +
         ", its bytes hash to " + std::to_string(computed));
}

void require_field(int64_t value, int64_t lo, int64_t hi, const char* field, const char* kind,
                   const std::string& name) {
  if (value < lo || value > hi)
    fail(kind + (" " + quoted(name)) + ": " + field + " = " + std::to_string(value) +
         " is outside [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
}

template <typename Enum>
Enum enum_field(uint32_t value, uint32_t count, const char* field, const std::string& name) {
  require_field(value, 0, count - 1, field, "manifest", name);
  return static_cast<Enum>(value);
}

// ------------------------------------------------------------ manifest --

void put_manifest_header(std::vector<char>& out, const CheckpointManifest& m) {
  const CheckpointConfig& layer = m.layer;
  wire::put(out, kManifestMagic, sizeof(kManifestMagic));
  put1(out, kManifestVersion);
  put1(out, static_cast<uint32_t>(layer.strategy));
  put1(out, static_cast<int32_t>(layer.config.k));
  put1(out, static_cast<int32_t>(layer.config.probes));
  put1(out, layer.config.expert.dim);
  put1(out, layer.config.expert.hidden);
  put1(out, static_cast<uint32_t>(layer.config.expert.activation));
  put1(out, m.ranks);
  put1(out, layer.experts);
  put1(out, layer.codewords);
  put1(out, static_cast<uint32_t>(m.bias.empty() ? 0 : 1));
  put1(out, static_cast<uint32_t>(m.query ? 1 : 0));
  put1(out, m.query ? m.query->membership.entries() : int64_t{0});
}

// What follows the owners, as the header says.
struct ManifestSections {
  bool bias = false;
  bool query = false;
  int64_t query_entries = 0;
};

// The bytes of the query-list section of `entries` entries over E experts,
// or a refusal where they overflow a file size.
int64_t query_section_bytes(int64_t entries, int64_t experts, const std::string& name) {
  int64_t bytes = 0;
  if (__builtin_mul_overflow(entries + experts, int64_t{4}, &bytes) ||
      __builtin_add_overflow(bytes, kQueryOptionsBytes, &bytes))
    fail("manifest " + quoted(name) + ": query entries = " + std::to_string(entries) +
         " overflow a file size");
  return bytes;
}

// The header's fields, each in its range; returns the file size they promise.
// Sets `sections` (no bias before version 2, no query lists before 3).
int64_t take_manifest_header(wire::Reader& in, CheckpointManifest& m, ManifestSections& sections,
                             const std::string& name) {
  CheckpointConfig& layer = m.layer;
  char magic[8];  // checked already
  in.take_n(magic, sizeof(magic), "magic");
  const auto version = in.take<uint32_t>("version");
  layer.strategy = enum_field<Strategy>(in.take<uint32_t>("strategy"), 3, "strategy", name);
  const auto k = in.take<int32_t>("k");
  const auto probes = in.take<int32_t>("probes");
  layer.config.expert.dim = in.take<int64_t>("d");
  layer.config.expert.hidden = in.take<int64_t>("h");
  layer.config.expert.activation =
      enum_field<Activation>(in.take<uint32_t>("activation"), 4, "activation", name);
  m.ranks = in.take<int32_t>("ranks");
  layer.experts = in.take<int64_t>("E");
  layer.codewords = in.take<int64_t>("C");
  const uint32_t bias = version >= 2 ? in.take<uint32_t>("bias") : 0;
  const uint32_t query = version >= 3 ? in.take<uint32_t>("query lists") : 0;
  const int64_t entries = version >= 3 ? in.take<int64_t>("query entries") : 0;
  require_field(bias, 0, 1, "bias", "manifest", name);
  require_field(query, 0, 1, "query lists", "manifest", name);
  sections.bias = bias == 1;
  sections.query = query == 1;
  sections.query_entries = entries;
  require_field(layer.config.expert.dim, 1, kMaxDim, "d", "manifest", name);
  require_field(layer.config.expert.hidden, 1, kMaxDim, "h", "manifest", name);
  require_field(m.ranks, 1, kMaxRanks, "ranks P", "manifest", name);
  require_field(layer.experts, 1, std::numeric_limits<int32_t>::max(), "E", "manifest", name);
  require_field(layer.codewords, 1, layer.experts, "C", "manifest", name);
  require_field(k, 1, layer.experts, "k", "manifest", name);
  require_field(probes, 1, layer.codewords, "probes m", "manifest", name);
  layer.config.k = k;
  layer.config.probes = probes;
  // Each expert in 1 to C lists; none without query lists.
  if (sections.query)
    require_field(entries, layer.experts, layer.experts * layer.codewords, "query entries",
                  "manifest", name);
  else
    require_field(entries, 0, 0, "query entries", "manifest", name);
  // C d <= 2^55 and E, P below 2^31: no overflow before the query section.
  const int64_t promised =
      static_cast<int64_t>(manifest_header(version)) +
      4 * layer.codewords * layer.config.expert.dim + (sections.bias ? 12 : 8) * layer.experts +
      24 * static_cast<int64_t>(m.ranks) + static_cast<int64_t>(kChecksumBytes);
  if (!sections.query) return promised;
  return promised + query_section_bytes(entries, layer.experts, name);
}

// The query-list section: the build options (C is the manifest's), each
// expert's number of lists, then its lists, first (primary) list first.
void put_query_section(std::vector<char>& out, const QueryLists& q) {
  put1(out, q.options.list_length);
  put1(out, static_cast<int32_t>(q.options.k));
  put1(out, static_cast<int32_t>(q.options.kmeans_iterations));
  put1(out, q.options.seed);
  put1(out, q.build_flops);
  const ListMembership& lists = q.membership;
  for (int64_t e = 0; e < lists.experts(); ++e)
    put1(out, static_cast<int32_t>(lists.offsets[e + 1] - lists.offsets[e]));
  wire::put(out, lists.lists.data(), lists.lists.size());
}

// Sizes were checked against the file: the reads stay in bounds. The
// values are checked by check_query_section.
QueryLists take_query_section(wire::Reader& in, const CheckpointManifest& m, int64_t entries,
                              const std::string& name) {
  QueryLists q;
  q.options.codewords = m.layer.codewords;
  q.options.list_length = in.take<int64_t>("query list length");
  q.options.k = in.take<int32_t>("query k");
  q.options.kmeans_iterations = in.take<int32_t>("query k-means iterations");
  q.options.seed = in.take<uint64_t>("query seed");
  q.build_flops = in.take<double>("query build flops");
  ListMembership& lists = q.membership;
  lists.list_count = m.layer.codewords;
  lists.offsets.assign(static_cast<size_t>(m.layer.experts) + 1, 0);
  for (int64_t e = 0; e < m.layer.experts; ++e) {
    const auto count = in.take<int32_t>("query list count");
    if (count < 1)
      fail("manifest " + quoted(name) + ": query list count of expert " + std::to_string(e) +
           " = " + std::to_string(count) + " (every expert is in at least one list)");
    lists.offsets[e + 1] = lists.offsets[e] + count;
  }
  if (lists.offsets.back() != entries)
    fail("manifest " + quoted(name) + ": the query list counts add up to " +
         std::to_string(lists.offsets.back()) +
         ", the header says query entries = " + std::to_string(entries));
  lists.lists.resize(static_cast<size_t>(entries));
  in.take_n(lists.lists.data(), lists.lists.size(), "query lists");
  return q;
}

// The options in range, each expert's lists distinct and in [0, C), and its
// first one the list `assignment` gives it (the router's primary lists).
void check_query_section(const CheckpointManifest& m, const std::string& name) {
  const QueryLists& q = *m.query;
  const int64_t E = m.layer.experts;
  require_field(q.options.list_length, 1, E, "query list length L", "manifest", name);
  require_field(q.options.k, 1, E, "query k", "manifest", name);
  require_field(q.options.kmeans_iterations, 0, std::numeric_limits<int32_t>::max(),
                "query k-means iterations", "manifest", name);
  if (!std::isfinite(q.build_flops) || q.build_flops < 0.0)
    fail("manifest " + quoted(name) + ": query build flops = " + std::to_string(q.build_flops) +
         " is not a finite count");
  try {
    check_memberships(q.membership.offsets, q.membership.lists, q.membership.list_count);
  } catch (const UsageError& e) {
    fail("manifest " + quoted(name) + ": query lists: " + e.what());
  }
  for (int64_t e = 0; e < E; ++e) {
    const int32_t first = q.membership.lists[q.membership.offsets[e]];
    if (first != m.assignment[e])
      fail("manifest " + quoted(name) + ": expert " + std::to_string(e) + " is in list " +
           std::to_string(m.assignment[e]) + ", its first query list is " + std::to_string(first));
  }
}

// Every list and owner in range, and each shard's record count is the number
// of experts the owners give it.
void check_manifest_body(const CheckpointManifest& m, const std::string& name) {
  const int64_t C = m.layer.codewords;
  std::vector<int64_t> per_rank(static_cast<size_t>(m.ranks), 0);
  for (size_t e = 0; e < m.assignment.size(); ++e) {
    if (m.assignment[e] < 0 || m.assignment[e] >= C)
      fail("manifest " + quoted(name) + ": expert " + std::to_string(e) + " is in list " +
           std::to_string(m.assignment[e]) + ", outside [0, " + std::to_string(C) + ")");
    if (m.owners[e] < 0 || m.owners[e] >= m.ranks)
      fail("manifest " + quoted(name) + ": expert " + std::to_string(e) + " is owned by rank " +
           std::to_string(m.owners[e]) + ", outside [0, " + std::to_string(m.ranks) + ")");
    ++per_rank[m.owners[e]];
  }
  for (int q = 0; q < m.ranks; ++q)
    if (m.shards[q].records != per_rank[q])
      fail("manifest " + quoted(name) + ": shard " + std::to_string(q) + " is listed with " +
           std::to_string(m.shards[q].records) + " records, its owners give it " +
           std::to_string(per_rank[q]));
  require_finite(m.codebook.view(), ("manifest " + quoted(name) + " codebook").c_str());
  if (!m.bias.empty())
    require_finite(MatrixView(m.bias.data(), m.layer.experts, 1),
                   ("manifest " + quoted(name) + " bias").c_str());
  if (m.query) check_query_section(m, name);
}

// --------------------------------------------------------------- shard --

int64_t record_floats(const ShardRecords& s) {
  return ops::w1_rows(s.activation, s.hidden) * s.dim + s.dim * s.hidden + s.dim;  // W1, W2, center
}

// The header's fields, each in its range; returns the file size they promise.
int64_t take_shard_header(wire::Reader& in, ShardRecords& s, int64_t& records,
                          const std::string& name) {
  char magic[8];
  in.take_n(magic, sizeof(magic), "magic");
  in.take<uint32_t>("version");
  s.rank = in.take<int32_t>("rank");
  s.ranks = in.take<int32_t>("ranks");
  s.dim = in.take<int64_t>("d");
  s.hidden = in.take<int64_t>("h");
  records = in.take<int64_t>("records");
  require_field(s.ranks, 1, kMaxRanks, "ranks P", "shard file", name);
  require_field(s.rank, 0, s.ranks - 1, "rank", "shard file", name);
  require_field(s.dim, 1, kMaxDim, "d", "shard file", name);
  require_field(s.hidden, 1, kMaxDim, "h", "shard file", name);
  require_field(records, 0, std::numeric_limits<int32_t>::max(), "records", "shard file", name);
  const int64_t record_bytes = 4 + 4 * record_floats(s);  // < 2^53
  int64_t body = 0, total = 0;
  if (__builtin_mul_overflow(records, record_bytes, &body) ||
      __builtin_add_overflow(body, static_cast<int64_t>(kShardHeader + kChecksumBytes), &total))
    fail("shard file " + quoted(name) + ": " + std::to_string(records) + " records of d = " +
         std::to_string(s.dim) + ", h = " + std::to_string(s.hidden) + " overflow a file size");
  return total;
}

void take_shard_records(wire::Reader& in, ShardRecords& s, int64_t records,
                        const std::string& name) {
  const auto w1 = static_cast<size_t>(ops::w1_rows(s.activation, s.hidden) * s.dim);
  const auto w2 = static_cast<size_t>(s.dim * s.hidden);
  const auto n = static_cast<size_t>(records);
  s.ids.resize(n);
  s.w1.resize(n * w1);
  s.w2.resize(n * w2);
  s.centers = Matrix(records, s.dim);
  for (size_t i = 0; i < n; ++i) {
    s.ids[i] = in.take<int32_t>("expert id");
    if (s.ids[i] < 0 || (i > 0 && s.ids[i] <= s.ids[i - 1]))
      fail("shard file " + quoted(name) + ": record " + std::to_string(i) + " has expert id " +
           std::to_string(s.ids[i]) + (i > 0 ? " after " + std::to_string(s.ids[i - 1]) : "") +
           " (ids must be ascending and >= 0)");
    in.take_n(s.w1.data() + i * w1, w1, "W1");
    in.take_n(s.w2.data() + i * w2, w2, "W2");
    in.take_n(s.centers.row(static_cast<int64_t>(i)), static_cast<size_t>(s.dim), "center");
  }
}

}  // namespace

std::vector<char> encode_manifest(const CheckpointManifest& m) {
  std::vector<char> out;
  put_manifest_header(out, m);
  wire::put(out, m.codebook.data(), m.codebook.size());
  wire::put(out, m.assignment.data(), m.assignment.size());
  wire::put(out, m.owners.data(), m.owners.size());
  wire::put(out, m.bias.data(), m.bias.size());
  if (m.query) put_query_section(out, *m.query);
  for (const ShardEntry& s : m.shards) {
    put1(out, s.bytes);
    put1(out, s.checksum);
    put1(out, s.records);
  }
  seal(out);
  return out;
}

CheckpointManifest decode_manifest(std::span<const char> bytes, const std::string& name) {
  const uint32_t version = check_magic_and_version(bytes, kManifestMagic, kOldestManifestVersion,
                                                   kManifestVersion, "manifest", name);
  check_header_fits(bytes, manifest_header(version), "manifest", name);
  CheckpointManifest m;
  wire::Reader in(bytes, 0);
  ManifestSections sections;
  check_size_and_checksum(bytes, take_manifest_header(in, m, sections, name), "manifest", name);
  const auto E = static_cast<size_t>(m.layer.experts);
  m.codebook = Matrix(m.layer.codewords, m.layer.config.expert.dim);
  in.take_n(m.codebook.data(), m.codebook.size(), "codebook");
  m.assignment.resize(E);
  in.take_n(m.assignment.data(), E, "assignment");
  m.owners.resize(E);
  in.take_n(m.owners.data(), E, "owners");
  if (sections.bias) {
    m.bias.resize(E);
    in.take_n(m.bias.data(), E, "bias");
  }
  if (sections.query) m.query = take_query_section(in, m, sections.query_entries, name);
  m.shards.resize(static_cast<size_t>(m.ranks));
  for (ShardEntry& s : m.shards) {
    s.bytes = in.take<uint64_t>("shard bytes");
    s.checksum = in.take<uint64_t>("shard checksum");
    s.records = in.take<int64_t>("shard records");
  }
  check_manifest_body(m, name);
  return m;
}

std::vector<char> encode_shard(const ShardRecords& s) {
  std::vector<char> out;
  wire::put(out, kShardMagic, sizeof(kShardMagic));
  put1(out, kShardVersion);
  put1(out, s.rank);
  put1(out, s.ranks);
  put1(out, s.dim);
  put1(out, s.hidden);
  put1(out, static_cast<int64_t>(s.ids.size()));
  const auto w1 = static_cast<size_t>(ops::w1_rows(s.activation, s.hidden) * s.dim);
  const auto w2 = static_cast<size_t>(s.dim * s.hidden);
  for (size_t i = 0; i < s.ids.size(); ++i) {
    put1(out, s.ids[i]);
    wire::put(out, s.w1.data() + i * w1, w1);
    wire::put(out, s.w2.data() + i * w2, w2);
    wire::put(out, s.centers.row(static_cast<int64_t>(i)), static_cast<size_t>(s.dim));
  }
  seal(out);
  return out;
}

ShardRecords decode_shard(std::span<const char> bytes, const std::string& name,
                          Activation activation) {
  check_magic_and_version(bytes, kShardMagic, kShardVersion, kShardVersion, "shard file", name);
  check_header_fits(bytes, kShardHeader, "shard file", name);
  ShardRecords s;
  s.activation = activation;
  int64_t records = 0;
  wire::Reader in(bytes, 0);
  check_size_and_checksum(bytes, take_shard_header(in, s, records, name), "shard file", name);
  take_shard_records(in, s, records, name);
  return s;
}

}  // namespace airmoe::runtime
