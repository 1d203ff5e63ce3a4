// cuda_emu.h: run the nemoh CUDA kernels (backends/cupy_kernels/*.cu) on the CPU, unchanged.
//
// Compiled with g++ as `-include cuda_emu.h` in front of a .cu file (backends/cuda_emu.py builds
// the translation unit and a C launcher per entry point). It provides what the kernels use from
// CUDA: the qualifiers, threadIdx/blockIdx/blockDim/gridDim, __syncthreads, warp shuffles, __ldg,
// a few atomics, uint4 & co, __nv_bfloat16 (round to nearest even) and the math functions.
//
// Execution model: blocks run one after another; the threads of a block are cooperative fibers on
// one OS thread, each with its own stack. A fiber runs until it reaches __syncthreads, a shuffle,
// or returns; when every fiber is parked the scheduler releases what can proceed: a warp whose 32
// lanes all reached a shuffle (values are exchanged, then the lanes resume), or the block when all
// its threads reached the barrier. Anything else (a barrier some threads exited before reaching,
// a shuffle part of a warp never reaches) can never complete on a GPU either: it is reported as an
// error naming the kernel, block and barrier (file:line) instead of hanging; so are threads that
// wait at different barriers (divergent __syncthreads: undefined behaviour on a GPU). `order` runs
// the fibers (and the blocks) in ascending or descending order between synchronisation points, so
// that a race or a missing __syncthreads shows up as a difference between the two schedules
// (compared by the Python side).
//
// Shared memory: `__shared__` is `static` (one copy for the block; blocks run one at a time, and
// fibers share one OS thread, so this is exactly CUDA's visibility at barriers). cuda_emu.py also
// rewrites each `__shared__` declaration to register the variable, so that it is filled with a
// schedule-dependent poison pattern at every block start (reads of never-written shared memory then
// differ between the two schedules), and `extern __shared__ T name[];` to the per-launch dynamic
// buffer. Launches are serialised by the Python side: the runtime below is not reentrant.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <type_traits>

// fibers switch with a few instructions of x86-64 assembly, or with ucontext elsewhere (or when
// EMU_USE_UCONTEXT is defined: tests/test_cupy_emulated.py checks that path too)
#if defined(__x86_64__) && !defined(EMU_USE_UCONTEXT)
#define EMU_ASM_SWITCH 1
#else
#define EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

// ---------------------------------------------------------------------------------------------
// Qualifiers
// ---------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static
#define __constant__ static
// __restrict__ is a g++ keyword already.

// ---------------------------------------------------------------------------------------------
// Vector types (the 16-byte ones are 16-byte aligned, as on the device)
// ---------------------------------------------------------------------------------------------
struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x, y, z; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(8) int2 { int x, y; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };

// ---------------------------------------------------------------------------------------------
// bfloat16 (cuda_bf16.h): storage type and the conversions the kernels call
// ---------------------------------------------------------------------------------------------
struct alignas(2) __nv_bfloat16 { unsigned short __x; };
typedef __nv_bfloat16 nv_bfloat16;

inline float __bfloat162float(__nv_bfloat16 h) {
    const uint32_t u = (uint32_t)h.__x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
// round to nearest, ties to even; NaN -> the canonical 0x7fff as cuda_bf16.h does
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    __nv_bfloat16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.__x = 0x7fff;
        return r;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    r.__x = (unsigned short)(u >> 16);
    return r;
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

// ---------------------------------------------------------------------------------------------
// Math (host libm; CUDA's fast intrinsics map to the accurate functions)
// ---------------------------------------------------------------------------------------------
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return fminf(fmaxf(x, 0.f), 1.f); }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
inline double __longlong_as_double(long long i) { double d; memcpy(&d, &i, 8); return d; }
inline long long __double_as_longlong(double d) { long long i; memcpy(&i, &d, 8); return i; }
// CUDA's integer min/max overloads (the device has them in the global namespace)
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

