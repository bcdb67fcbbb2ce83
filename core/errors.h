// The error types every folder throws, so that a caller (and a front-end
// such as the PyTorch binding) can tell apart what to fix and where:
//   UsageError     this rank's caller passed bad input (an argument, a shape,
//                  a value): fix the call. An std::invalid_argument.
//   PeerError      this rank's input was fine, but another rank's was not and
//                  every rank stops together; names that rank. Also an
//                  std::invalid_argument, so that code which catches "bad
//                  input on some rank" catches both.
//   InternalError  a broken invariant inside airmoe, or a malformed message
//                  from a peer (a bug, or memory corruption): not the
//                  caller's fault. An std::logic_error.
//   TransportError a failed transport call (MPI, ...). An std::runtime_error.
// File errors (a missing, truncated or malformed .npy file) are
// std::runtime_errors naming the file and what is wrong.
//
// Raised together: a collective check (comm::raise_together,
// comm::require_same_config) raises on every rank at once, so the ranks are
// still in step and a front-end may hand the error to its caller. It throws
// JointUsageError on the rank whose input was bad, PeerError on the others,
// and ConfigMismatchError on every rank when their configurations differ.
// raised_together() tells these apart from an error one rank raised alone in
// the middle of a collective, after which the others would wait forever
// (a front-end must end the job then).
#pragma once

#include <stdexcept>
#include <string>

namespace airmoe::inline core {

class UsageError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

class PeerError : public std::invalid_argument {
 public:
  PeerError(const std::string& message, int failed_rank)
      : std::invalid_argument(message), failed_rank_(failed_rank) {}
  int failed_rank() const { return failed_rank_; }

 private:
  int failed_rank_;
};

// The UsageError that raise_together throws on the failing rank.
class JointUsageError : public UsageError {
 public:
  using UsageError::UsageError;
};

// Ranks passed different configurations (require_same_config): thrown on
// every rank. An std::runtime_error.
class ConfigMismatchError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class InternalError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

class TransportError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// True for the errors that every rank raised together (see above).
inline bool raised_together(const std::exception& e) {
  return dynamic_cast<const JointUsageError*>(&e) || dynamic_cast<const PeerError*>(&e) ||
         dynamic_cast<const ConfigMismatchError*>(&e);
}

}  // namespace airmoe::inline core
