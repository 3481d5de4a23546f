// The compiled CPU kernel of `pipeline.elastic_warp.warp`: op `UnetWarp`.
//
// It computes what the graph implementation in elastic_warp.py computes, sample for sample:
// positions (y + dy, x + dx) mirrored once per pixel into the image (numpy's 'reflect',
// OpenCV's BORDER_REFLECT_101), then nearest (values copied exactly), bilinear or bicubic
// (Keys, a = -0.5) sampling. The graph implementation stays the reference, and the one
// that runs under XLA and on a GPU; this kernel exists because XLA's CPU backend turns
// every tap into scalar loads (no hardware gathers), slower than this loop (BENCHMARKS.md).
//
// pipeline/custom_op.py compiles this file on first use against the installed TensorFlow.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define UNET_WARP_AVX2 1
#endif

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;

constexpr float kKeysA = -0.5f;
constexpr int64_t kPad = 2;  // bicubic taps reach 1 px before and 2 px after a position

// Mirrors a float position into [0, last] as `_reflect` in elastic_warp.py does: two
// passes cover about three image sizes beyond either edge, farther out (and NaN) lands on
// the last pixel.
inline float Reflect(float p, float last) {
  for (int pass = 0; pass < 2; ++pass) {
    p = std::fabs(p);
    p = std::min(p, 2 * last - p);
  }
  return p <= last ? std::max(p, 0.0f) : last;
}

// Mirrors a whole-pixel index within kPad of [0, size - 1].
inline int64_t ReflectIndex(int64_t i, int64_t size) {
  if (size == 1) return 0;
  if (i < 0) i = -i;
  if (i > size - 1) i = 2 * (size - 1) - i;
  return std::clamp<int64_t>(i, 0, size - 1);
}

inline float KeysNear(float d) { return ((kKeysA + 2) * d - (kKeysA + 3)) * d * d + 1; }
inline float KeysFar(float d) { return ((kKeysA * d - 5 * kKeysA) * d + 8 * kKeysA) * d - 4 * kKeysA; }

template <typename T>
inline T CastBack(float value) {
  if constexpr (std::is_integral_v<T>) {
    // Round half to even, as tf.round, then clip to the type's range.
    const float rounded = std::nearbyint(value);
    return static_cast<T>(std::clamp(rounded, static_cast<float>(std::numeric_limits<T>::lowest()),
                                     static_cast<float>(std::numeric_limits<T>::max())));
  } else {
    return static_cast<T>(value);
  }
}

enum class Interpolation { kNearest, kBilinear, kBicubic };

// The batch as float32, mirror-padded by kPad on every side, into `padded`: every tap of a
// mirrored position is then a fixed offset from one index, with no per-tap mirroring.
template <typename T>
void MirrorPad(const T* images, int64_t batch, int64_t height, int64_t width, int64_t channels, float* padded) {
  const int64_t padded_width = width + 2 * kPad;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t r = 0; r < height + 2 * kPad; ++r, padded += padded_width * channels) {
      const T* row = images + ((b * height) + ReflectIndex(r - kPad, height)) * width * channels;
      float* interior = padded + kPad * channels;
      for (int64_t i = 0; i < width * channels; ++i) interior[i] = static_cast<float>(row[i]);
      for (int64_t c = 0; c < kPad; ++c) {
        const T* before = row + ReflectIndex(c - kPad, width) * channels;
        const T* after = row + ReflectIndex(width + c, width) * channels;
        for (int64_t k = 0; k < channels; ++k) {
          padded[c * channels + k] = static_cast<float>(before[k]);
          interior[(width + c) * channels + k] = static_cast<float>(after[k]);
        }
      }
    }
  }
}

// Everything one output row needs.
template <typename T>
struct Row {
  const T* image;          // the example's input pixels [H, W, C]
  const float* padded;     // the example's padded float copy [H + 4, W + 4, C]
  const float* field;      // this row's displacements [W, 2]
  T* out;                  // this row's output [W, C]
  int64_t r, height, width, channels;
};

template <typename T>
void NearestRow(const Row<T>& row, int64_t begin) {
  const float last_y = row.height - 1, last_x = row.width - 1;
  for (int64_t c = begin; c < row.width; ++c) {
    // Round, then mirror the whole-pixel position, as the graph implementation does.
    const int64_t y = Reflect(std::floor(row.r + row.field[2 * c] + 0.5f), last_y);
    const int64_t x = Reflect(std::floor(c + row.field[2 * c + 1] + 0.5f), last_x);
    const T* source = row.image + (y * row.width + x) * row.channels;
    for (int64_t k = 0; k < row.channels; ++k) row.out[c * row.channels + k] = source[k];
  }
}