// ---------------------------------------------------------------------------------------------
// The runtime: fibers, scheduler, barriers, shuffles
// ---------------------------------------------------------------------------------------------
namespace emu {

enum State { READY, AT_BARRIER, AT_SHUFFLE, DONE };

struct Fiber {
    void* sp;          // saved stack pointer (x86-64) while parked
#if !EMU_ASM_SWITCH
    ucontext_t uc;
#endif
    uint3 tid;
    int state;
    unsigned mask;     // shuffle: the lanes the thread named
    int src;           // shuffle: the lane it reads
    uint64_t val, res; // shuffle: its value, the value it receives
    const char* file;  // barrier: where the thread waits
    int line;
};

static const int MAX_THREADS = 1024;
static const size_t STACK_BYTES = 128 << 10;  // per fiber; the kernels need a few KiB
static const size_t DYN_SMEM_MAX = 227 << 10; // dynamic shared memory (H100: 227 KiB per block)

static Fiber g_fib[MAX_THREADS];
static int g_n = 0, g_cur = 0;
static char* g_stacks = nullptr;
static void (*g_body)(void*) = nullptr;
static void* g_ctx = nullptr;
static const char* g_kernel = "";
static uint3 g_threadIdx, g_blockIdx;
static dim3 g_blockDim, g_gridDim;
static char g_err[2048];
static bool g_fault = false;
static unsigned char g_poison = 0xff;
static size_t g_smem = 0;  // dynamic shared bytes of this launch
alignas(256) static unsigned char g_dyn_smem[DYN_SMEM_MAX];

// registered static __shared__ variables, poisoned at every block start
struct Range { void* p; size_t n; };
static Range g_shared[256];
static int g_nshared = 0;

inline void shared_register(void* p, size_t n) {
    for (int i = 0; i < g_nshared; ++i)
        if (g_shared[i].p == p) return;
    if (g_nshared < 256) {
        g_shared[g_nshared++] = Range{p, n};
        memset(p, g_poison, n);  // first sight: before any thread of this block used it
    }
}

// Report a fault from inside a kernel (the block finishes; the launch then fails with this).
inline void fault(const char* what) {
    if (!g_fault) {
        snprintf(g_err, sizeof g_err, "kernel %s, block (%u,%u,%u), thread (%u,%u,%u): %s", g_kernel, g_blockIdx.x,
                 g_blockIdx.y, g_blockIdx.z, g_threadIdx.x, g_threadIdx.y, g_threadIdx.z, what);
        g_fault = true;
    }
}

#if EMU_ASM_SWITCH
// switch stacks: save the callee-saved registers on the current stack, store its pointer in *save,
// load `next` and pop the registers saved there. ~10 ns (swapcontext makes a syscall per switch).
extern "C" void nemoh_emu_switch(void** save, void* next);
asm(R"(
    .text
    .p2align 4
    .globl nemoh_emu_switch
    .hidden nemoh_emu_switch
    .type nemoh_emu_switch, @function
nemoh_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size nemoh_emu_switch, .-nemoh_emu_switch
)");
static void* g_sched_sp = nullptr;
#else
static ucontext_t g_sched_uc;
#endif

static int g_order = 0;  // this launch's schedule: threads ascending (0) or descending (1) between barriers

// Park the running fiber and run the next READY one of this pass directly (the one the scheduler would
// resume next, so the order is the same), or return to the scheduler after the last: one stack switch
// per thread per barrier or shuffle instead of two.
inline void to_scheduler(int state) {
    Fiber& f = g_fib[g_cur];
    f.state = state;
    int next = -1;
    if (g_order == 0) {
        for (int i = g_cur + 1; i < g_n; ++i)
            if (g_fib[i].state == READY) { next = i; break; }
    } else {
        for (int i = g_cur - 1; i >= 0; --i)
            if (g_fib[i].state == READY) { next = i; break; }
    }
    if (next >= 0) {
        g_cur = next;
        g_threadIdx = g_fib[next].tid;
    }
#if EMU_ASM_SWITCH
    nemoh_emu_switch(&f.sp, next >= 0 ? g_fib[next].sp : g_sched_sp);
#else
    swapcontext(&f.uc, next >= 0 ? &g_fib[next].uc : &g_sched_uc);
#endif
}

static void fiber_main() {
    g_body(g_ctx);
    to_scheduler(DONE);
    __builtin_unreachable();
}

inline char* stack_of(int i) { return g_stacks + (size_t)i * STACK_BYTES; }

static bool init_stacks() {
    if (g_stacks) return true;
    void* p = mmap(nullptr, STACK_BYTES * MAX_THREADS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) return false;
    g_stacks = (char*)p;
    for (int i = 0; i < MAX_THREADS; ++i) mprotect(stack_of(i), 4096, PROT_NONE);  // overflow faults, not corrupts
    return true;
}

static void start_fiber(int i) {
    Fiber& f = g_fib[i];
#if EMU_ASM_SWITCH
    // a frame that nemoh_emu_switch "returns" into fiber_main from, 16-byte aligned as after a call
    void** sp = (void**)(((uintptr_t)(stack_of(i) + STACK_BYTES)) & ~(uintptr_t)15);
    *--sp = nullptr;                 // fiber_main's return address: it never returns
    *--sp = (void*)&fiber_main;      // where `ret` goes
    for (int r = 0; r < 6; ++r) *--sp = nullptr;  // rbp rbx r12-r15
    f.sp = sp;
#else
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = stack_of(i) + 4096;
    f.uc.uc_stack.ss_size = STACK_BYTES - 4096;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, fiber_main, 0);
#endif
    f.state = READY;
}

