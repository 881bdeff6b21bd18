// The work table of the CUDA C-SGD kernel: see csgd_worktable.h.
#include "csgd_worktable.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <list>
#include <mutex>
#include <numeric>
#include <sstream>
#include <utility>

namespace csgd_ext {
namespace {

using dev::Cluster;
using dev::Item;
using dev::kThreads;

// Elements per work item: kMaxItemElems, or fewer for a small step, so that there are at least kItemsPerBlock
// items per block of the grid (a block keeps only about 25 KB in flight: one big item per block would leave
// a small step latency-bound), but never under kMinItemElems.
constexpr int64_t kMaxItemElems = 16384;
constexpr int64_t kMinItemElems = 2048;
constexpr int64_t kItemsPerBlock = 4;
constexpr int64_t kRunElems = 4096;    // runs of adjacent singleton rows at least this long go elementwise
constexpr int64_t kPackMaxElems = 4096;  // flat tensors this small share packed items
constexpr size_t kCacheSize = 16;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Elements an item touches (its cost: every element moves the same bytes).
int64_t item_elems(const Item& it, const std::vector<Cluster>& clusters, int64_t cols, int64_t vec) {
  if (it.kind == dev::kElem) return it.a1 - it.a0;
  if (it.kind == dev::kPacked) return it.a1;
  const int64_t ncols = std::min<int64_t>(cols, int64_t(it.v1) * vec) - int64_t(it.v0) * vec;
  int64_t rows = 0;
  for (int64_t c = it.a0; c < it.a1; ++c) rows += clusters[c].size;
  return rows * ncols;
}

// Column blocks of at most kThreads vectors, of equal width: (blocks, vectors per block).
std::pair<int64_t, int64_t> column_blocks(int64_t nvec) {
  const int64_t nb = ceil_div(nvec, kThreads);
  return {nb, ceil_div(nvec, nb)};
}

void add_elem_items(std::vector<Item>& items, int32_t slot, int64_t e0, int64_t e1, int64_t chunk) {
  for (int64_t a = e0; a < e1; a += chunk) {
    items.push_back(Item{dev::kElem, slot, a, std::min(e1, a + chunk), 0, 0});
  }
}

// The clusters of a validated layout as member lists.
std::vector<std::vector<int32_t>> checked_clusters(const int64_t* lay, int64_t k, int64_t rows, int64_t i) {
  validate_layout(lay, k, rows, i);
  const int64_t* off = lay;
  const int64_t* perm = lay + k + 1;
  std::vector<std::vector<int32_t>> out(k);
  for (int64_t c = 0; c < k; ++c) out[c].assign(perm + off[c], perm + off[c + 1]);
  return out;
}

// Items of one clustered tensor (slot) whose layout is `lay`.
void plan_clustered(WorkTable& p, std::vector<Item>& items, int32_t slot, const Geom& geo, const int64_t* lay,
                    int64_t vec, int64_t i, int64_t chunk) {
  std::vector<std::vector<int32_t>> cl = checked_clusters(lay, geo.clusters, geo.rows, i);
  // singleton rows in long runs of adjacent rows go elementwise; the rest are clusters of one
  std::vector<int32_t> single;
  for (const auto& m : cl) {
    if (m.size() == 1) single.push_back(m[0]);
  }
  std::sort(single.begin(), single.end());
  std::vector<std::vector<int32_t>> small, large;
  for (size_t a = 0; a < single.size();) {
    size_t b = a + 1;
    while (b < single.size() && single[b] == single[b - 1] + 1) ++b;
    const int64_t n = static_cast<int64_t>(b - a);
    if (n * geo.cols >= kRunElems) {
      add_elem_items(items, slot, int64_t(single[a]) * geo.cols, int64_t(single[a] + n) * geo.cols, chunk);
    } else {
      for (size_t q = a; q < b; ++q) small.push_back({single[q]});
    }
    a = b;
  }
  for (auto& m : cl) {
    if (m.size() > 1) (m.size() <= size_t(dev::kMaxSmall) ? small : large).push_back(std::move(m));
  }
  // equal sizes next to each other: the threads of a warp then run the same member count
  std::stable_sort(small.begin(), small.end(), [](const auto& x, const auto& y) { return x.size() < y.size(); });
  const int64_t nvec = ceil_div(geo.cols, vec);
  const auto [nb, vb] = column_blocks(nvec);
  auto add_cluster = [&](const std::vector<int32_t>& m) {
    p.clusters.push_back(Cluster{static_cast<int32_t>(p.members.size()), static_cast<int32_t>(m.size())});
    p.members.insert(p.members.end(), m.begin(), m.end());
  };
  if (!small.empty()) {
    int64_t member_rows = 0;
    for (const auto& m : small) member_rows += static_cast<int64_t>(m.size());
    const int64_t cpp = kThreads / std::min<int64_t>(vb, kThreads);  // clusters per pass of the block
    const int64_t per_pass = cpp * std::min(geo.cols, vb * vec) * member_rows / static_cast<int64_t>(small.size());
    const int64_t per_item = cpp * std::max<int64_t>(1, chunk / std::max<int64_t>(1, per_pass));
    const int64_t c_begin = static_cast<int64_t>(p.clusters.size());
    for (const auto& m : small) add_cluster(m);
    const int64_t c_end = static_cast<int64_t>(p.clusters.size());
    for (int64_t c0 = c_begin; c0 < c_end; c0 += per_item) {
      for (int64_t j = 0; j < nb; ++j) {
        items.push_back(Item{dev::kSmall, slot, c0, std::min(c_end, c0 + per_item), static_cast<int32_t>(j * vb),
                             static_cast<int32_t>(std::min(nvec, (j + 1) * vb))});
      }
    }
  }
  for (const auto& m : large) {
    const int64_t c = static_cast<int64_t>(p.clusters.size());
    add_cluster(m);
    for (int64_t j = 0; j < nb; ++j) {
      items.push_back(Item{dev::kLarge, slot, c, c + 1, static_cast<int32_t>(j * vb),
                           static_cast<int32_t>(std::min(nvec, (j + 1) * vb))});
    }
  }
}

}  // namespace

WorkTable build_work_table(const std::vector<int64_t>& idx, const std::vector<Geom>& geoms,
                           const std::vector<const int64_t*>& host_layouts, int64_t elem_size,
                           const GridTarget& target) {
  WorkTable p;
  const int64_t vec = dev::kVecBytes / elem_size;
  std::vector<int64_t> todo;
  for (int64_t i : idx) {
    if (geoms[i].rows * geoms[i].cols > 0) todo.push_back(i);
  }
  for (size_t t0 = 0; t0 < todo.size(); t0 += dev::kMaxSlots) {
    TableLaunch pl;
    std::vector<Item> items;
    std::vector<int64_t> cols;
    const size_t t1 = std::min(todo.size(), t0 + dev::kMaxSlots);
    int64_t total = 0;
    for (size_t t = t0; t < t1; ++t) total += geoms[todo[t]].rows * geoms[todo[t]].cols;
    const int64_t per_block = ceil_div(total, kItemsPerBlock * target.sm_count * target.blocks_per_sm);
    const int64_t chunk = std::clamp(ceil_div(per_block, kMinItemElems) * kMinItemElems, kMinItemElems, kMaxItemElems);
    // small flat tensors (unclustered, or every row its own cluster) take the first slots, consecutively, and
    // go in packed items; the others follow
    std::vector<int64_t> packed, rest;
    for (size_t t = t0; t < t1; ++t) {
      const Geom& geo = geoms[todo[t]];
      const bool flat = geo.clusters == 0 || geo.clusters == geo.rows;
      (flat && geo.rows * geo.cols <= kPackMaxElems ? packed : rest).push_back(todo[t]);
    }
    for (size_t k = 0; k < packed.size();) {
      const int32_t slot0 = static_cast<int32_t>(pl.tensors.size());
      const int64_t a0 = static_cast<int64_t>(p.members.size());
      int64_t n = 0;
      int32_t count = 0;
      for (; k < packed.size() && (count == 0 || n + geoms[packed[k]].rows * geoms[packed[k]].cols <= chunk); ++k) {
        const int64_t i = packed[k];
        const Geom& geo = geoms[i];
        if (geo.clusters > 0) validate_layout(host_layouts[i], geo.clusters, geo.rows, i);
        pl.tensors.push_back(i);
        cols.push_back(geo.cols);
        p.members.push_back(static_cast<int32_t>(geo.rows * geo.cols));
        n += geo.rows * geo.cols;
        ++count;
      }
      items.push_back(Item{dev::kPacked, slot0, a0, n, 0, count});
    }
    for (const int64_t i : rest) {
      const Geom& geo = geoms[i];
      const int32_t slot = static_cast<int32_t>(pl.tensors.size());
      pl.tensors.push_back(i);
      cols.push_back(geo.cols);
      TORCH_CHECK_VALUE(ceil_div(geo.cols, vec) < (int64_t(1) << 31), "csgd_step_: params[", i,
                        "] has rows too long for the CUDA kernel");
      if (geo.clusters == 0 || geo.clusters == geo.rows) {
        // unclustered, or every row its own cluster: plain SGD on the flat range (still validated)
        if (geo.clusters > 0) validate_layout(host_layouts[i], geo.clusters, geo.rows, i);
        add_elem_items(items, slot, 0, geo.rows * geo.cols, chunk);
      } else {
        plan_clustered(p, items, slot, geo, host_layouts[i], vec, i, chunk);
      }
    }
    TORCH_CHECK_VALUE(p.members.size() < (size_t(1) << 31), "csgd_step_: too many clustered rows in one step");
    // costliest items first: the grid-stride assignment (item i -> block i % grid) then balances blocks
    std::vector<int64_t> cost(items.size());
    for (size_t k = 0; k < items.size(); ++k) cost[k] = item_elems(items[k], p.clusters, cols[items[k].slot], vec);
    std::vector<size_t> order(items.size());
    std::iota(order.begin(), order.end(), size_t(0));
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return cost[a] > cost[b]; });
    pl.item0 = static_cast<int64_t>(p.items.size());
    for (size_t k : order) p.items.push_back(items[k]);
    pl.item1 = static_cast<int64_t>(p.items.size());
    pl.grid = std::min(pl.item1 - pl.item0, target.sm_count * target.blocks_per_sm);
    if (pl.grid > 0) p.launches.push_back(std::move(pl));
  }
  return p;
}

