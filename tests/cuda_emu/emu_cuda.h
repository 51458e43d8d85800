// A CPU emulation of the CUDA features csrc/cuda/dice_kernels.cuh uses, so that the very kernels
// nvcc compiles run (slowly) on a machine without a GPU.
//
// Each block runs as 256 cooperative fibers (ucontext) on one OS thread; blocks run one after the
// other, so __shared__ variables become function-local statics.  The emulation is strict where a
// GPU would be undefined or merely slow:
//   * __syncthreads / __shfl_xor_sync must be reached by every thread of the block / warp (a
//     thread that exits or waits elsewhere is a deadlock, reported), from the same source line;
//   * shuffles must name the full warp;
//   * every global load (__ldg, including 128-bit ones) and store (stg) must fall inside a buffer
//     registered with emu::Memory and be aligned to its width; the accesses are counted per buffer
//     and width (which path the kernels took: vector or scalar).
// Fibers switch only at barriers and shuffles, so a missing barrier shows as stale shared memory.
#pragma once

// Fibers start with makecontext/setcontext and then switch with _setjmp/_longjmp, which (unlike
// swapcontext) make no system call; glibc's fortified longjmp would reject the stack change.
#undef _FORTIFY_SOURCE
#include <setjmp.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};

namespace emu {

constexpr int kThreads = 256;

struct Range {
  uintptr_t begin, end;
  std::string name;
  uint64_t loads[17] = {}, stores[17] = {};  // accesses by width in bytes (1, 2, 4, 8, 16)
};

/// Buffers the kernels may touch, and how wide the accesses to each were.
struct Memory {
  std::vector<Range> ranges;
  void add(const void* p, size_t bytes, const std::string& name) {
    if (bytes) {
      Range r;
      r.begin = reinterpret_cast<uintptr_t>(p);
      r.end = r.begin + bytes;
      r.name = name;
      ranges.push_back(r);
    }
  }
  void check(const void* p, size_t bytes, const char* what) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (a % bytes != 0) {
      throw std::runtime_error(std::string("emu: misaligned ") + what + " of " + std::to_string(bytes) + " bytes");
    }
    for (auto& r : ranges) {
      if (a >= r.begin && a + bytes <= r.end) {
        (what[0] == 's' ? r.stores : r.loads)[bytes <= 16 ? bytes : 0] += 1;
        return;
      }
    }
    throw std::runtime_error(std::string("emu: out-of-bounds ") + what + " of " + std::to_string(bytes) + " bytes");
  }
};

struct Fiber {
  ucontext_t ctx;
  jmp_buf jb;
  bool started = false;
  bool done = false;
  dim3 tid;
};

struct Block {
  std::vector<Fiber> fibers;
  jmp_buf sched;
  int cur = 0;
  dim3 block_idx, grid_dim, block_dim{kThreads};
  std::function<void()> body;
  uint64_t events = 0;  // progress: barrier releases and finished fibers
  // block barrier
  int bar_count = 0;
  uint64_t bar_gen = 0;
  int bar_line = -1;
  // warp barriers and shuffle slots
  int w_count[kThreads / 32] = {};
  uint64_t w_gen[kThreads / 32] = {};
  int w_line[kThreads / 32];
  uint64_t w_slot[kThreads / 32][32];
  std::string error;
};

inline Block*& current() {
  static Block* b = nullptr;
  return b;
}
inline Memory& memory() {
  static Memory m;
  return m;
}

inline void yield() {
  Block* b = current();
  if (!_setjmp(b->fibers[b->cur].jb)) _longjmp(b->sched, 1);
  if (!b->error.empty()) throw std::runtime_error(b->error);
}

inline void fail(const std::string& msg) {
  Block* b = current();
  if (b->error.empty()) b->error = msg;
  throw std::runtime_error(msg);
}

inline void syncthreads(int line) {
  Block* b = current();
  if (b->bar_count == 0) {
    b->bar_line = line;
  } else if (b->bar_line != line) {
    fail("emu: __syncthreads reached from different lines (" + std::to_string(b->bar_line) + ", " +
         std::to_string(line) + ")");
  }
  const uint64_t gen = b->bar_gen;
  if (++b->bar_count == kThreads) {
    b->bar_count = 0;
    ++b->bar_gen;
    ++b->events;
    return;
  }
  while (b->bar_gen == gen) yield();
}