static void resume(int i) {
    g_cur = i;
    g_threadIdx = g_fib[i].tid;
#if EMU_ASM_SWITCH
    nemoh_emu_switch(&g_sched_sp, g_fib[i].sp);
#else
    swapcontext(&g_sched_uc, &g_fib[i].uc);
#endif
}

// "a, b, c-d, ... (N)" for the thread ids in `ids`
static void list_ids(char* out, size_t cap, const int* ids, int n) {
    size_t k = 0;
    out[0] = 0;
    for (int i = 0; i < n && k + 24 < cap; ++i) {
        int j = i;
        while (j + 1 < n && ids[j + 1] == ids[j] + 1) ++j;
        k += snprintf(out + k, cap - k, i == j ? "%s%d" : "%s%d-%d", i ? ", " : "", ids[i], ids[j]);
        i = j;
    }
}

// Release every warp whose lanes all wait at a shuffle; false with g_err set on a stuck warp.
static bool release_shuffles(bool* progress) {
    static int ids[MAX_THREADS];
    for (int w0 = 0; w0 < g_n; w0 += 32) {
        const int nl = g_n - w0 < 32 ? g_n - w0 : 32;
        int waiting = 0;
        for (int l = 0; l < nl; ++l) waiting += g_fib[w0 + l].state == AT_SHUFFLE;
        if (waiting == 0) continue;
        if (waiting < nl) {
            int n = 0;
            for (int l = 0; l < nl; ++l)
                if (g_fib[w0 + l].state != AT_SHUFFLE) ids[n++] = w0 + l;
            char who[512];
            list_ids(who, sizeof who, ids, n);
            snprintf(g_err, sizeof g_err,
                     "kernel %s, block (%u,%u,%u): a warp shuffle in warp %d is never reached by threads %s "
                     "(they exited or wait at __syncthreads): the shuffle would hang or read garbage on a GPU",
                     g_kernel, g_blockIdx.x, g_blockIdx.y, g_blockIdx.z, w0 / 32, who);
            return false;
        }
        const unsigned full = nl == 32 ? 0xffffffffu : ((1u << nl) - 1u);
        for (int l = 0; l < nl; ++l) {
            Fiber& f = g_fib[w0 + l];
            if (f.mask != full || f.src < 0 || f.src >= nl) {
                snprintf(g_err, sizeof g_err,
                         "kernel %s, block (%u,%u,%u), thread %d: shuffle with mask 0x%08x reading lane %d; the "
                         "emulator supports full-warp shuffles only (mask 0x%08x)",
                         g_kernel, g_blockIdx.x, g_blockIdx.y, g_blockIdx.z, w0 + l, f.mask, f.src, full);
                return false;
            }
        }
        for (int l = 0; l < nl; ++l) g_fib[w0 + l].res = g_fib[w0 + g_fib[w0 + l].src].val;
        for (int l = 0; l < nl; ++l) g_fib[w0 + l].state = READY;
        *progress = true;
    }
    return true;
}