WorkTable work_table_from_tensors(const std::vector<int64_t>& idx, at::TensorList params,
                                  const c10::List<std::optional<at::Tensor>>& layouts,
                                  const std::vector<Geom>& geoms, const GridTarget& target) {
  std::vector<at::Tensor> host(geoms.size());
  std::vector<const int64_t*> host_ptr(geoms.size(), nullptr);
  for (int64_t i : idx) {
    if (geoms[i].clusters > 0) {
      host[i] = layouts.get(i)->to(at::kCPU).contiguous();
      host_ptr[i] = host[i].const_data_ptr<int64_t>();
    }
  }
  return build_work_table(idx, geoms, host_ptr, params[idx[0]].element_size(), target);
}

std::string work_table_stats(const WorkTable& p, const std::vector<Geom>& geoms, int64_t elem_size) {
  const int64_t vec = dev::kVecBytes / elem_size;
  int64_t n_kind[4] = {0, 0, 0, 0}, elems_kind[4] = {0, 0, 0, 0};
  int64_t scalar_elems = 0, scattered = 0, reread = 0, max_block = 0, sum_grid = 0, lanes_used = 0, lanes_total = 0;
  for (const TableLaunch& pl : p.launches) {
    std::vector<int64_t> per_block(pl.grid, 0);
    sum_grid += pl.grid;
    for (int64_t k = pl.item0; k < pl.item1; ++k) {
      const Item& it = p.items[k];
      const Geom& geo = geoms[pl.tensors[it.slot]];
      const int64_t e = item_elems(it, p.clusters, geo.cols, vec);
      n_kind[it.kind] += 1;
      elems_kind[it.kind] += e;
      per_block[(k - pl.item0) % pl.grid] += e;
      const bool clustered = it.kind == dev::kSmall || it.kind == dev::kLarge;
      if (it.kind == dev::kPacked || (clustered && (geo.cols * elem_size) % dev::kVecBytes != 0)) scalar_elems += e;
      if (clustered && geo.cols * elem_size < 32) scattered += e;  // rows shorter than a sector
      if (it.kind == dev::kLarge) reread += e;  // w read in both phases
      if (it.kind == dev::kSmall) {
        const int64_t ncols = std::min<int64_t>(geo.cols, int64_t(it.v1) * vec) - int64_t(it.v0) * vec;
        for (int64_t c = it.a0; c < it.a1; ++c) {
          reread += std::max<int64_t>(0, p.clusters[c].size - dev::kKeep) * ncols;
        }
      }
      if (it.kind == dev::kSmall) {
        const int64_t span = it.v1 - it.v0, nvv = std::min<int64_t>(span, kThreads), cpp = kThreads / nvv;
        const int64_t passes = ceil_div(it.a1 - it.a0, cpp);
        lanes_used += (it.a1 - it.a0) * nvv;
        lanes_total += passes * kThreads;
      }
    }
    for (int64_t b : per_block) max_block = std::max(max_block, b);
  }
  int64_t sizes[4] = {0, 0, 0, 0};  // clusters of 1, 2-4, 5-8, > 8 rows in the cluster table
  for (const Cluster& c : p.clusters) sizes[c.size == 1 ? 0 : c.size <= 4 ? 1 : c.size <= 8 ? 2 : 3] += 1;
  std::ostringstream s;
  s << "launches=" << p.launches.size() << ";blocks=" << sum_grid << ";items=" << p.items.size()
    << ";items_elem=" << n_kind[0] << ";items_small=" << n_kind[1] << ";items_large=" << n_kind[2]
    << ";items_packed=" << n_kind[3] << ";elems_elem=" << elems_kind[0] << ";elems_small=" << elems_kind[1]
    << ";elems_large=" << elems_kind[2] << ";elems_packed=" << elems_kind[3]
    << ";elems_scalar=" << scalar_elems << ";elems_scattered=" << scattered << ";elems_reread=" << reread << ";max_block_elems=" << max_block
    << ";small_lanes_used=" << lanes_used << ";small_lanes_total=" << lanes_total
    << ";clusters_1=" << sizes[0] << ";clusters_2_4=" << sizes[1] << ";clusters_5_8=" << sizes[2]
    << ";clusters_large=" << sizes[3] << ";table_bytes="
    << p.items.size() * sizeof(Item) + p.clusters.size() * sizeof(Cluster) + p.members.size() * sizeof(int32_t)
    << ";threads=" << kThreads << ";vec_bytes=" << dev::kVecBytes << ";elem_bytes=" << elem_size;
  return s.str();
}