// Pixel c's mirrored position as fractions (ty, tx) and its tap at (top, left) + offset
// in the padded copy.
struct FirstTap {
  float ty, tx;
  const float* tap;
};

template <typename T>
inline FirstTap FirstTapAt(const Row<T>& row, int64_t c, int64_t offset) {
  const float y = Reflect(row.r + row.field[2 * c], row.height - 1);
  const float x = Reflect(c + row.field[2 * c + 1], row.width - 1);
  const float top = std::floor(y), left = std::floor(x);
  const int64_t index = (static_cast<int64_t>(top) + offset) * (row.width + 2 * kPad) + static_cast<int64_t>(left) + offset;
  return {y - top, x - left, row.padded + index * row.channels};
}

// Bilinear samples of pixels [begin, width): 2 x 2 taps from the padded copy.
template <typename T>
void BilinearRow(const Row<T>& row, int64_t begin) {
  const int64_t channels = row.channels, padded_width = row.width + 2 * kPad;
  for (int64_t c = begin; c < row.width; ++c) {
    // At y == height - 1 exactly the lower taps read the padding, with weight 0.
    const auto [ty, tx, upper] = FirstTapAt(row, c, kPad);
    const float* lower = upper + padded_width * channels;
    for (int64_t k = 0; k < channels; ++k) {
      const float up = (1 - tx) * upper[k] + tx * upper[channels + k];
      const float down = (1 - tx) * lower[k] + tx * lower[channels + k];
      row.out[c * channels + k] = CastBack<T>((1 - ty) * up + ty * down);
    }
  }
}

// Bicubic samples of pixels [begin, width): 4 x 4 taps from the padded copy, separable.
template <typename T>
void BicubicRow(const Row<T>& row, int64_t begin) {
  const int64_t channels = row.channels, padded_width = row.width + 2 * kPad;
  for (int64_t c = begin; c < row.width; ++c) {
    const auto [ty, tx, first] = FirstTapAt(row, c, kPad - 1);
    const float wy[4] = {KeysFar(1 + ty), KeysNear(ty), KeysNear(1 - ty), KeysFar(2 - ty)};
    const float wx[4] = {KeysFar(1 + tx), KeysNear(tx), KeysNear(1 - tx), KeysFar(2 - tx)};
    for (int64_t k = 0; k < channels; ++k) {
      float total = 0;
      for (int i = 0; i < 4; ++i) {
        const float* taps = first + i * padded_width * channels + k;
        const float sum = wx[0] * taps[0] + wx[1] * taps[channels] + wx[2] * taps[2 * channels] +
                          wx[3] * taps[3 * channels];
        total += wy[i] * sum;
      }
      row.out[c * channels + k] = CastBack<T>(total);
    }
  }
}

#ifdef UNET_WARP_AVX2
// Eight pixels at a time for single-channel images: positions and weights as 8-lane
// vectors, taps as 64- or 128-bit loads per pixel (hardware gathers were tried and gained
// nothing over XLA on AMD cores). Each returns the first pixel it left for the scalar loop.

inline __m256 ReflectV(__m256 p, __m256 last) {
  const __m256 sign = _mm256_set1_ps(-0.0f), twice = _mm256_add_ps(last, last);
  for (int pass = 0; pass < 2; ++pass) {
    p = _mm256_andnot_ps(sign, p);
    p = _mm256_min_ps(p, _mm256_sub_ps(twice, p));
  }
  // Ordered compare: NaN fails it and lands on `last`, as in the scalar code.
  const __m256 inside = _mm256_cmp_ps(p, last, _CMP_LE_OQ);
  return _mm256_blendv_ps(last, _mm256_max_ps(p, _mm256_setzero_ps()), inside);
}

inline __m256 KeysNearV(__m256 d) {
  const __m256 v = _mm256_sub_ps(_mm256_mul_ps(_mm256_set1_ps(kKeysA + 2), d), _mm256_set1_ps(kKeysA + 3));
  return _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(v, d), d), _mm256_set1_ps(1.0f));
}

inline __m256 KeysFarV(__m256 d) {
  __m256 v = _mm256_sub_ps(_mm256_mul_ps(_mm256_set1_ps(kKeysA), d), _mm256_set1_ps(5 * kKeysA));
  v = _mm256_add_ps(_mm256_mul_ps(v, d), _mm256_set1_ps(8 * kKeysA));
  return _mm256_sub_ps(_mm256_mul_ps(v, d), _mm256_set1_ps(4 * kKeysA));
}