static bool run_block(int order) {
    for (int i = 0; i < g_n; ++i) start_fiber(i);
    for (int i = 0; i < g_nshared; ++i) memset(g_shared[i].p, g_poison, g_shared[i].n);
    memset(g_dyn_smem, g_poison, g_smem);
    for (;;) {
        for (int k = 0; k < g_n; ++k) {
            const int i = order ? g_n - 1 - k : k;
            if (g_fib[i].state == READY) resume(i);
        }
        // every fiber is parked or done now
        bool progress = false;
        if (!release_shuffles(&progress)) return false;
        if (progress) continue;
        int at_bar = 0, done = 0;
        for (int i = 0; i < g_n; ++i) {
            at_bar += g_fib[i].state == AT_BARRIER;
            done += g_fib[i].state == DONE;
        }
        if (done == g_n) return true;
        static int ids[MAX_THREADS];
        int n = 0;
        if (at_bar == g_n) {
            // every thread waits; all at the same __syncthreads? (different ones: divergent barriers)
            const Fiber& f0 = g_fib[0];
            for (int i = 0; i < g_n; ++i)
                if (g_fib[i].line != f0.line || strcmp(g_fib[i].file, f0.file) != 0) ids[n++] = i;
            if (n == 0) {
                for (int i = 0; i < g_n; ++i) g_fib[i].state = READY;
                continue;
            }
            char who[512];
            list_ids(who, sizeof who, ids, n);
            snprintf(g_err, sizeof g_err,
                     "kernel %s, block (%u,%u,%u): threads wait at different __syncthreads(): thread 0 at %s:%d, "
                     "threads %s at %s:%d (a barrier in divergent code: undefined behaviour on a GPU)",
                     g_kernel, g_blockIdx.x, g_blockIdx.y, g_blockIdx.z, f0.file, f0.line, who, g_fib[ids[0]].file,
                     g_fib[ids[0]].line);
            return false;
        }
        const Fiber* waiting = nullptr;
        for (int i = 0; i < g_n; ++i) {
            if (g_fib[i].state == DONE) ids[n++] = i;
            else if (!waiting && g_fib[i].state == AT_BARRIER) waiting = &g_fib[i];
        }
        char who[512];
        list_ids(who, sizeof who, ids, n);
        snprintf(g_err, sizeof g_err,
                 "kernel %s, block (%u,%u,%u): __syncthreads() at %s:%d reached by %d of %d threads; threads %s "
                 "exited without reaching it (a barrier inside a branch or after an early return that not every "
                 "thread takes: a hang or undefined behaviour on a GPU)",
                 g_kernel, g_blockIdx.x, g_blockIdx.y, g_blockIdx.z, waiting ? waiting->file : "?",
                 waiting ? waiting->line : 0, at_bar, g_n, who);
        return false;
    }
}

// Run `body(ctx)` (one call = one CUDA thread) over the grid. 0 on success; else g_err says why.
static int launch(const char* kernel, const unsigned* grid, const unsigned* block, unsigned long long smem, int order,
                  void (*body)(void*), void* ctx) {
    g_kernel = kernel;
    g_fault = false;
    g_err[0] = 0;
    const unsigned long long n = (unsigned long long)block[0] * block[1] * block[2];
    if (n == 0 || n > MAX_THREADS || grid[0] == 0 || grid[1] == 0 || grid[2] == 0) {
        snprintf(g_err, sizeof g_err, "kernel %s: invalid launch grid (%u,%u,%u) block (%u,%u,%u)", kernel, grid[0],
                 grid[1], grid[2], block[0], block[1], block[2]);
        return 1;
    }
    if (smem > DYN_SMEM_MAX) {
        snprintf(g_err, sizeof g_err, "kernel %s: %llu bytes of dynamic shared memory, more than the %zu a block has",
                 kernel, smem, DYN_SMEM_MAX);
        return 1;
    }
    if (!init_stacks()) {
        snprintf(g_err, sizeof g_err, "kernel %s: cannot map the fiber stacks", kernel);
        return 1;
    }
    g_poison = order ? 0x7f : 0xff;  // NaN / -1 in one schedule, a huge finite value in the other
    g_order = order;
    g_smem = (size_t)smem;
    g_n = (int)n;
    g_body = body;
    g_ctx = ctx;
    g_blockDim = dim3{block[0], block[1], block[2]};
    g_gridDim = dim3{grid[0], grid[1], grid[2]};
    for (int i = 0; i < g_n; ++i)
        g_fib[i].tid = uint3{i % block[0], (i / block[0]) % block[1], i / (block[0] * block[1])};
    const unsigned long long nb = (unsigned long long)grid[0] * grid[1] * grid[2];
    for (unsigned long long k = 0; k < nb; ++k) {
        const unsigned long long b = order ? nb - 1 - k : k;
        g_blockIdx = uint3{(unsigned)(b % grid[0]), (unsigned)((b / grid[0]) % grid[1]),
                           (unsigned)(b / ((unsigned long long)grid[0] * grid[1]))};
        if (!run_block(order)) return 1;
        if (g_fault) return 1;
    }
    return 0;
}

