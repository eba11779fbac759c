// Parallel loops for kernel code that does not include torch.
//
// The binding layer hands each kernel a `Parallel`: torch's intra-op thread count and a C
// function that runs a range on torch's thread pool (torch::stable::parallel_for). Kernels use
// the same threads as the rest of torch (`torch.set_num_threads` applies) and never start an
// OpenMP runtime of their own. A default-constructed `Parallel` runs everything serially.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace alterops {

struct Parallel {
  // Threads torch's pool uses (torch.get_num_threads()); 1 = serial.
  int64_t num_threads = 1;
  // Runs body(b, e, ctx) over [begin, end) split into ranges of at least `grain` indices on
  // torch's pool; nested calls run serially. nullptr: run the body once over the whole range.
  void (*for_range)(int64_t begin, int64_t end, int64_t grain, void (*body)(int64_t, int64_t, void*),
                    void* ctx) = nullptr;

  // f(b, e) over [begin, end) in static ranges of at least `grain` indices.
  template <class F>
  void for_each(int64_t begin, int64_t end, int64_t grain, const F& f) const {
    if (end <= begin) return;
    if (for_range == nullptr || num_threads <= 1 || end - begin <= std::max<int64_t>(grain, 1)) {
      f(begin, end);
      return;
    }
    for_range(begin, end, grain,
              [](int64_t b, int64_t e, void* ctx) { (*static_cast<const F*>(ctx))(b, e); },
              const_cast<void*>(static_cast<const void*>(&f)));
  }

  // Tasks [0, n) handed out in runs, in order, to whichever thread asks first ("guided": each
  // run a 1 / (2 threads) share of the tasks left, so runs shrink from n / (2 threads) to 1):
  // f(next) runs once on each of at most n threads (its per-thread set-up done once), and
  // next(t) sets t to the thread's next task and returns false once none is left. Unlike
  // for_each's fixed shares, a thread that loses its core on a busy machine takes fewer tasks
  // instead of holding back the others, while neighbouring tasks still mostly run on one thread
  // (for the cache lines they share). Results do not depend on the thread that takes a task
  // where each task's work is its own.
  template <class F>
  void for_tasks(int64_t n, const F& f) const {
    if (n <= 0) return;
    const int64_t workers = std::min<int64_t>(std::max<int64_t>(num_threads, 1), n);
    std::atomic<int64_t> counter{0};
    auto run = [&] {
      int64_t cur = 0, end = 0;  // this thread's run
      f([&](int64_t& t) {
        if (cur == end) {  // take the next run
          int64_t take;
          cur = counter.load(std::memory_order_relaxed);
          do {
            if (cur >= n) return false;
            take = std::max<int64_t>(1, (n - cur) / (2 * workers));
          } while (!counter.compare_exchange_weak(cur, cur + take, std::memory_order_relaxed));
          end = cur + take;
        }
        t = cur++;
        return true;
      });
    };
    if (for_range == nullptr || workers <= 1) {
      run();
      return;
    }
    for_each(0, workers, 1, [&](int64_t, int64_t) { run(); });
  }

  // f(b, e) over [0, n) in chunks of `chunk` indices handed out dynamically to the threads: a
  // thread that loses its core on a busy machine does not hold back a fixed share of the work.
  template <class F>
  void for_dynamic(int64_t n, int64_t chunk, const F& f) const {
    if (n <= 0) return;
    chunk = std::max<int64_t>(1, chunk);
    const int64_t nchunks = (n + chunk - 1) / chunk;
    const int64_t workers = std::min<int64_t>(std::max<int64_t>(num_threads, 1), nchunks);
    if (for_range == nullptr || workers <= 1) {
      f(int64_t(0), n);
      return;
    }
    std::atomic<int64_t> next{0};
    for_each(0, workers, 1, [&](int64_t, int64_t) {
      for (;;) {
        const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
        if (c >= nchunks) break;
        f(c * chunk, std::min(n, (c + 1) * chunk));
      }
    });
  }
};

}  // namespace alterops
