// The executor behind cuda_emu.h: a fiber scheduler that runs CUDA thread blocks on one host
// thread, plus the part of the CUDA runtime API the launchers call and a few C entry points for
// the Python driver (schedule, device limits, guarded buffers, the violation log).
//
// Blocks run one after another. The threads of a block are fibers with their own stacks; they
// switch only at __syncthreads, __syncwarp and the warp collectives (and when they exit), and
// the next fiber to run is chosen among the runnable ones by the schedule: forward (lowest
// thread index first), reverse, or seeded random. A missing barrier then shows as a read of
// poison (shared memory is filled with 0xff bytes, a NaN in every float type, before each block)
// or of another thread's stale data, under at least one of the schedules.
//
// The tensor-core PTX wrappers (ptx_emu.h): mma and ldmatrix are warp collectives of the whole
// warp, computed by the last lane to arrive from every lane's operands with the fragment
// layouts of the PTX ISA; cp.async copies are checked when issued and performed by the wait
// that completes their group (under the random schedule: when issued).
//
// Every check that fails records a message in the violation log, aborts the launch (the rest
// of the grid is skipped) and makes cudaGetLastError() report cudaErrorLaunchFailure; a launch
// beyond the device limits is refused with the error CUDA gives and logged as well. Memory
// faults inside a kernel (the guard pages of test buffers, of the dynamic shared buffer, of the
// fiber stacks) are caught by a SIGSEGV/SIGBUS handler installed for the duration of a launch,
// reported with the buffer they hit, and abort the launch the same way.
#include <cuda_runtime.h>

#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "cuda_emu.h"

// ---------------------------------------------------------------------------------------
// Context switch (System V x86-64): saves the callee-saved registers, MXCSR and the x87 control
// word on the current stack, stores the stack pointer in *from and resumes the context whose
// stack pointer is `to`.
// ---------------------------------------------------------------------------------------
extern "C" void emu_switch(void** from, void* to);
extern "C" void emu_fiber_start();
asm(R"(
  .text
  .globl emu_switch
  .type emu_switch, @function
  .hidden emu_switch
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch

  .globl emu_fiber_start
  .type emu_fiber_start, @function
  .hidden emu_fiber_start
emu_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size emu_fiber_start, .-emu_fiber_start
)");