// Positions (y + dy, x + dx) of pixels c .. c + 7 of the row; the field is interleaved (dy, dx).
inline void PositionsV(const float* field, float r, int64_t c, __m256* y, __m256* x) {
  const __m256 a = _mm256_loadu_ps(field + 2 * c), b = _mm256_loadu_ps(field + 2 * c + 8);
  // shuffle_ps works within 128-bit halves; permute4x64 puts the halves back in order.
  const __m256 dy = _mm256_castpd_ps(
      _mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))), _MM_SHUFFLE(3, 1, 2, 0)));
  const __m256 dx = _mm256_castpd_ps(
      _mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1))), _MM_SHUFFLE(3, 1, 2, 0)));
  const __m256 columns = _mm256_add_ps(_mm256_set1_ps(static_cast<float>(c)), _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7));
  *y = _mm256_add_ps(_mm256_set1_ps(r), dy);
  *x = _mm256_add_ps(columns, dx);
}

// Mirrored positions, their whole-pixel parts and fractions, and the flat index
// (row + row_offset) * stride + column + column_offset of each.
struct Taps {
  __m256 ty, tx;
  __m256i index;
};

inline Taps TapsV(const float* field, float r, int64_t c, __m256 last_y, __m256 last_x, int row_offset,
                  int column_offset, int stride) {
  __m256 y, x;
  PositionsV(field, r, c, &y, &x);
  y = ReflectV(y, last_y);
  x = ReflectV(x, last_x);
  const __m256 top = _mm256_floor_ps(y), left = _mm256_floor_ps(x);
  const __m256i index = _mm256_add_epi32(
      _mm256_mullo_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(top), _mm256_set1_epi32(row_offset)),
                         _mm256_set1_epi32(stride)),
      _mm256_add_epi32(_mm256_cvttps_epi32(left), _mm256_set1_epi32(column_offset)));
  return {_mm256_sub_ps(y, top), _mm256_sub_ps(x, left), index};
}

// Four weights per pixel for 8 pixels (one vector per weight), as 8 vectors of 4 (one per pixel).
inline void TransposeWeights(__m256 w0, __m256 w1, __m256 w2, __m256 w3, __m128 out[8]) {
  out[0] = _mm256_castps256_ps128(w0), out[1] = _mm256_castps256_ps128(w1);
  out[2] = _mm256_castps256_ps128(w2), out[3] = _mm256_castps256_ps128(w3);
  out[4] = _mm256_extractf128_ps(w0, 1), out[5] = _mm256_extractf128_ps(w1, 1);
  out[6] = _mm256_extractf128_ps(w2, 1), out[7] = _mm256_extractf128_ps(w3, 1);
  _MM_TRANSPOSE4_PS(out[0], out[1], out[2], out[3]);
  _MM_TRANSPOSE4_PS(out[4], out[5], out[6], out[7]);
}

inline float Sum(__m128 v) {
  const __m128 pairs = _mm_add_ps(v, _mm_movehl_ps(v, v));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
}

template <typename T>
inline void StoreV(__m256 values, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(out, values);
  } else {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, values);
    for (int k = 0; k < 8; ++k) out[k] = CastBack<T>(lanes[k]);
  }
}

template <typename T>
int64_t BilinearRowV(const Row<T>& row) {
  const int64_t padded_width = row.width + 2 * kPad;
  const __m256 last_y = _mm256_set1_ps(row.height - 1), last_x = _mm256_set1_ps(row.width - 1);
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t c = 0;
  for (; c + 8 <= row.width; c += 8) {
    const Taps taps = TapsV(row.field, row.r, c, last_y, last_x, kPad, kPad, static_cast<int>(padded_width));
    const __m256 ntx = _mm256_sub_ps(one, taps.tx), nty = _mm256_sub_ps(one, taps.ty);
    __m128 w[8];
    TransposeWeights(_mm256_mul_ps(nty, ntx), _mm256_mul_ps(nty, taps.tx), _mm256_mul_ps(taps.ty, ntx),
                     _mm256_mul_ps(taps.ty, taps.tx), w);
    alignas(32) int32_t first[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(first), taps.index);
    alignas(32) float samples[8];
    for (int k = 0; k < 8; ++k) {
      // The 2 x 2 taps as one vector: two adjacent pixels of each of two rows.
      const float* upper = row.padded + first[k];
      const __m128 corners = _mm_loadh_pi(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(upper))),
                                          reinterpret_cast<const __m64*>(upper + padded_width));
      samples[k] = Sum(_mm_mul_ps(corners, w[k]));
    }
    StoreV(_mm256_load_ps(samples), row.out + c);
  }
  return c;
}