const dev::Item* CachedWorkTable::items() const { return reinterpret_cast<const dev::Item*>(bytes.const_data_ptr<uint8_t>()); }

const dev::Cluster* CachedWorkTable::clusters() const {
  return reinterpret_cast<const dev::Cluster*>(bytes.const_data_ptr<uint8_t>() + host.items.size() * sizeof(Item));
}

const int32_t* CachedWorkTable::members() const {
  return reinterpret_cast<const int32_t*>(bytes.const_data_ptr<uint8_t>() + host.items.size() * sizeof(Item) +
                                          host.clusters.size() * sizeof(Cluster));
}

std::vector<std::vector<int64_t>> group_by_dtype(at::TensorList params) {
  std::vector<at::ScalarType> dtypes;
  std::vector<std::vector<int64_t>> out;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto dt = params[i].scalar_type();
    const auto it = std::find(dtypes.begin(), dtypes.end(), dt);
    if (it == dtypes.end()) {
      dtypes.push_back(dt);
      out.push_back({static_cast<int64_t>(i)});
    } else {
      out[it - dtypes.begin()].push_back(static_cast<int64_t>(i));
    }
  }
  return out;
}

namespace {

// Cache key: the device, dtype, target, and per tensor its geometry and layout identity (the layout tensors
// are held by the cached table, so their addresses stay theirs; the version counter catches in-place edits).
using Key = std::vector<int64_t>;

Key make_key(const std::vector<int64_t>& idx, at::TensorList params,
             const c10::List<std::optional<at::Tensor>>& layouts, const std::vector<Geom>& geoms,
             const GridTarget& target) {
  const at::Tensor& p0 = params[idx[0]];
  Key k{static_cast<int64_t>(p0.device().type()), p0.device().index(), static_cast<int64_t>(p0.scalar_type()),
        target.sm_count, target.blocks_per_sm};
  k.reserve(k.size() + 5 * idx.size());
  for (int64_t i : idx) {
    k.push_back(geoms[i].rows);
    k.push_back(geoms[i].cols);
    if (geoms[i].clusters > 0) {
      const at::Tensor l = *layouts.get(i);  // a copy: get() returns a temporary optional
      k.push_back(reinterpret_cast<int64_t>(l.unsafeGetTensorImpl()));
      k.push_back(reinterpret_cast<int64_t>(l.const_data_ptr()));
      k.push_back(static_cast<int64_t>(l._version()));
    } else {
      k.insert(k.end(), {0, 0, 0});
    }
  }
  return k;
}

std::mutex g_mutex;
std::list<std::pair<Key, std::shared_ptr<const CachedWorkTable>>> g_cache;  // most recently used first

}  // namespace

