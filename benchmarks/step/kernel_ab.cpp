// Two revisions of the CPU kernel (csrc/csgd_cpu_kernel_impl.h) on the same memory: built and run by
// kernel_ab.py, which writes impl_a.h and impl_b.h (the two revisions) and a workload file, and compiles this
// file against csrc/ (both revisions must share csgd_math.h and csgd_cpu_kernel.h with it).
//
//   kernel_ab WORKLOAD ROUNDS [by-cols]
//
// The workload file, int64 little-endian: the tensor count, then per tensor rows, cols, clusters and, when
// clusters > 0, its layout ([offsets | perm], as csgd_ext's native_layout gives it: not checked here). Each round
// steps every tensor once with revision A, once with revision B and once as plain SGD (B's unclustered path:
// "flat"), in a rotating order, through the glue's own tiles (csgd_cpu_tiles.h), on one thread, fp32, momentum
// 0.9, Nesterov, weight decay 1e-4, centripetal 3e-3, on the same w, g and b: physical placement, which moves
// whole-step times by tens of percent between processes on a shared VM, is the same for all three. The arrays are
// allocated as a training process allocates them: every tensor's w and g, then every momentum buffer (each
// tensor's three arrays back to back made plain SGD 20 % to 30 % slower here, and every ratio larger). Prints one
// JSON line: median ms per step of a, b and flat, and with by-cols the seconds per step of each, per row length.
#include "csgd_cpu_kernel.h"
#include "csgd_cpu_tiles.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <vector>

#if defined(__x86_64__)
#pragma GCC push_options
// the target of csrc/csgd_cpu_avx2.cpp (tests/test_benchmarks_smoke.py checks that the two agree)
#pragma GCC target("avx2,fma,prefer-vector-width=256")
#define CSGD_CPU_FMA 1
#else
#define CSGD_CPU_FMA 0
#endif
#define CSGD_CPU_NS ab_a
#include "impl_a.h"
#undef CSGD_CPU_NS
#define CSGD_CPU_NS ab_b
#include "impl_b.h"
#undef CSGD_CPU_NS
#if defined(__x86_64__)
#pragma GCC pop_options
#endif