template <typename T>
int64_t BicubicRowV(const Row<T>& row) {
  // Gathers are slow on many x86 cores (AMD's especially); the 4 taps of a kernel row
  // are adjacent, so each pixel loads its 4 rows as four 128-bit vectors instead.
  const int64_t padded_width = row.width + 2 * kPad;
  const __m256 last_y = _mm256_set1_ps(row.height - 1), last_x = _mm256_set1_ps(row.width - 1);
  const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f);
  int64_t c = 0;
  for (; c + 8 <= row.width; c += 8) {
    const Taps taps = TapsV(row.field, row.r, c, last_y, last_x, kPad - 1, kPad - 1, static_cast<int>(padded_width));
    alignas(32) float wy[4][8];
    _mm256_store_ps(wy[0], KeysFarV(_mm256_add_ps(one, taps.ty)));
    _mm256_store_ps(wy[1], KeysNearV(taps.ty));
    _mm256_store_ps(wy[2], KeysNearV(_mm256_sub_ps(one, taps.ty)));
    _mm256_store_ps(wy[3], KeysFarV(_mm256_sub_ps(two, taps.ty)));
    __m128 wx[8];
    TransposeWeights(KeysFarV(_mm256_add_ps(one, taps.tx)), KeysNearV(taps.tx), KeysNearV(_mm256_sub_ps(one, taps.tx)),
                     KeysFarV(_mm256_sub_ps(two, taps.tx)), wx);
    alignas(32) int32_t first[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(first), taps.index);
    alignas(32) float samples[8];
    for (int k = 0; k < 8; ++k) {
      // The 4 rows weighted and summed first, then the columns: the scalar code's 16
      // products, summed in another order.
      const float* tap = row.padded + first[k];
      __m128 rows = _mm_mul_ps(_mm_set1_ps(wy[0][k]), _mm_loadu_ps(tap));
      rows = _mm_add_ps(rows, _mm_mul_ps(_mm_set1_ps(wy[1][k]), _mm_loadu_ps(tap + padded_width)));
      rows = _mm_add_ps(rows, _mm_mul_ps(_mm_set1_ps(wy[2][k]), _mm_loadu_ps(tap + 2 * padded_width)));
      rows = _mm_add_ps(rows, _mm_mul_ps(_mm_set1_ps(wy[3][k]), _mm_loadu_ps(tap + 3 * padded_width)));
      samples[k] = Sum(_mm_mul_ps(rows, wx[k]));
    }
    StoreV(_mm256_load_ps(samples), row.out + c);
  }
  return c;
}

// Nearest samples of single-channel images: the indices 8 at a time, the copies one by one.
template <typename T>
int64_t NearestRowV(const Row<T>& row) {
  const __m256 last_y = _mm256_set1_ps(row.height - 1), last_x = _mm256_set1_ps(row.width - 1);
  const __m256 half = _mm256_set1_ps(0.5f);
  int64_t c = 0;
  for (; c + 8 <= row.width; c += 8) {
    __m256 y, x;
    PositionsV(row.field, row.r, c, &y, &x);
    // Round, then mirror the whole-pixel position, as the scalar code does.
    y = ReflectV(_mm256_floor_ps(_mm256_add_ps(y, half)), last_y);
    x = ReflectV(_mm256_floor_ps(_mm256_add_ps(x, half)), last_x);
    alignas(32) int32_t index[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(index),
                       _mm256_add_epi32(_mm256_mullo_epi32(_mm256_cvttps_epi32(y), _mm256_set1_epi32(static_cast<int>(row.width))),
                                        _mm256_cvttps_epi32(x)));
    for (int k = 0; k < 8; ++k) row.out[c + k] = row.image[index[k]];
  }
  return c;
}
#endif  // UNET_WARP_AVX2

template <typename T>
void SampleRow(Interpolation interpolation, const Row<T>& row) {
  int64_t begin = 0;
#ifdef UNET_WARP_AVX2
  // 32-bit indices: an example must stay below 2^31 values.
  if (row.channels == 1 && (row.height + 2 * kPad) * (row.width + 2 * kPad) < (int64_t{1} << 31)) {
    begin = interpolation == Interpolation::kNearest    ? NearestRowV(row)
            : interpolation == Interpolation::kBilinear ? BilinearRowV(row)
                                                        : BicubicRowV(row);
  }
#endif
  switch (interpolation) {
    case Interpolation::kNearest:
      return NearestRow(row, begin);
    case Interpolation::kBilinear:
      return BilinearRow(row, begin);
    case Interpolation::kBicubic:
      return BicubicRow(row, begin);
  }
}