std::shared_ptr<const CachedWorkTable> cached_work_table(const std::vector<int64_t>& idx, at::TensorList params,
                                                         const c10::List<std::optional<at::Tensor>>& layouts,
                                                         const std::vector<Geom>& geoms, const GridTarget& target,
                                                         const std::function<void()>& on_miss,
                                                         const std::function<at::Tensor(const at::Tensor&)>& upload) {
  Key key = make_key(idx, params, layouts, geoms, target);
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    for (auto it = g_cache.begin(); it != g_cache.end(); ++it) {
      if (it->first == key) {
        g_cache.splice(g_cache.begin(), g_cache, it);
        return it->second;
      }
    }
  }
  on_miss();
  auto ct = std::make_shared<CachedWorkTable>();
  for (int64_t i : idx) {
    if (geoms[i].clusters > 0) ct->layouts.push_back(*layouts.get(i));
  }
  ct->host = work_table_from_tensors(idx, params, layouts, geoms, target);  // once per new set of layouts
  const WorkTable& p = ct->host;
  const size_t nbytes = p.items.size() * sizeof(Item) + p.clusters.size() * sizeof(Cluster) +
                        p.members.size() * sizeof(int32_t);
  at::Tensor bytes = at::empty({static_cast<int64_t>(std::max<size_t>(nbytes, 1))}, at::kByte);
  uint8_t* dst = bytes.data_ptr<uint8_t>();
  std::memcpy(dst, p.items.data(), p.items.size() * sizeof(Item));
  dst += p.items.size() * sizeof(Item);
  std::memcpy(dst, p.clusters.data(), p.clusters.size() * sizeof(Cluster));
  dst += p.clusters.size() * sizeof(Cluster);
  std::memcpy(dst, p.members.data(), p.members.size() * sizeof(int32_t));
  ct->bytes = upload(bytes);
  std::lock_guard<std::mutex> lock(g_mutex);
  g_cache.emplace_front(std::move(key), ct);
  if (g_cache.size() > kCacheSize) g_cache.pop_back();
  return ct;
}

std::vector<std::shared_ptr<const CachedWorkTable>> cached_work_tables(
    const std::vector<std::vector<int64_t>>& groups, at::TensorList params,
    const c10::List<std::optional<at::Tensor>>& layouts, const std::vector<Geom>& geoms,
    const std::function<GridTarget(at::ScalarType)>& target, const std::function<void()>& on_miss,
    const std::function<at::Tensor(const at::Tensor&)>& upload) {
  std::vector<std::shared_ptr<const CachedWorkTable>> tables;
  for (const std::vector<int64_t>& idx : groups) {
    tables.push_back(
        cached_work_table(idx, params, layouts, geoms, target(params[idx[0]].scalar_type()), on_miss, upload));
  }
  return tables;
}

}  // namespace csgd_ext