namespace {

using csgd_ext::cpu::Dtype;
using csgd_ext::cpu::Job;
using csgd_ext::cpu::Tensor;
using csgd_ext::cpu::Tile;
using csgd_ext::cpu::TileFn;

struct Geo {
  int64_t rows, cols, clusters;
};

int64_t read_i64(FILE* f) {
  int64_t v = 0;
  if (std::fread(&v, sizeof(v), 1, f) != 1) {
    std::fprintf(stderr, "kernel_ab: workload file ends early\n");
    std::exit(2);
  }
  return v;
}

float* filled(int64_t n, float scale, int64_t mult) {
  float* p = static_cast<float*>(std::aligned_alloc(64, ((n * 4 + 63) / 64) * 64));
  for (int64_t j = 0; j < n; ++j) p[j] = scale * (static_cast<float>((j * mult) % 1000) / 1000.0f - 0.5f);
  return p;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: kernel_ab WORKLOAD ROUNDS [by-cols]\n");
    return 2;
  }
  FILE* f = std::fopen(argv[1], "rb");
  if (f == nullptr) {
    std::fprintf(stderr, "kernel_ab: cannot open %s\n", argv[1]);
    return 2;
  }
  const int rounds = std::max(1, std::atoi(argv[2]));
  const bool by_cols = argc > 3 && std::strcmp(argv[3], "by-cols") == 0;
  const int64_t n = read_i64(f);
  std::vector<Geo> geoms(n), flat(n);
  std::vector<std::vector<int64_t>> lays(n), orders(n);
  for (int64_t i = 0; i < n; ++i) {
    Geo& g = geoms[i];
    g.rows = read_i64(f);
    g.cols = read_i64(f);
    g.clusters = read_i64(f);
    flat[i] = {g.rows, g.cols, 0};
    if (g.clusters > 0) {
      lays[i].resize(g.clusters + 1 + g.rows);
      for (auto& v : lays[i]) v = read_i64(f);
      if (g.clusters < g.rows && g.cols > 1) {
        orders[i] = csgd_ext::cpu::first_row_order(lays[i].data(), g.rows, g.clusters);
      }
    }
  }
  std::fclose(f);
  std::vector<float*> w(n), gr(n), b(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = geoms[i].rows * geoms[i].cols;
    w[i] = filled(e, 0.05f, 7919);
    gr[i] = filled(e, 0.01f, 104729);
  }
  for (int64_t i = 0; i < n; ++i) b[i] = filled(geoms[i].rows * geoms[i].cols, 0.001f, 31);
  std::vector<Tensor> tc(n), tf(n);
  for (int64_t i = 0; i < n; ++i) {
    const Geo& g = geoms[i];
    tc[i] = Tensor{w[i], gr[i], b[i], g.clusters ? lays[i].data() : nullptr,
                   orders[i].empty() ? nullptr : orders[i].data(), g.rows, g.cols, g.clusters};
    tf[i] = Tensor{w[i], gr[i], b[i], nullptr, nullptr, g.rows, g.cols, 0};
  }
  const std::vector<Tile> tiles = csgd_ext::cpu::cut_tiles(geoms), ftiles = csgd_ext::cpu::cut_tiles(flat);
  const Job jc{tc.data(), Dtype::f32, 1e-3, 1e-4, 0.9, 0.0, 3e-3, true, false, false};
  const Job jf{tf.data(), Dtype::f32, 1e-3, 1e-4, 0.9, 0.0, 3e-3, true, false, false};
  namespace k = csgd_ext::cpu;
  const TileFn fns[3] = {k::ab_a::pick(jc), k::ab_b::pick(jc), k::ab_b::pick(jf)};
  const Job* jobs[3] = {&jc, &jc, &jf};
  const std::vector<Tile>* tl[3] = {&tiles, &tiles, &ftiles};
  std::vector<double> per[3];  // seconds per tensor, summed over the rounds
  for (auto& p : per) p.assign(n, 0.0);
  auto step = [&](int k, bool record) {
    using clock = std::chrono::steady_clock;
    const auto t0 = clock::now();
    auto tp = t0;
    const std::vector<Tile>& ts = *tl[k];
    for (size_t i = 0; i < ts.size();) {
      const int32_t t = ts[i].t;
      while (i < ts.size() && ts[i].t == t) fns[k](*jobs[k], ts[i++]);
      if (by_cols) {
        const auto tn = clock::now();
        if (record) per[k][t] += std::chrono::duration<double>(tn - tp).count();
        tp = tn;
      }
    }
    return std::chrono::duration<double>(clock::now() - t0).count();
  };
  for (int k = 0; k < 3; ++k) step(k, false);  // warm-up
  std::vector<double> s[3];
  for (int r = 0; r < rounds; ++r) {
    for (int q = 0; q < 3; ++q) {
      const int k = (r + q) % 3;
      s[k].push_back(step(k, true));
    }
  }
  std::printf("{\"a_ms\": %.4f, \"b_ms\": %.4f, \"flat_ms\": %.4f", median(s[0]) * 1e3, median(s[1]) * 1e3,
              median(s[2]) * 1e3);
  if (by_cols) {
    std::map<int64_t, std::array<double, 3>> by;
    for (int64_t i = 0; i < n; ++i) {
      auto& a = by[geoms[i].cols];
      for (int k = 0; k < 3; ++k) a[k] += per[k][i] / rounds;
    }
    std::printf(", \"by_cols\": {");
    bool first = true;
    for (const auto& [c, a] : by) {
      std::printf("%s\"%ld\": [%.6g, %.6g, %.6g]", first ? "" : ", ", static_cast<long>(c), a[0], a[1], a[2]);
      first = false;
    }
    std::printf("}");
  }
  std::printf("}\n");
  return 0;
}
