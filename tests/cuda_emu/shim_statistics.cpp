// C ABI over the raw-pointer launchers of csrc/statistics/statistics_cuda.cu, for ctypes. The
// caller passes the maps (pointers, planes, sizes) and a guarded workspace of the size
// emu_*_workspace returned for the same list.
#include "statistics/statistics_cuda.h"

using alterops::statistics_cuda::DType;
using alterops::statistics_cuda::SegmentList;

namespace {
bool fill(SegmentList& s, int count, void* const* xs, void* const* outs, const long long* planes,
          const long long* sizes) {
  if (count < 0 || count > alterops::statistics_cuda::kMaxSegments) {
    s.count = count;  // the launcher's own check refuses it
    return false;
  }
  s.count = count;
  for (int i = 0; i < count; ++i) {
    s.seg[i].x = xs[i];
    s.seg[i].out = outs[i];
    s.seg[i].planes = planes[i];
    s.seg[i].size = sizes[i];
    s.seg[i].first_block = 0;
    s.seg[i].part_offset = 0;
  }
  return true;
}
}  // namespace

extern "C" {

int emu_delta_max_size(int dtype) { return alterops::statistics_cuda::delta_max_size(static_cast<DType>(dtype)); }

long long emu_statistics_workspace(int delta, int count, void* const* xs, void* const* outs, const long long* planes,
                                   const long long* sizes, int dtype) {
  SegmentList s;
  if (!fill(s, count, xs, outs, planes, sizes)) return 0;
  return static_cast<long long>(delta ? alterops::statistics_cuda::delta_log_amplitude_prepare(s, static_cast<DType>(dtype))
                                      : alterops::statistics_cuda::feature_variance_prepare(s, static_cast<DType>(dtype)));
}

int emu_delta_log_amplitude(int count, void* const* xs, void* const* outs, const long long* planes,
                            const long long* sizes, int dtype, double eps, void* workspace) {
  SegmentList s;
  if (fill(s, count, xs, outs, planes, sizes))
    alterops::statistics_cuda::delta_log_amplitude_prepare(s, static_cast<DType>(dtype));
  return static_cast<int>(
      alterops::statistics_cuda::delta_log_amplitude(s, static_cast<DType>(dtype), eps, workspace, nullptr));
}

int emu_feature_variance(int count, void* const* xs, void* const* outs, const long long* planes,
                         const long long* sizes, int dtype, void* workspace) {
  SegmentList s;
  if (fill(s, count, xs, outs, planes, sizes))
    alterops::statistics_cuda::feature_variance_prepare(s, static_cast<DType>(dtype));
  return static_cast<int>(alterops::statistics_cuda::feature_variance(s, static_cast<DType>(dtype), workspace, nullptr));
}

}  // extern "C"