template <typename T>
class WarpOp : public OpKernel {
 public:
  explicit WarpOp(OpKernelConstruction* context) : OpKernel(context) {
    std::string name;
    OP_REQUIRES_OK(context, context->GetAttr("interpolation", &name));
    interpolation_ = name == "nearest"    ? Interpolation::kNearest
                     : name == "bilinear" ? Interpolation::kBilinear
                                          : Interpolation::kBicubic;
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& images = context->input(0);
    const Tensor& field = context->input(1);
    // A single image [H, W, C] is a batch of one; a field [H, W, 2] is shared by the batch.
    OP_REQUIRES(context, images.dims() == 3 || images.dims() == 4,
                absl::InvalidArgumentError("UnetWarp: images must be [batch, height, width, channels] or "
                                           "[height, width, channels], got " + images.shape().DebugString()));
    const int first = images.dims() - 3;
    const int64_t batch = first ? images.dim_size(0) : 1, height = images.dim_size(first),
                  width = images.dim_size(first + 1), channels = images.dim_size(first + 2);
    const int field_first = field.dims() - 3;
    OP_REQUIRES(context,
                (field.dims() == 3 || (field.dims() == 4 && field.dim_size(0) == batch)) &&
                    field.dim_size(field_first) == height && field.dim_size(field_first + 1) == width &&
                    field.dim_size(field_first + 2) == 2,
                absl::InvalidArgumentError("UnetWarp: field must be [batch, height, width, 2] or [height, width, 2] "
                                           "for images " + images.shape().DebugString() + ", got " +
                                           field.shape().DebugString()));
    const int64_t field_stride = field.dims() == 4 ? height * width * 2 : 0;
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, images.shape(), &output));
    if (images.NumElements() == 0) return;

    const T* in = images.flat<T>().data();
    const float* displacements = field.flat<float>().data();
    T* out = output->flat<T>().data();
    const int64_t padded_size = (height + 2 * kPad) * (width + 2 * kPad) * channels;
    Tensor padded;
    const float* padded_data = nullptr;  // nearest reads the input itself
    if (interpolation_ != Interpolation::kNearest) {
      OP_REQUIRES_OK(context, context->allocate_temp(tensorflow::DT_FLOAT, {batch * padded_size}, &padded));
      MirrorPad(in, batch, height, width, channels, padded.flat<float>().data());
      padded_data = padded.flat<float>().data();
    }
    const Interpolation interpolation = interpolation_;
    auto rows = [&](int64_t begin, int64_t end) {
      for (int64_t index = begin; index < end; ++index) {
        const int64_t b = index / height;
        const Row<T> row{in + b * height * width * channels,
                         padded_data + b * padded_size,
                         displacements + b * field_stride + (index % height) * width * 2,
                         out + index * width * channels,
                         index % height, height, width, channels};
        SampleRow(interpolation, row);
      }
    };
    const int64_t taps = interpolation_ == Interpolation::kBicubic ? 16 : interpolation_ == Interpolation::kBilinear ? 4 : 1;
    auto* workers = context->device()->tensorflow_cpu_worker_threads()->workers;
    tensorflow::Shard(workers->NumThreads(), workers, batch * height, width * channels * (10 + 2 * taps), rows);
  }

 private:
  Interpolation interpolation_;
};

}  // namespace

REGISTER_OP("UnetWarp")
    .Input("images: T")
    .Input("field: float")
    .Output("warped: T")
    .Attr("interpolation: {'nearest', 'bilinear', 'bicubic'}")
    .Attr("T: {float, double, uint8, uint16, int8, int16, int32, int64}")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* context) {
      context->set_output(0, context->input(0));
      return absl::OkStatus();
    })
    .Doc("Samples images [B, H, W, C] or [H, W, C] at (y + dy, x + dx), mirrored at the borders.");

#define REGISTER_WARP(T) \
  REGISTER_KERNEL_BUILDER(Name("UnetWarp").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"), WarpOp<T>)
REGISTER_WARP(float);
REGISTER_WARP(double);
REGISTER_WARP(uint8_t);
REGISTER_WARP(uint16_t);
REGISTER_WARP(int8_t);
REGISTER_WARP(int16_t);
REGISTER_WARP(int32_t);
REGISTER_WARP(int64_t);
