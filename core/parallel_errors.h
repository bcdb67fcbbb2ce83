// An exception must not leave an OpenMP region: the runtime would call
// std::terminate (an abort, not an error the caller can catch). A region
// whose body can throw (an allocation, a caller's callback) runs the body
// through ParallelErrors::run and calls rethrow() after the region: the
// first exception caught is thrown on the calling thread.
#pragma once

#include <exception>

namespace airmoe::inline core {

class ParallelErrors {
 public:
  // Runs fn(); returns false (and keeps the exception) if it threw.
  template <typename Fn>
  bool run(Fn&& fn) noexcept {
    try {
      fn();
      return true;
    } catch (...) {
      keep(std::current_exception());
      return false;
    }
  }

  // After the region: throws the kept exception, if any.
  void rethrow() const {
    if (first_) std::rethrow_exception(first_);
  }

 private:
  void keep(std::exception_ptr e) noexcept {
#pragma omp critical(airmoe_parallel_errors)
    if (!first_) first_ = e;
  }

  std::exception_ptr first_;
};

}  // namespace airmoe::inline core