inline void syncthreads(const char* file, int line) {
    g_fib[g_cur].file = file;
    g_fib[g_cur].line = line;
    to_scheduler(AT_BARRIER);
}

template <typename V>
inline V shuffle(unsigned mask, V v, int src) {
    static_assert(sizeof(V) <= 8, "shuffle of a value wider than 8 bytes");
    Fiber& f = g_fib[g_cur];
    f.mask = mask;
    f.src = src;
    f.val = 0;
    memcpy(&f.val, &v, sizeof(V));
    to_scheduler(AT_SHUFFLE);
    V r;
    memcpy(&r, &g_fib[g_cur].res, sizeof(V));
    return r;
}

inline int lane() { return g_cur & 31; }

// Exact-type kernel arguments: the generated launchers pass Arg<declared type>, which converts only
// to exactly that parameter type, so a Python signature table that disagrees with the kernel's
// parameter list is a compile error (not a silent int/long long or float*/double* reinterpretation).
template <typename V>
struct Arg {
    V v;
    template <typename U, typename std::enable_if<std::is_same<U, V>::value, int>::type = 0>
    operator U() const { return v; }
};
template <typename V>
inline Arg<V> arg(void* slot) { return Arg<V>{*static_cast<V*>(slot)}; }

}  // namespace emu

#define threadIdx (::emu::g_threadIdx)
#define blockIdx (::emu::g_blockIdx)
#define blockDim (::emu::g_blockDim)
#define gridDim (::emu::g_gridDim)
#define warpSize 32
#define EMU_SHARED(v) ::emu::shared_register((void*)&(v), sizeof(v))
#define EMU_DYNAMIC_SHARED ((void*)::emu::g_dyn_smem)

// a macro, so that the scheduler knows which barrier each thread waits at
#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
inline void __syncwarp(unsigned mask = 0xffffffffu) { (void)::emu::shuffle<int>(mask, 0, ::emu::lane()); }
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename V>
inline V __shfl_sync(unsigned mask, V v, int src, int width = 32) {
    const int l = ::emu::lane();
    return ::emu::shuffle<V>(mask, v, (l & ~(width - 1)) + (src & (width - 1)));
}
template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = 32) {
    const int l = ::emu::lane(), s = l ^ lane_mask;
    return ::emu::shuffle<V>(mask, v, (s & ~(width - 1)) == (l & ~(width - 1)) ? s : l);
}
template <typename V>
inline V __shfl_down_sync(unsigned mask, V v, unsigned delta, int width = 32) {
    const int l = ::emu::lane();
    return ::emu::shuffle<V>(mask, v, (l & (width - 1)) + (int)delta < width ? l + (int)delta : l);
}
template <typename V>
inline V __shfl_up_sync(unsigned mask, V v, unsigned delta, int width = 32) {
    const int l = ::emu::lane();
    return ::emu::shuffle<V>(mask, v, (l & (width - 1)) >= (int)delta ? l - (int)delta : l);
}

// read-only cached load: the device faults on a misaligned vector load, so check the alignment
template <typename V>
inline V __ldg(const V* p) {
    if (((uintptr_t)p) % alignof(V) != 0) {
        char m[160];
        snprintf(m, sizeof m, "misaligned __ldg of %zu bytes at %p (needs %zu-byte alignment)", sizeof(V),
                 (const void*)p, alignof(V));
        ::emu::fault(m);
        return V{};
    }
    return *p;
}

// Atomics: fibers switch only at barriers and shuffles, so a plain read-modify-write is atomic here.
template <typename V> inline V atomicAdd(V* p, V v) { const V o = *p; *p = o + v; return o; }
template <typename V> inline V atomicSub(V* p, V v) { const V o = *p; *p = o - v; return o; }
template <typename V> inline V atomicExch(V* p, V v) { const V o = *p; *p = v; return o; }
template <typename V> inline V atomicMax(V* p, V v) { const V o = *p; *p = o > v ? o : v; return o; }
template <typename V> inline V atomicMin(V* p, V v) { const V o = *p; *p = o < v ? o : v; return o; }
template <typename V> inline V atomicCAS(V* p, V cmp, V v) { const V o = *p; if (o == cmp) *p = v; return o; }