inline void syncwarp(int w, int line) {
  Block* b = current();
  if (b->w_count[w] == 0) {
    b->w_line[w] = line;
  } else if (b->w_line[w] != line) {
    fail("emu: shuffle reached from different lines (" + std::to_string(b->w_line[w]) + ", " + std::to_string(line) +
         ")");
  }
  const uint64_t gen = b->w_gen[w];
  if (++b->w_count[w] == 32) {
    b->w_count[w] = 0;
    ++b->w_gen[w];
    ++b->events;
    return;
  }
  while (b->w_gen[w] == gen) yield();
}

template <typename T>
T shfl_xor(unsigned mask, T v, int off, int line) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  if (mask != 0xffffffffu) fail("emu: shuffle with a partial mask");
  if (off <= 0 || off >= 32) fail("emu: shuffle offset out of range");
  Block* b = current();
  const int t = static_cast<int>(b->fibers[b->cur].tid.x), w = t / 32, l = t % 32;
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  b->w_slot[w][l] = bits;
  syncwarp(w, line);
  T r;
  const uint64_t other = b->w_slot[w][l ^ off];
  memcpy(&r, &other, sizeof(T));
  syncwarp(w, line);
  return r;
}

inline void trampoline() {
  Block* b = current();
  try {
    b->body();
  } catch (const std::exception& e) {
    if (b->error.empty()) b->error = e.what();
  }
  b->fibers[b->cur].done = true;
  ++b->events;
  _longjmp(b->sched, 1);
}

/// Runs `body` as every thread of every block of `grid` (blocks in order).
inline void run_grid(dim3 grid, const std::function<void()>& body) {
  static std::vector<std::vector<char>> stacks;
  constexpr size_t kStack = 512 * 1024;
  if (stacks.empty()) {
    stacks.resize(kThreads);
    for (auto& s : stacks) s.resize(kStack);
  }
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      Block blk;
      blk.block_idx = dim3(bx, by);
      blk.grid_dim = grid;
      blk.body = body;
      blk.fibers.resize(kThreads);
      current() = &blk;
      for (int t = 0; t < kThreads; ++t) {
        Fiber& f = blk.fibers[t];
        f.tid = dim3(t);
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stacks[t].data();
        f.ctx.uc_stack.ss_size = kStack;
        f.ctx.uc_link = nullptr;  // never returns: trampoline jumps back to the scheduler
        makecontext(&f.ctx, trampoline, 0);
      }
      int left = kThreads;
      while (left > 0) {
        const uint64_t before = blk.events;
        for (int t = 0; t < kThreads; ++t) {
          if (blk.fibers[t].done) continue;
          blk.cur = t;
          Fiber& f = blk.fibers[t];
          if (!_setjmp(blk.sched)) {
            if (!f.started) {
              f.started = true;
              setcontext(&f.ctx);
            }
            _longjmp(f.jb, 1);
          }
          if (f.done) --left;
          if (!blk.error.empty()) break;
        }
        if (!blk.error.empty()) break;
        if (left > 0 && blk.events == before) {
          blk.error = "emu: deadlock (a barrier or shuffle that not every thread reaches)";
          break;
        }
      }
      current() = nullptr;
      if (!blk.error.empty()) {
        throw std::runtime_error(blk.error + " [block " + std::to_string(bx) + "," + std::to_string(by) + "]");
      }
    }
  }
}

}  // namespace emu

#define threadIdx (emu::current()->fibers[emu::current()->cur].tid)
#define blockIdx (emu::current()->block_idx)
#define gridDim (emu::current()->grid_dim)
#define blockDim (emu::current()->block_dim)
#define __syncthreads() emu::syncthreads(__LINE__)
#define __shfl_xor_sync(mask, v, off) emu::shfl_xor(mask, v, off, __LINE__)

template <typename T>
inline T __ldg(const T* p) {
  emu::memory().check(p, sizeof(T), "load");
  return *p;
}
inline float __expf(float v) { return std::exp(v); }
inline void emu_check_store(const void* p, size_t bytes) { emu::memory().check(p, bytes, "store"); }
inline void emu_check_load(const void* p, size_t bytes) { emu::memory().check(p, bytes, "load"); }
using std::exp;
using std::fmax;
using std::fmaxf;

#define DICETORCH_CUDA_EMULATION 1