namespace emu {

enum State : int { kRunnable = 0, kAtBarrier, kAtWarpOp, kDone };

// A cp.async issued and not yet performed.
struct CpCopy {
  char* dst;
  const char* src;
  int bytes;
  bool fill;       // pred was false: zero-fill, nothing read
  uint64_t group;  // the committed group it belongs to, kOpenGroup before the commit
  const char* file;
  int line;
};
constexpr uint64_t kOpenGroup = ~uint64_t(0);

// The operands of a lane waiting at a matrix operation (on its stack while it waits).
struct MmaOperands {
  float* d;
  const uint32_t* a;
  const uint32_t* b;
  const float* c;
};
struct LdmatrixOperands {
  const void* row;
  uint32_t* r;
};

struct Fiber {
  void* sp = nullptr;
  char* stack_lo = nullptr;  // usable stack [stack_lo, stack_hi), a guard page below
  char* stack_hi = nullptr;
  uint3 tid{0, 0, 0};
  int linear = 0, warp = 0, lane = 0;
  State state = kRunnable;
  // at a barrier
  int bar_kind = 0, bar_pred = 0;
  const char* file = "";
  int line = 0;
  // at a warp operation
  int op = 0, arg = 0, width = 32;
  unsigned mask = 0;
  uint64_t val = 0, result = 0;
  void* operands = nullptr;  // matrix operations: the lane's operands and results
  // cp.async: the copies issued and not yet performed (in issue order), the groups committed
  std::vector<CpCopy> copies;
  uint64_t committed = 0;
  const CpCopy* copying = nullptr;  // the copy being performed (named if it faults)
};

Fiber* g_cur = nullptr;
dim3 g_block_idx, g_block_dim, g_grid_dim;

namespace {

constexpr size_t kStack = 256 * 1024;
constexpr int kMaxThreads = 1024;

size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}
size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

// ---- configuration --------------------------------------------------------------------
int g_policy = 0;  // 0 forward, 1 reverse, 2 random
uint64_t g_seed = 1;
int g_arch = 90;

struct Limits {
  int max_threads = 1024, max_x = 1024, max_y = 1024, max_z = 64;
  unsigned grid_x = 0x7fffffffu, grid_y = 65535, grid_z = 65535;
  size_t smem_default = 48 * 1024;  // static + dynamic without opt-in
  size_t smem_optin = 0;            // static + dynamic with cudaFuncAttributeMaxDynamicSharedMemorySize
  size_t smem_static = 48 * 1024;
  int sms = 0;
};
Limits limits() {
  Limits l;
  l.smem_optin = g_arch >= 90 ? 227 * 1024 : 163 * 1024;
  l.sms = g_arch >= 90 ? 132 : 108;
  return l;
}

// ---- log ------------------------------------------------------------------------------
std::string g_log;        // violations (what the tests assert empty)
std::string g_launches;   // one line per launch: name grid block smem
int g_violations = 0;
cudaError_t g_last_error = cudaSuccess;
uint64_t g_stat_launches = 0, g_stat_blocks = 0, g_stat_threads = 0, g_stat_switches = 0;
uint64_t g_launch_index = 0;  // launches since emu_configure: with the seed, the random schedule of a launch

// ---- the running launch ----------------------------------------------------------------
struct Warp {
  unsigned arrived = 0;  // lanes waiting at a warp operation
  unsigned exited = 0;   // lanes that have exited
};

struct Run {
  const char* name = "";
  const char* file = "";
  int line = 0;
  int n = 0;  // threads per block
  int runnable_count = 0;
  uint64_t runnable[kMaxThreads / 64] = {};
  int at_barrier = 0, done = 0;
  Warp warps[kMaxThreads / 32];
  bool aborted = false;
  uint64_t rng = 1;
  // shared memory
  char* dyn = nullptr;   // start of the dynamic buffer (its end is a guard page)
  size_t dyn_bytes = 0;  // requested
  char* dyn_fill = nullptr;  // start of the poisoned area (dyn rounded down)
  size_t static_bytes = 0;
  std::map<void*, std::pair<size_t, uint64_t>> statics;  // address -> (bytes, block epoch)
  uint64_t epoch = 0;
  size_t smem_limit = 0;  // static + dynamic allowed for this launch
};

Run* g_run = nullptr;
std::vector<Fiber> g_fibers;
void* g_sched_sp = nullptr;

// dynamic shared memory region: [map, map + len) with the last page PROT_NONE
char* g_dyn_map = nullptr;
size_t g_dyn_len = 0;

std::string describe_thread(const Fiber* f) {
  char b[160];
  snprintf(b, sizeof b, "thread (%u,%u,%u) [warp %d lane %d] of block (%u,%u,%u)", f->tid.x, f->tid.y, f->tid.z,
           f->warp, f->lane, g_block_idx.x, g_block_idx.y, g_block_idx.z);
  return b;
}

const char* policy_name() { return g_policy == 0 ? "forward" : g_policy == 1 ? "reverse" : "random"; }

void log_line(const std::string& s) {
  ++g_violations;
  if (g_violations <= 50) {
    g_log += s;
    g_log += '\n';
  }
}

void violation(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void violation(const char* fmt, ...) {
  char buf[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  std::string s = buf;
  if (g_run) {
    char ctx[512];
    snprintf(ctx, sizeof ctx, " [kernel %s launched at %s:%d, grid (%u,%u,%u), block (%u,%u,%u), schedule %s",
             g_run->name, g_run->file, g_run->line, g_grid_dim.x, g_grid_dim.y, g_grid_dim.z, g_block_dim.x,
             g_block_dim.y, g_block_dim.z, policy_name());
    s += ctx;
    if (g_policy == 2) s += " seed " + std::to_string(g_seed);
    s += "]";
    g_run->aborted = true;
  }
  log_line(s);
}

// ---- scheduling ------------------------------------------------------------------------
inline void set_runnable(Fiber* f) {
  f->state = kRunnable;
  uint64_t& w = g_run->runnable[f->linear >> 6];
  const uint64_t bit = uint64_t(1) << (f->linear & 63);
  if (!(w & bit)) {
    w |= bit;
    ++g_run->runnable_count;
  }
}
inline void clear_runnable(Fiber* f) {
  uint64_t& w = g_run->runnable[f->linear >> 6];
  const uint64_t bit = uint64_t(1) << (f->linear & 63);
  if (w & bit) {
    w &= ~bit;
    --g_run->runnable_count;
  }
}

uint64_t next_random() {
  uint64_t x = g_run->rng;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  g_run->rng = x;
  return x * 0x2545F4914F6CDD1DULL;
}

int pick() {
  Run& r = *g_run;
  const int words = (r.n + 63) / 64;
  if (g_policy == 0) {
    for (int w = 0; w < words; ++w)
      if (r.runnable[w]) return w * 64 + __builtin_ctzll(r.runnable[w]);
  } else if (g_policy == 1) {
    for (int w = words - 1; w >= 0; --w)
      if (r.runnable[w]) return w * 64 + 63 - __builtin_clzll(r.runnable[w]);
  } else {
    int k = static_cast<int>(next_random() % static_cast<uint64_t>(r.runnable_count));
    for (int w = 0; w < words; ++w) {
      const int c = __builtin_popcountll(r.runnable[w]);
      if (k < c) {
        uint64_t bits = r.runnable[w];
        for (int i = 0; i < k; ++i) bits &= bits - 1;
        return w * 64 + __builtin_ctzll(bits);
      }
      k -= c;
    }
  }
  return -1;
}

// Back to the scheduler; returns when this fiber is picked again.
inline void yield() {
  Fiber* f = g_cur;
  ++g_stat_switches;
  emu_switch(&f->sp, g_sched_sp);
}

[[noreturn]] void abort_fiber() {
  Fiber* f = g_cur;
  clear_runnable(f);
  f->state = kDone;
  emu_switch(&f->sp, g_sched_sp);
  __builtin_trap();  // never resumed
}

void fiber_main(Fiber* f);

void init_fiber(Fiber* f) {
  // Stack image that emu_switch pops: MXCSR/FPU word, r15, r14, r13, r12, rbx, rbp, return address.
  uint64_t* top = reinterpret_cast<uint64_t*>(f->stack_hi);
  top[-1] = reinterpret_cast<uint64_t>(&emu_fiber_start);
  top[-2] = 0;                                           // rbp
  top[-3] = 0;                                           // rbx
  top[-4] = reinterpret_cast<uint64_t>(f);               // r12: argument
  top[-5] = reinterpret_cast<uint64_t>(&fiber_main);     // r13: entry
  top[-6] = 0;                                           // r14
  top[-7] = 0;                                           // r15
  top[-8] = uint64_t(0x1F80) | (uint64_t(0x037F) << 32);  // MXCSR, x87 control word
  f->sp = &top[-8];
}

void ensure_fibers(int n) {
  const size_t page = page_size();
  while (static_cast<int>(g_fibers.size()) < n) {
    // Fiber objects never move once created: reserve the whole pool up front.
    if (g_fibers.capacity() < static_cast<size_t>(kMaxThreads)) g_fibers.reserve(kMaxThreads);
    g_fibers.emplace_back();
    Fiber& f = g_fibers.back();
    void* m = mmap(nullptr, kStack + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
      perror("cuda_emu: mmap of a fiber stack");
      abort();
    }
    mprotect(m, page, PROT_NONE);
    f.stack_lo = static_cast<char*>(m) + page;
    // stagger the stack tops so that the fibers' hot frames do not share L1 cache sets
    f.stack_hi = f.stack_lo + kStack - (g_fibers.size() - 1) % 64 * 64;
  }
}

// The kernel's thunk for the current launch.
Thunk g_thunk = nullptr;
void* g_ctx = nullptr;

void warp_check_exit(Fiber* f);

void fiber_main(Fiber* f) {
  g_thunk(g_ctx);
  // exited
  clear_runnable(f);
  f->state = kDone;
  ++g_run->done;
  warp_check_exit(f);
  ++g_stat_switches;
  emu_switch(&f->sp, g_sched_sp);
  __builtin_trap();
}

// `arg`: for kMma the input type (MmaType), for kLdmatrix the count of matrices | 16 for .trans.
const char* op_name(int op, int arg = 0) {
  switch (op) {
    case kMma:
      return arg == kMmaBF16 ? "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
                             : "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32";
    case kLdmatrix:
      switch (arg) {
        case 1: return "ldmatrix.sync.aligned.m8n8.x1.shared.b16";
        case 2: return "ldmatrix.sync.aligned.m8n8.x2.shared.b16";
        case 4: return "ldmatrix.sync.aligned.m8n8.x4.shared.b16";
        case 16 | 1: return "ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16";
        case 16 | 2: return "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16";
        case 16 | 4: return "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16";
      }
      return "ldmatrix";
    case kSyncwarp: return "__syncwarp";
    case kShflIdx: return "__shfl_sync";
    case kShflUp: return "__shfl_up_sync";
    case kShflDown: return "__shfl_down_sync";
    case kShflXor: return "__shfl_xor_sync";
    case kBallot: return "__ballot_sync";
    case kAny: return "__any_sync";
    case kAll: return "__all_sync";
    case kReduceAdd: return "__reduce_add_sync";
    case kReduceMin: return "__reduce_min_sync";
    case kReduceMax: return "__reduce_max_sync";
    case kReduceAnd: return "__reduce_and_sync";
    case kReduceOr: return "__reduce_or_sync";
    case kReduceXor: return "__reduce_xor_sync";
  }
  return "?";
}

Fiber* lane_fiber(const Fiber* f, int lane) {
  const int idx = f->warp * 32 + lane;
  return idx < g_run->n ? &g_fibers[idx] : nullptr;
}

std::string where(const Fiber* g) {
  char b[600];
  if (g->state == kDone) return "has exited";
  if (g->state == kAtBarrier) {
    snprintf(b, sizeof b, "waits at __syncthreads (%s:%d)", g->file, g->line);
    return b;
  }
  if (g->state == kAtWarpOp) {
    snprintf(b, sizeof b, "waits in %s (%s:%d) with mask 0x%08x", op_name(g->op, g->arg), g->file, g->line, g->mask);
    return b;
  }
  return "is running";
}

// A lane exited: every lane waiting on a warp operation whose mask names it can never finish.
void warp_check_exit(Fiber* f) {
  Warp& w = g_run->warps[f->warp];
  w.exited |= 1u << f->lane;
  for (unsigned bits = w.arrived; bits; bits &= bits - 1) {
    const int l = __builtin_ctz(bits);
    Fiber* g = lane_fiber(f, l);
    if (g && (g->mask >> f->lane & 1u)) {
      violation("%s at %s:%d with mask 0x%08x by %s: lane %d of the mask exited without taking part",
                op_name(g->op, g->arg), g->file, g->line, g->mask, describe_thread(g).c_str(), f->lane);
      return;
    }
  }
}

bool same_site(const Fiber* a, const Fiber* b) {
  return a->line == b->line && (a->file == b->file || std::strcmp(a->file, b->file) == 0);
}

// mma / ldmatrix over the 32 lanes (defined with the memory checks below); false if it failed.
bool complete_matrix_op(Fiber* const* lanes, const Fiber* f);

// Completes the warp operation of the lanes in `mask` if all of them have arrived.
void try_complete(Fiber* f) {
  Warp& w = g_run->warps[f->warp];
  const unsigned m = f->mask;
  if ((w.arrived & m) != m) return;
  Fiber* lanes[32] = {};
  for (unsigned bits = m; bits; bits &= bits - 1) {
    const int l = __builtin_ctz(bits);
    Fiber* g = lane_fiber(f, l);
    lanes[l] = g;
    const bool aligned = f->op == kMma || f->op == kLdmatrix;
    if (g->mask != m || g->op != f->op || (f->op != kSyncwarp && (g->width != f->width)) ||
        (aligned && g->arg != f->arg)) {
      violation("warp %d: lanes disagree on a warp operation: lane %d is in %s (%s:%d) with mask 0x%08x, lane %d "
                "in %s (%s:%d) with mask 0x%08x",
                f->warp, f->lane, op_name(f->op, f->arg), f->file, f->line, f->mask, l, op_name(g->op, g->arg),
                g->file, g->line, g->mask);
      return;
    }
    if (aligned && !same_site(f, g)) {
      violation("warp %d: lanes at different %s instructions (.aligned: the whole warp must execute the same "
                "one): lane %d at %s:%d, lane %d at %s:%d",
                f->warp, op_name(f->op, f->arg), f->lane, f->file, f->line, l, g->file, g->line);
      return;
    }
  }
  // Lanes outside the mask that wait for a lane inside it.
  for (unsigned bits = w.arrived & ~m; bits; bits &= bits - 1) {
    const int l = __builtin_ctz(bits);
    Fiber* g = lane_fiber(f, l);
    if (g->mask & m) {
      violation("warp %d: lane %d waits in %s (%s:%d) with mask 0x%08x for lanes that execute %s (%s:%d) with mask "
                "0x%08x",
                f->warp, l, op_name(g->op, g->arg), g->file, g->line, g->mask, op_name(f->op, f->arg), f->file,
                f->line, m);
      return;
    }
  }
  const int op = f->op;
  uint64_t common = 0;
  if (op == kBallot) {
    for (unsigned bits = m; bits; bits &= bits - 1) {
      const int l = __builtin_ctz(bits);
      if (lanes[l]->val) common |= uint64_t(1) << l;
    }
  } else if (op == kAny || op == kAll) {
    bool any = false, all = true;
    for (unsigned bits = m; bits; bits &= bits - 1) {
      const bool p = lanes[__builtin_ctz(bits)]->val != 0;
      any |= p;
      all &= p;
    }
    common = op == kAny ? any : all;
  } else if (op >= kReduceAdd && op <= kReduceXor) {
    const bool is_signed = f->arg != 0;
    uint32_t acc = 0;
    bool first = true;
    for (unsigned bits = m; bits; bits &= bits - 1) {
      const uint32_t v = static_cast<uint32_t>(lanes[__builtin_ctz(bits)]->val);
      if (first) {
        acc = v;
        first = false;
        continue;
      }
      switch (op) {
        case kReduceAdd: acc += v; break;
        case kReduceAnd: acc &= v; break;
        case kReduceOr: acc |= v; break;
        case kReduceXor: acc ^= v; break;
        case kReduceMin:
          acc = is_signed ? static_cast<uint32_t>(std::min(int32_t(acc), int32_t(v))) : std::min(acc, v);
          break;
        case kReduceMax:
          acc = is_signed ? static_cast<uint32_t>(std::max(int32_t(acc), int32_t(v))) : std::max(acc, v);
          break;
      }
    }
    common = acc;
  } else if (op == kMma || op == kLdmatrix) {
    if (!complete_matrix_op(lanes, f)) return;
  }
  for (unsigned bits = m; bits; bits &= bits - 1) {
    const int l = __builtin_ctz(bits);
    Fiber* g = lanes[l];
    if (op >= kShflIdx && op <= kShflXor) {
      const int width = g->width;
      const int base = l & ~(width - 1);
      int src = l;
      switch (op) {
        case kShflIdx: src = base + (g->arg & (width - 1)); break;
        case kShflUp: src = (l - base) >= g->arg ? l - g->arg : l; break;
        case kShflDown: src = (l - base) + g->arg < width ? l + g->arg : l; break;
        case kShflXor: {
          const int s = l ^ g->arg;
          src = (s >= base + width || s < 0 || s > 31) ? l : s;
          break;
        }
      }
      if (!(m >> src & 1u)) {
        violation("%s at %s:%d by %s reads lane %d, which is not in the mask 0x%08x (undefined value)", op_name(op),
                  g->file, g->line, describe_thread(g).c_str(), src, m);
        return;
      }
      g->result = lanes[src]->val;
    } else {
      g->result = common;
    }
  }
  w.arrived &= ~m;
  for (unsigned bits = m; bits; bits &= bits - 1) set_runnable(lanes[__builtin_ctz(bits)]);
}

void release_barrier() {
  Run& r = *g_run;
  Fiber& f0 = g_fibers[0];
  int count = 0;
  bool all = true, any = false;
  for (int i = 0; i < r.n; ++i) {
    Fiber& g = g_fibers[i];
    if (g.line != f0.line || std::strcmp(g.file, f0.file) != 0 || g.bar_kind != f0.bar_kind) {
      violation("divergent barrier: %s waits at %s:%d, %s at %s:%d", describe_thread(&f0).c_str(), f0.file, f0.line,
                describe_thread(&g).c_str(), g.file, g.line);
      return;
    }
    count += g.bar_pred;
    all &= g.bar_pred != 0;
    any |= g.bar_pred != 0;
  }
  const int res = f0.bar_kind == kBarCount ? count : f0.bar_kind == kBarAnd ? all : f0.bar_kind == kBarOr ? any : 0;
  r.at_barrier = 0;
  for (int i = 0; i < r.n; ++i) {
    g_fibers[i].result = static_cast<uint64_t>(res);
    set_runnable(&g_fibers[i]);
  }
}

// No fiber can run and not all have exited: a divergent barrier or a deadlock.
void report_stuck() {
  Run& r = *g_run;
  const Fiber* bar = nullptr;
  const Fiber* exited = nullptr;
  const Fiber* warp = nullptr;
  int n_bar = 0, n_exit = 0;
  for (int i = 0; i < r.n; ++i) {
    const Fiber& g = g_fibers[i];
    if (g.state == kAtBarrier) {
      n_bar++;
      if (!bar) bar = &g;
    } else if (g.state == kDone) {
      n_exit++;
      if (!exited) exited = &g;
    } else if (g.state == kAtWarpOp && !warp) {
      warp = &g;
    }
  }
  if (bar && exited) {
    violation("divergent __syncthreads: %d of %d threads wait at %s:%d (e.g. %s) but %d exited without reaching it "
              "(e.g. %s)",
              n_bar, r.n, bar->file, bar->line, describe_thread(bar).c_str(), n_exit, describe_thread(exited).c_str());
    return;
  }
  if (warp) {
    // Find a lane of its mask that is not there.
    for (int l = 0; l < 32; ++l) {
      if (!(warp->mask >> l & 1u)) continue;
      Fiber* g = lane_fiber(warp, l);
      if (g && g->state != kAtWarpOp) {
        violation("deadlock: %s waits in %s (%s:%d) with mask 0x%08x for lane %d, which %s", describe_thread(warp).c_str(),
                  op_name(warp->op, warp->arg), warp->file, warp->line, warp->mask, l, where(g).c_str());
        return;
      }
    }
    violation("deadlock: %s waits in %s (%s:%d) with mask 0x%08x", describe_thread(warp).c_str(),
              op_name(warp->op, warp->arg), warp->file, warp->line, warp->mask);
    return;
  }
  violation("deadlock in block (%u,%u,%u)", g_block_idx.x, g_block_idx.y, g_block_idx.z);
}

// ---- memory faults -----------------------------------------------------------------------
struct Buffer {
  char* base;  // mapping
  size_t len;
  char* data;
  size_t bytes;
  std::string name;
};
std::map<char*, Buffer> g_buffers;  // by data pointer
uintptr_t g_fault_addr = 0;
int g_fault_sig = 0;

std::string describe_address(uintptr_t a) {
  char b[512];
  for (const auto& kv : g_buffers) {
    const Buffer& B = kv.second;
    const uintptr_t lo = reinterpret_cast<uintptr_t>(B.base), hi = lo + B.len;
    if (a < lo || a >= hi) continue;
    const uintptr_t d0 = reinterpret_cast<uintptr_t>(B.data), d1 = d0 + B.bytes;
    const intptr_t off = static_cast<intptr_t>(a - d0);
    snprintf(b, sizeof b, "offset %td of buffer '%s' (%zu bytes): %s", off, B.name.c_str(), B.bytes,
             a < d0 ? "before its start" : a >= d1 ? "past its end" : "inside it (a write to a read-only input?)");
    return b;
  }
  if (g_dyn_map) {
    const uintptr_t lo = reinterpret_cast<uintptr_t>(g_dyn_map), hi = lo + g_dyn_len;
    if (a >= lo && a < hi) {
      const uintptr_t start = reinterpret_cast<uintptr_t>(g_run ? g_run->dyn : nullptr);
      snprintf(b, sizeof b, "offset %td of the dynamic shared memory (%zu bytes requested at launch): past its end",
               static_cast<intptr_t>(a - start), g_run ? g_run->dyn_bytes : size_t(0));
      return b;
    }
  }
  for (const Fiber& f : g_fibers) {
    const uintptr_t lo = reinterpret_cast<uintptr_t>(f.stack_lo);
    if (a < lo && a + page_size() >= lo) return "the guard page of a thread's stack (stack overflow)";
  }
  if (a < 65536) return "near a null pointer";
  return "not a buffer known to the emulator";
}

// ---- shared-memory ranges, mma and ldmatrix ----------------------------------------------------
// [a, a + n) lies inside the launch's dynamic shared memory or inside one static __shared__ array.
bool in_shared(uintptr_t a, size_t n) {
  const Run& r = *g_run;
  const uintptr_t d0 = reinterpret_cast<uintptr_t>(r.dyn);
  if (a >= d0 && a + n <= d0 + r.dyn_bytes) return true;
  auto it = r.statics.upper_bound(reinterpret_cast<void*>(a));
  if (it == r.statics.begin()) return false;
  --it;
  const uintptr_t s0 = reinterpret_cast<uintptr_t>(it->first);
  return a >= s0 && a + n <= s0 + it->second.first;
}

// Where [a, a + n) is, when it is not inside shared memory.
std::string describe_not_shared(uintptr_t a, size_t n) {
  char b[512];
  const Run& r = *g_run;
  const uintptr_t d0 = reinterpret_cast<uintptr_t>(r.dyn);
  if (a >= d0 && a < d0 + r.dyn_bytes) {
    snprintf(b, sizeof b, "bytes %td..%td of the dynamic shared memory, which has %zu bytes (requested at launch)",
             static_cast<intptr_t>(a - d0), static_cast<intptr_t>(a - d0 + n - 1), r.dyn_bytes);
    return b;
  }
  for (const auto& kv : r.statics) {
    const uintptr_t s0 = reinterpret_cast<uintptr_t>(kv.first);
    if (a >= s0 && a < s0 + kv.second.first) {
      snprintf(b, sizeof b, "bytes %td..%td of a static __shared__ array of %zu bytes", static_cast<intptr_t>(a - s0),
               static_cast<intptr_t>(a - s0 + n - 1), kv.second.first);
      return b;
    }
  }
  for (const auto& kv : g_buffers) {
    const Buffer& B = kv.second;
    const uintptr_t d = reinterpret_cast<uintptr_t>(B.data);
    if (a >= d && a < d + B.bytes) {
      snprintf(b, sizeof b, "global memory: offset %td of buffer '%s' (%zu bytes)", static_cast<intptr_t>(a - d),
               B.name.c_str(), B.bytes);
      return b;
    }
  }
  for (const Fiber& f : g_fibers) {
    if (a >= reinterpret_cast<uintptr_t>(f.stack_lo) && a < reinterpret_cast<uintptr_t>(f.stack_hi))
      return "a thread's stack (local memory)";
  }
  return describe_address(a);
}

float f16_bits_to_float(uint32_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float
    const float v = std::ldexp(static_cast<float>(man), -24);
    return sign ? -v : v;
  }
  bits = exp == 31 ? (sign | 0x7f800000u | (man << 13)) : (sign | ((exp + 112) << 23) | (man << 13));
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

float bf16_bits_to_float(uint32_t h) {
  const uint32_t bits = h << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, D = A B + C, with the fragment
// layouts of the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type"); g = lane / 4,
// t = lane % 4, element e of a register pair in the low (e even) or high (e odd) half:
//   A a0..a7: row g + 8 * ((e / 2) % 2), col 2t + e % 2 + 8 * (e / 4)
//   B b0..b3: row 2t + e % 2 + 8 * (e / 2), col g
//   C, D c0..c3: row g + 8 * (i / 2), col 2t + i % 2
// The inputs are exact in float32 and so are their products; each output element is C + the 16
// products added in order of k in float32. (The tensor cores sum the products with their own
// alignment and rounding: results may differ from this in the last bits.)
bool complete_mma(Fiber* const* lanes, int type) {
  float A[16][16], B[16][8], C[16][8];
  float (*cvt)(uint32_t) = type == kMmaBF16 ? bf16_bits_to_float : f16_bits_to_float;
  for (int l = 0; l < 32; ++l) {
    const MmaOperands* o = static_cast<const MmaOperands*>(lanes[l]->operands);
    const int g = l >> 2, t = l & 3;
    for (int e = 0; e < 8; ++e)
      A[g + ((e >> 1) & 1) * 8][2 * t + (e & 1) + (e >> 2) * 8] = cvt((o->a[e >> 1] >> (16 * (e & 1))) & 0xffffu);
    for (int e = 0; e < 4; ++e) B[2 * t + (e & 1) + (e >> 1) * 8][g] = cvt((o->b[e >> 1] >> (16 * (e & 1))) & 0xffffu);
    for (int i = 0; i < 4; ++i) C[g + (i >> 1) * 8][2 * t + (i & 1)] = o->c[i];
  }
  // (every lane's C is read before any D is written: d and c may be the same array)
  float D[16][8];
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 8; ++n) {
      float acc = C[r][n];
      for (int k = 0; k < 16; ++k) acc += A[r][k] * B[k][n];
      D[r][n] = acc;
    }
  for (int l = 0; l < 32; ++l) {
    const MmaOperands* o = static_cast<const MmaOperands*>(lanes[l]->operands);
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 4; ++i) o->d[i] = D[g + (i >> 1) * 8][2 * t + (i & 1)];
  }
  return true;
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16 (PTX ISA, "Warp-level matrix load
// instruction: ldmatrix"): lanes 8m..8m+7 give the rows of matrix m (16 bytes each, 16-byte aligned,
// in shared memory); lane l receives in register m the elements 2 (l % 4), 2 (l % 4) + 1 of row l / 4
// of matrix m, or with .trans of its transpose: rows 2 (l % 4) and 2 (l % 4) + 1 of column l / 4.
bool complete_ldmatrix(Fiber* const* lanes, const Fiber* f) {
  const int num = f->arg & 7;
  const bool trans = (f->arg & 16) != 0;
  uint16_t rows[4][8][8];
  for (int m = 0; m < num; ++m)
    for (int i = 0; i < 8; ++i) {
      const Fiber* g = lanes[m * 8 + i];
      const uintptr_t a = reinterpret_cast<uintptr_t>(static_cast<const LdmatrixOperands*>(g->operands)->row);
      const bool misaligned = (a & 15) != 0;
      if (misaligned || !in_shared(a, 16)) {
        const std::string where = misaligned && in_shared(a & ~uintptr_t(15), 16) ? "in shared memory"
                                                                                   : describe_not_shared(a, 16);
        violation("%s at %s:%d: lane %d (%s) gives row %d of matrix %d at 0x%" PRIxPTR ", %s (%s)",
                  op_name(f->op, f->arg), f->file, f->line, g->lane, describe_thread(g).c_str(), i, m, a,
                  misaligned ? "not 16-byte aligned" : "not 16 bytes of shared memory", where.c_str());
        return false;
      }
      std::memcpy(rows[m][i], reinterpret_cast<const void*>(a), 16);
    }
  for (int l = 0; l < 32; ++l) {
    uint32_t* r = static_cast<const LdmatrixOperands*>(lanes[l]->operands)->r;
    const int q = l >> 2, p = 2 * (l & 3);
    for (int m = 0; m < num; ++m) {
      const uint32_t lo = trans ? rows[m][p][q] : rows[m][q][p];
      const uint32_t hi = trans ? rows[m][p + 1][q] : rows[m][q][p + 1];
      r[m] = lo | (hi << 16);
    }
  }
  return true;
}

bool complete_matrix_op(Fiber* const* lanes, const Fiber* f) {
  return f->op == kMma ? complete_mma(lanes, f->arg) : complete_ldmatrix(lanes, f);
}

double g_time_limit = 120.0;  // seconds of CPU time per launch (the watchdog)
long g_tid = 0;               // the thread running the launch

// For a fault while a cp.async is performed: which one.
std::string copy_context(const Fiber* f) {
  if (!f->copying) return "";
  char b[600];
  snprintf(b, sizeof b, ", reading the %d-byte source of the cp.async issued at %s:%d", f->copying->bytes,
           f->copying->file, f->copying->line);
  return b;
}

extern "C" void emu_fault_landing() {
  if (g_run && g_cur) {
    if (g_fault_sig == SIGVTALRM)
      violation("kernel still running after %.0f s of CPU time (an endless loop?), %s", g_time_limit,
                describe_thread(g_cur).c_str());
    else
      violation("%s: invalid memory access at 0x%" PRIxPTR ": %s, by %s%s",
                g_fault_sig == SIGFPE ? "SIGFPE (integer division by zero?)" : "memory fault", g_fault_addr,
                describe_address(g_fault_addr).c_str(), describe_thread(g_cur).c_str(), copy_context(g_cur).c_str());
  }
  abort_fiber();
}

struct sigaction g_old_segv, g_old_bus, g_old_fpe, g_old_vtalrm;
stack_t g_old_altstack;
char* g_altstack = nullptr;
timer_t g_timer;
bool g_timer_ok = false;
volatile sig_atomic_t g_timed_out = 0;

void fault_handler(int sig, siginfo_t* info, void* uctx) {
  ucontext_t* uc = static_cast<ucontext_t*>(uctx);
  Fiber* f = g_cur;
  if (sig == SIGVTALRM && (g_run == nullptr || f == nullptr)) {
    g_timed_out = 1;  // in the scheduler: it stops at its next step
    return;
  }
  if (g_run == nullptr || f == nullptr || syscall(SYS_gettid) != g_tid) {
    // A fault outside a kernel (host code of a launcher, or the emulator): not ours to hide.
    signal(sig, SIG_DFL);
    return;  // re-executes the faulting instruction with the default action
  }
  g_fault_addr = reinterpret_cast<uintptr_t>(info->si_addr);
  g_fault_sig = sig;
  // Resume the fiber in emu_fault_landing on a fresh stack frame at the top of its stack (its
  // stack may be the thing that overflowed); it records the fault and leaves the launch.
  uintptr_t sp = reinterpret_cast<uintptr_t>(f->stack_hi) - 256;
  sp &= ~uintptr_t(15);
  sp -= 8;  // as after a call
  uc->uc_mcontext.gregs[REG_RSP] = static_cast<greg_t>(sp);
  uc->uc_mcontext.gregs[REG_RIP] = reinterpret_cast<greg_t>(&emu_fault_landing);
}

void install_handlers() {
  const size_t alt = 64 * 1024;
  if (!g_altstack) g_altstack = static_cast<char*>(malloc(alt));
  stack_t ss{};
  ss.ss_sp = g_altstack;
  ss.ss_size = alt;
  ss.ss_flags = 0;
  sigaltstack(&ss, &g_old_altstack);
  struct sigaction sa {};
  sa.sa_sigaction = fault_handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_old_segv);
  sigaction(SIGBUS, &sa, &g_old_bus);
  sigaction(SIGFPE, &sa, &g_old_fpe);
  sigaction(SIGVTALRM, &sa, &g_old_vtalrm);
  // watchdog: this thread's CPU time
  g_tid = syscall(SYS_gettid);
  g_timed_out = 0;
  struct sigevent ev {};
  ev.sigev_notify = SIGEV_THREAD_ID;
  ev.sigev_signo = SIGVTALRM;
  ev._sigev_un._tid = static_cast<pid_t>(g_tid);
  g_timer_ok = timer_create(CLOCK_THREAD_CPUTIME_ID, &ev, &g_timer) == 0;
  if (g_timer_ok) {
    struct itimerspec its {};
    its.it_value.tv_sec = static_cast<time_t>(g_time_limit);
    its.it_value.tv_nsec = static_cast<long>((g_time_limit - static_cast<double>(its.it_value.tv_sec)) * 1e9);
    timer_settime(g_timer, 0, &its, nullptr);
  }
}

void restore_handlers() {
  if (g_timer_ok) timer_delete(g_timer);
  g_timer_ok = false;
  sigaction(SIGVTALRM, &g_old_vtalrm, nullptr);
  sigaction(SIGSEGV, &g_old_segv, nullptr);
  sigaction(SIGBUS, &g_old_bus, nullptr);
  sigaction(SIGFPE, &g_old_fpe, nullptr);
  if (g_old_altstack.ss_flags & SS_DISABLE) {
    stack_t ss{};
    ss.ss_flags = SS_DISABLE;
    sigaltstack(&ss, nullptr);
  } else {
    sigaltstack(&g_old_altstack, nullptr);
  }
}

// Dynamic shared memory: `bytes` ending (16-byte aligned start) right before a PROT_NONE page.
void setup_dynamic(Run& r, size_t bytes) {
  const size_t page = page_size();
  const size_t need = round_up(bytes + 16, page) + page;
  if (g_dyn_len < need) {
    if (g_dyn_map) munmap(g_dyn_map, g_dyn_len);
    g_dyn_len = std::max(need, size_t(256 * 1024) + page);
    void* m = mmap(nullptr, g_dyn_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
      perror("cuda_emu: mmap of shared memory");
      abort();
    }
    g_dyn_map = static_cast<char*>(m);
    mprotect(g_dyn_map + g_dyn_len - page, page, PROT_NONE);
  }
  char* guard = g_dyn_map + g_dyn_len - page;
  r.dyn_bytes = bytes;
  r.dyn = guard - bytes;
  // `extern __shared__ __align__(16)`: start on a 16-byte boundary; the up to 15 bytes between
  // the requested end and the guard page are checked for writes after every block.
  r.dyn_fill = reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(r.dyn) & ~uintptr_t(15));
  r.dyn = r.dyn_fill;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Device-side entry points (called from the kernels through cuda_emu.h)
// ---------------------------------------------------------------------------------------
static const uint3 kHostTid{0, 0, 0};

const uint3& thread_idx() {
  if (!g_cur) {
    violation("threadIdx read outside a kernel");
    return kHostTid;
  }
  return g_cur->tid;
}

int syncthreads(int kind, int pred, const char* file, int line) {
  Fiber* f = g_cur;
  if (!f) {
    violation("__syncthreads called outside a kernel (%s:%d)", file, line);
    return 0;
  }
  Run& r = *g_run;
  f->state = kAtBarrier;
  f->bar_kind = kind;
  f->bar_pred = pred;
  f->file = file;
  f->line = line;
  clear_runnable(f);
  if (++r.at_barrier == r.n) release_barrier();
  yield();
  if (r.aborted) abort_fiber();
  return static_cast<int>(f->result);
}

namespace {

// A warp operation by the running lane: checked, then the lane waits until the operation
// completes (the last lane to arrive completes it for all).
uint64_t warp_op(int op, unsigned mask, uint64_t bits, int arg, int width, void* operands, const char* file,
                 int line) {
  Fiber* f = g_cur;
  if (!f) {
    violation("%s called outside a kernel (%s:%d)", op_name(op, arg), file, line);
    return 0;
  }
  const bool aligned = op == kMma || op == kLdmatrix;
  if (aligned && g_run->n - f->warp * 32 < 32) {
    violation("%s at %s:%d by %s: needs the whole warp (.sync.aligned), but this warp has only %d threads "
              "(block of %d)",
              op_name(op, arg), file, line, describe_thread(f).c_str(), g_run->n - f->warp * 32, g_run->n);
    abort_fiber();
  }
  if (!(mask >> f->lane & 1u)) {
    violation("%s at %s:%d by %s: the mask 0x%08x does not include the calling lane %d", op_name(op, arg), file,
              line, describe_thread(f).c_str(), mask, f->lane);
    abort_fiber();
  }
  const int warp_threads = std::min(32, g_run->n - f->warp * 32);
  const unsigned exists = warp_threads == 32 ? 0xffffffffu : ((1u << warp_threads) - 1u);
  if (mask & ~exists) {
    violation("%s at %s:%d by %s: the mask 0x%08x names lanes beyond the block's %d threads", op_name(op, arg), file,
              line, describe_thread(f).c_str(), mask, g_run->n);
    abort_fiber();
  }
  if (op >= kShflIdx && op <= kShflXor && (width < 1 || width > 32 || (width & (width - 1)))) {
    violation("%s at %s:%d: width %d is not a power of 2 in [1, 32]", op_name(op, arg), file, line, width);
    abort_fiber();
  }
  if (const unsigned gone = mask & g_run->warps[f->warp].exited) {
    violation("%s at %s:%d with mask 0x%08x by %s: lane %d of the mask has exited", op_name(op, arg), file, line, mask,
              describe_thread(f).c_str(), __builtin_ctz(gone));
    abort_fiber();
  }
  f->state = kAtWarpOp;
  f->op = op;
  f->mask = mask;
  f->val = bits;
  f->arg = arg;
  f->width = width;
  f->operands = operands;
  f->file = file;
  f->line = line;
  clear_runnable(f);
  g_run->warps[f->warp].arrived |= 1u << f->lane;
  try_complete(f);
  if (g_run->aborted) abort_fiber();
  yield();
  if (g_run->aborted) abort_fiber();
  f->operands = nullptr;
  return f->result;
}

}  // namespace

uint64_t warp_collective(int op, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line) {
  return warp_op(op, mask, bits, arg, width, nullptr, file, line);
}

void syncwarp(unsigned mask, const char* file, int line) { warp_collective(kSyncwarp, mask, 0, 0, 32, file, line); }

// ---- the PTX wrappers (ptx_emu.h) ----------------------------------------------------------------
void warp_mma_m16n8k16(int type, float* d, const uint32_t* a, const uint32_t* b, const float* c, const char* file,
                       int line) {
  MmaOperands o{d, a, b, c};
  warp_op(kMma, 0xffffffffu, 0, type, 32, &o, file, line);
}

void warp_ldmatrix(int num, int trans, uint32_t* r, const void* row, const char* file, int line) {
  LdmatrixOperands o{row, r};
  warp_op(kLdmatrix, 0xffffffffu, 0, num | (trans ? 16 : 0), 32, &o, file, line);
}

namespace {
void perform_copy(Fiber* f, const CpCopy& c) {
  f->copying = &c;  // a fault reading the source names this copy
  if (c.fill)
    std::memset(c.dst, 0, static_cast<size_t>(c.bytes));
  else
    std::memcpy(c.dst, c.src, static_cast<size_t>(c.bytes));
  f->copying = nullptr;
}
}  // namespace

// cp.async: checked when issued, then recorded in the thread's open group and performed (the
// source read, the destination written) when a wait completes its group; under the random
// schedule it is performed at once instead (hardware may land it anywhere in between: the late
// landing shows a missing wait, the early one a buffer refilled while others still read it).
void cp_async(void* dst, const void* src, int bytes, int pred, const char* file, int line) {
  Fiber* f = g_cur;
  const char* name = bytes == 16 ? "cp.async.cg.shared.global" : "cp.async.ca.shared.global";
  if (!f) {
    violation("%s called outside a kernel (%s:%d)", name, file, line);
    return;
  }
  const uintptr_t d = reinterpret_cast<uintptr_t>(dst), s = reinterpret_cast<uintptr_t>(src);
  const size_t n = static_cast<size_t>(bytes);
  if (d % n || s % n) {
    violation("%s (%d bytes) at %s:%d by %s: the %s address 0x%" PRIxPTR " is not %d-byte aligned", name, bytes, file,
              line, describe_thread(f).c_str(), d % n ? "shared (destination)" : "global (source)", d % n ? d : s,
              bytes);
    abort_fiber();
  }
  if (!in_shared(d, n)) {
    violation("%s (%d bytes) at %s:%d by %s: the destination 0x%" PRIxPTR " is not in shared memory (%s)", name,
              bytes, file, line, describe_thread(f).c_str(), d, describe_not_shared(d, n).c_str());
    abort_fiber();
  }
  if (pred && in_shared(s, 1)) {
    violation("%s (%d bytes) at %s:%d by %s: the source 0x%" PRIxPTR " is in shared memory (cp.async copies from "
              "global memory)",
              name, bytes, file, line, describe_thread(f).c_str(), s);
    abort_fiber();
  }
  const CpCopy c{static_cast<char*>(dst), static_cast<const char*>(src), bytes, !pred, kOpenGroup, file, line};
  if (g_policy == 2)
    perform_copy(f, c);
  else
    f->copies.push_back(c);
}

void cp_async_commit(const char* file, int line) {
  Fiber* f = g_cur;
  if (!f) {
    violation("cp.async.commit_group called outside a kernel (%s:%d)", file, line);
    return;
  }
  ++f->committed;
  for (auto it = f->copies.rbegin(); it != f->copies.rend() && it->group == kOpenGroup; ++it) it->group = f->committed;
}

void cp_async_wait(int pending, const char* file, int line) {
  Fiber* f = g_cur;
  if (!f) {
    violation("cp.async.wait_group called outside a kernel (%s:%d)", file, line);
    return;
  }
  if (pending < 0) {  // wait_all = commit_group + wait_group 0
    ++f->committed;
    for (const CpCopy& c : f->copies) perform_copy(f, c);
    f->copies.clear();
    return;
  }
  // complete every committed group but the `pending` most recent ones, in issue order
  const uint64_t done = f->committed > static_cast<uint64_t>(pending) ? f->committed - pending : 0;
  size_t keep = 0;
  for (size_t i = 0; i < f->copies.size(); ++i) {
    const CpCopy& c = f->copies[i];
    if (c.group != kOpenGroup && c.group <= done)
      perform_copy(f, c);
    else
      f->copies[keep++] = c;
  }
  f->copies.resize(keep);
}

void* dynamic_smem() {
  if (!g_run) {
    violation("extern __shared__ used outside a kernel");
    return nullptr;
  }
  return g_run->dyn;
}

void static_smem(void* p, size_t bytes, const char* name, const char* file, int line) {
  if (!g_run) return;
  Run& r = *g_run;
  auto it = r.statics.find(p);
  if (it == r.statics.end()) {
    r.static_bytes += bytes;
    r.statics[p] = {bytes, r.epoch};
    if (r.static_bytes > limits().smem_static || r.static_bytes + r.dyn_bytes > r.smem_limit) {
      violation("shared memory of kernel %s: %zu bytes static (after __shared__ %s at %s:%d) + %zu bytes dynamic "
                "exceed the %zu bytes per block of sm_%d (static at most %zu)",
                r.name, r.static_bytes, name, file, line, r.dyn_bytes, r.smem_limit, g_arch, limits().smem_static);
      abort_fiber();
    }
    std::memset(p, 0xff, bytes);
    return;
  }
  if (it->second.second != r.epoch) {  // first thread of this block to reach the declaration
    it->second.second = r.epoch;
    std::memset(p, 0xff, bytes);
  }
}

// ---- launch ------------------------------------------------------------------------------
std::map<const void*, int> g_max_dynamic;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel

cudaError_t launch(const char* name, const void* key, Thunk thunk, void* ctx, dim3 grid, dim3 block, size_t smem,
                   int max_threads, const char* file, int line) {
  ++g_stat_launches;
  ++g_launch_index;
  {
    char b[512];
    snprintf(b, sizeof b, "%s grid=(%u,%u,%u) block=(%u,%u,%u) smem=%zu\n", name, grid.x, grid.y, grid.z, block.x,
             block.y, block.z, smem);
    g_launches += b;
  }
  if (g_cur) {
    violation("kernel %s launched from inside a kernel (%s:%d)", name, file, line);
    abort_fiber();
  }
  const Limits L = limits();
  const long long threads = static_cast<long long>(block.x) * block.y * block.z;
  char why[512] = "";
  cudaError_t err = cudaSuccess;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x == 0 || block.y == 0 || block.z == 0) {
    snprintf(why, sizeof why, "an empty grid or block");
    err = cudaErrorInvalidConfiguration;
  } else if (threads > L.max_threads || block.x > unsigned(L.max_x) || block.y > unsigned(L.max_y) ||
             block.z > unsigned(L.max_z)) {
    snprintf(why, sizeof why, "block (%u,%u,%u) exceeds the device's limits (%d threads, (%d,%d,%d))", block.x, block.y,
             block.z, L.max_threads, L.max_x, L.max_y, L.max_z);
    err = cudaErrorInvalidConfiguration;
  } else if (grid.x > L.grid_x || grid.y > L.grid_y || grid.z > L.grid_z) {
    snprintf(why, sizeof why, "grid (%u,%u,%u) exceeds the device's limits (%u, %u, %u)", grid.x, grid.y, grid.z,
             L.grid_x, L.grid_y, L.grid_z);
    err = cudaErrorInvalidConfiguration;
  } else if (max_threads > 0 && threads > max_threads) {
    snprintf(why, sizeof why, "%lld threads per block, above its __launch_bounds__ of %d", threads, max_threads);
    err = cudaErrorLaunchOutOfResources;
  }
  auto opt = g_max_dynamic.find(key);
  const bool opted_in = opt != g_max_dynamic.end();
  if (err == cudaSuccess) {
    const size_t dyn_allowed = opted_in ? static_cast<size_t>(opt->second) : L.smem_default;
    if (smem > dyn_allowed) {
      snprintf(why, sizeof why,
               "%zu bytes of dynamic shared memory, above the %zu bytes allowed (sm_%d: %zu by default, up to %zu "
               "after cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize))",
               smem, dyn_allowed, g_arch, L.smem_default, L.smem_optin);
      err = cudaErrorInvalidValue;
    }
  }
  if (err != cudaSuccess) {
    g_last_error = err;
    log_line(std::string("launch of ") + name + " at " + file + ":" + std::to_string(line) + " refused: " + why +
             " [sm_" + std::to_string(g_arch) + "]");
    return err;
  }

  Run r;
  r.name = name;
  r.file = file;
  r.line = line;
  r.n = static_cast<int>(threads);
  r.smem_limit = opted_in ? L.smem_optin : L.smem_default;
  r.rng = (g_seed ^ (g_launch_index * 0x9E3779B97F4A7C15ULL)) | 1;
  setup_dynamic(r, smem);
  ensure_fibers(r.n);
  g_run = &r;
  g_thunk = thunk;
  g_ctx = ctx;
  g_grid_dim = grid;
  g_block_dim = block;
  install_handlers();
  char* const dyn_end = g_dyn_map + g_dyn_len - page_size();
  for (unsigned bz = 0; bz < grid.z && !r.aborted; ++bz)
    for (unsigned by = 0; by < grid.y && !r.aborted; ++by)
      for (unsigned bx = 0; bx < grid.x && !r.aborted; ++bx) {
        g_block_idx = dim3(bx, by, bz);
        ++g_stat_blocks;
        g_stat_threads += r.n;
        ++r.epoch;
        std::memset(r.dyn_fill, 0xff, static_cast<size_t>(dyn_end - r.dyn_fill));
        std::memset(r.runnable, 0, sizeof r.runnable);
        for (auto& w : r.warps) w = Warp{};
        r.runnable_count = 0;
        r.at_barrier = 0;
        r.done = 0;
        for (int t = 0; t < r.n; ++t) {
          Fiber& f = g_fibers[t];
          f.linear = t;
          f.warp = t / 32;
          f.lane = t % 32;
          f.tid = uint3{static_cast<unsigned>(t % block.x), static_cast<unsigned>((t / block.x) % block.y),
                        static_cast<unsigned>(t / (block.x * block.y))};
          f.mask = 0;
          f.op = 0;
          f.operands = nullptr;
          f.copies.clear();  // copies a thread never waited for are dropped (never visible)
          f.committed = 0;
          f.copying = nullptr;
          init_fiber(&f);
          set_runnable(&f);
        }
        while (!r.aborted) {
          if (g_timed_out) {
            violation("kernel still running after %.0f s of CPU time", g_time_limit);
            break;
          }
          if (r.runnable_count == 0) {
            if (r.done == r.n) break;
            report_stuck();
            break;
          }
          const int t = pick();
          g_cur = &g_fibers[t];
          emu_switch(&g_sched_sp, g_cur->sp);
          g_cur = nullptr;
        }
        // writes into the slack between the requested dynamic size and the guard page
        if (!r.aborted) {
          for (char* p = r.dyn + smem; p < dyn_end; ++p) {
            if (static_cast<unsigned char>(*p) != 0xff) {
              violation("write at offset %td of the dynamic shared memory (%zu bytes requested at launch): past its "
                        "end, in block (%u,%u,%u)",
                        p - r.dyn, smem, bx, by, bz);
              break;
            }
          }
        }
      }
  restore_handlers();
  g_cur = nullptr;
  g_run = nullptr;
  if (r.aborted) {
    g_last_error = cudaErrorLaunchFailure;
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

}  // namespace emu

// ---------------------------------------------------------------------------------------
// CUDA runtime API (the part launchers use)
// ---------------------------------------------------------------------------------------
extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return emu::g_last_error; }

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    default: return "cuda error (emulated)";
  }
}

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    default: return "cudaError";
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    const emu::Limits L = emu::limits();
    if (value < 0 || static_cast<size_t>(value) > L.smem_optin) {
      emu::log_line("cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize, " + std::to_string(value) +
                    ") above the sm_" + std::to_string(emu::g_arch) + " limit of " + std::to_string(L.smem_optin));
      return emu::g_last_error = cudaErrorInvalidValue;
    }
    emu::g_max_dynamic[func] = value;
  }
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int) {
  const emu::Limits L = emu::limits();
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = L.sms; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = L.max_threads; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = static_cast<int>(L.smem_default); break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(L.smem_optin); break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrComputeCapabilityMajor: *value = emu::g_arch / 10; break;
    case cudaDevAttrComputeCapabilityMinor: *value = emu::g_arch % 10; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, enum cudaMemcpyKind, cudaStream_t) {
  std::memmove(dst, src, n);
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------
// Driver entry points (ctypes)
// ---------------------------------------------------------------------------------------
// Seconds of CPU time a launch may take before the watchdog aborts it.
void emu_set_time_limit(double seconds) { emu::g_time_limit = seconds > 0.001 ? seconds : 0.001; }

void emu_configure(int policy, unsigned long long seed, int arch) {
  emu::g_policy = policy;
  emu::g_seed = seed ? seed : 1;
  emu::g_arch = arch;
  emu::g_max_dynamic.clear();
  emu::g_launch_index = 0;
}

// The violations logged since the last call (empty string when none), then cleared.
const char* emu_take_log(void) {
  static std::string out;
  out = emu::g_log;
  if (emu::g_violations > 50) out += "... (" + std::to_string(emu::g_violations - 50) + " more)\n";
  emu::g_log.clear();
  emu::g_violations = 0;
  emu::g_last_error = cudaSuccess;
  return out.c_str();
}

// The launches since the last call, one per line: "name grid=(x,y,z) block=(x,y,z) smem=bytes".
const char* emu_take_launches(void) {
  static std::string out;
  out = emu::g_launches;
  emu::g_launches.clear();
  return out.c_str();
}

void emu_stats(unsigned long long* out4) {
  out4[0] = emu::g_stat_launches;
  out4[1] = emu::g_stat_blocks;
  out4[2] = emu::g_stat_threads;
  out4[3] = emu::g_stat_switches;
}

// A buffer of `bytes` between two PROT_NONE pages: its end touches the upper guard page
// (at_start == 0) or its start touches the lower one (at_start != 0). Filled with 0xff.
void* emu_alloc(size_t bytes, int at_start, const char* name) {
  const size_t page = emu::page_size();
  const size_t body = emu::round_up(bytes ? bytes : 1, page);
  const size_t len = body + 2 * page;
  void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  char* base = static_cast<char*>(m);
  mprotect(base, page, PROT_NONE);
  mprotect(base + page + body, page, PROT_NONE);
  char* data = at_start ? base + page : base + page + body - bytes;
  std::memset(base + page, 0xff, body);
  emu::g_buffers[data] = emu::Buffer{base, len, data, bytes, name ? name : "?"};
  return data;
}

// Makes a buffer read-only (readonly != 0) or writable again.
int emu_protect(void* data, int readonly) {
  auto it = emu::g_buffers.find(static_cast<char*>(data));
  if (it == emu::g_buffers.end()) return -1;
  const size_t page = emu::page_size();
  const emu::Buffer& B = it->second;
  return mprotect(B.base + page, B.len - 2 * page, readonly ? PROT_READ : PROT_READ | PROT_WRITE);
}

void emu_free(void* data) {
  auto it = emu::g_buffers.find(static_cast<char*>(data));
  if (it == emu::g_buffers.end()) return;
  munmap(it->second.base, it->second.len);
  emu::g_buffers.erase(it);
}

}  // extern "C"
