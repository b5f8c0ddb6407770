// CPU kernels of the `cpp` backend: cross entropy straight from the logits, and segment sums.
//
// Vectorisation: ATen's at::vec::Vectorized<float> (16 lanes under AVX-512, 8 under AVX2, a
// scalar fallback otherwise; setup.py picks the flags and defines CPU_CAPABILITY_*), with an
// inlined ~1-ulp exp (vexp below). bf16/fp16 logits are read once and widened to
// float32 in registers; every sum is accumulated in float32.
//
// Threading: OpenMP over rows. A row is computed start to finish by one thread in a fixed
// order, so results are bit-identical for every thread count and schedule. Row offsets are
// int64_t (row * stride), so N*V beyond 2**31 is fine.
#include "cpu_kernels.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace steerlm {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();  // float lanes per vector
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Forward: a row is streamed in chunks of kChunk elements through a per-thread float32 buffer
// (8 KiB, stays in L1). Pass 1 over the chunk widens it into the buffer and takes its max;
// pass 2 (from L1) adds exp(x - m). The logits themselves are read from memory once.
constexpr int64_t kChunk = 2048;

// Work per OpenMP task (elements); smaller problems run on the calling thread alone.
constexpr int64_t kGrainElems = 1 << 16;
constexpr int64_t kSerialElems = 1 << 15;

// ---- widening loads / narrowing stores of one or two float vectors ----------------------------

template <typename T>
inline Vec load_f32(const T* p);
template <>
inline Vec load_f32<float>(const float* p) {
  return Vec::loadu(p);
}
template <>
inline Vec load_f32<c10::BFloat16>(const c10::BFloat16* p) {
  Vec v;
  at::vec::load_to_float<c10::BFloat16>(p, v);  // kW bf16 -> kW floats (a shift per lane)
  return v;
}
template <>
inline Vec load_f32<c10::Half>(const c10::Half* p) {
  Vec v;
  at::vec::load_to_float<c10::Half>(p, v);  // kW fp16 -> kW floats (vcvtph2ps)
  return v;
}

// Store 2*kW values: float directly, bf16/fp16 rounded to nearest even (as Tensor.to does).
template <typename T>
inline void store_2x(T* p, const Vec& a, const Vec& b) {
  at::vec::convert_from_float<T>(a, b).store(p);
}
template <>
inline void store_2x<float>(float* p, const Vec& a, const Vec& b) {
  a.store(p);
  b.store(p + kW);
}

// exp(x) lane-wise, inlined (no call per vector, unlike Sleef's expf): Cephes' expf scheme,
// ~1 ulp. x = n*ln2 + r with |r| <= ln2/2 (ln2 split in two so the reduction is exact), a
// degree-7 Horner polynomial for exp(r), and 2^n written into the exponent bits: adding
// 1.5 * 2^23 to x*log2(e) rounds it to the integer n and leaves n in the low mantissa bits, so
// ((bits + 127) << 23) is the float 2^n. x is clamped to [-88, 88.376] first (n in [-127, 127]):
// below, 2^n is 0 (exp(-inf) = 0; denormal results flush to 0, harmless next to a sum >= 1);
// above it saturates at exp(88.376) (our arguments are x - max or x - lse, never > ~0).
// NaN in gives NaN out. AVX-512 / AVX2 intrinsics (about 20 instructions); ATen's exp otherwise.
constexpr float kExpLo = -88.f, kExpHi = 88.3762626647949f, kLog2e = 1.44269504088896341f;
constexpr float kMagic = 12582912.f;  // 1.5 * 2^23
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f;
constexpr float kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

#if defined(CPU_CAPABILITY_AVX512)
inline Vec vexp(const Vec& xv) {
  const __m512 x = xv;
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(kExpLo)), _mm512_set1_ps(kExpHi));
  const __m512 t = _mm512_fmadd_ps(xc, _mm512_set1_ps(kLog2e), _mm512_set1_ps(kMagic));
  const __m512 n = _mm512_sub_ps(t, _mm512_set1_ps(kMagic));
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kP0), r, _mm512_set1_ps(kP1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP5));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(127)), 23);
  const __m512 y = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
  return _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}
#elif defined(CPU_CAPABILITY_AVX2)
inline Vec vexp(const Vec& xv) {
  const __m256 x = xv;
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kExpLo)), _mm256_set1_ps(kExpHi));
  const __m256 t = _mm256_fmadd_ps(xc, _mm256_set1_ps(kLog2e), _mm256_set1_ps(kMagic));
  const __m256 n = _mm256_sub_ps(t, _mm256_set1_ps(kMagic));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kP0), r, _mm256_set1_ps(kP1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP5));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
#else
inline Vec vexp(const Vec& x) { return x.exp(); }
#endif

// Lane-wise max without ATen's NaN bookkeeping (a plain vmaxps): the forward does not need the
// max to see NaN, because exp(NaN - m) is NaN and poisons the row's sum anyway.
inline Vec fast_max(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_max_ps(a, b);
#else
  return at::vec::maximum(a, b);
#endif
}

// Horizontal reductions in a fixed lane order (deterministic).
inline float hsum(const Vec& v) {
  alignas(64) float lanes[kW];
  v.store(lanes);
  float s = 0.f;
  for (int64_t i = 0; i < kW; ++i) s += lanes[i];
  return s;
}
inline float hmax(const Vec& v) {
  alignas(64) float lanes[kW];
  v.store(lanes);
  float m = lanes[0];
  for (int64_t i = 1; i < kW; ++i) m = (std::isnan(lanes[i]) || lanes[i] > m) ? lanes[i] : m;  // NaN sticks
  return m;
}

// ---- per-row kernels --------------------------------------------------------------------------

// log(sum(exp(x[0:V]))) of one row, single pass over memory (see kChunk). `buf` holds
// kChunk + kW floats. The running max m is a scalar per row; the running sum is a vector of
// per-lane partial sums, rescaled by exp(m_old - m_new) only when a chunk raises the max.
// NaN anywhere gives NaN; a row of -inf gives -inf; +inf gives NaN (inf - inf), as the Triton
// kernel does (and as F.cross_entropy's loss does).
template <typename T>
float row_lse(const T* x, int64_t V, float* buf) {
  float m = kNegInf;
  Vec acc(0.f);
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t len = std::min(kChunk, V - c0);
    int64_t nv = len / kW * kW;
    Vec vmax(kNegInf);
    for (int64_t j = 0; j < nv; j += kW) {
      Vec v = load_f32(x + c0 + j);
      v.store(buf + j);
      vmax = fast_max(vmax, v);
    }
    if (nv < len) {  // tail: widen scalar-wise, pad the last vector with -inf (exp -> 0)
      for (int64_t j = nv; j < len; ++j) buf[j] = static_cast<float>(x[c0 + j]);
      for (int64_t j = len; j < nv + kW; ++j) buf[j] = kNegInf;
      vmax = fast_max(vmax, Vec::loadu(buf + nv));
      nv += kW;
    }
    const float cm = hmax(vmax);
    // +inf (inf - inf; or a NaN the max happened to keep): the row's lse is NaN, as in PyTorch,
    // and the rest need not be read. Other NaNs reach the sum through exp.
    if (std::isnan(cm) || cm == -kNegInf) return std::numeric_limits<float>::quiet_NaN();
    const float m_new = std::max(m, cm);
    if (m_new == kNegInf) continue;  // everything so far is -inf: nothing to add
    if (m_new > m) {
      acc = acc * Vec(std::exp(m - m_new));  // m == -inf -> factor 0
      m = m_new;
    }
    const Vec mv(m);
    Vec acc2(0.f);  // two accumulators: shorter add dependency chains
    int64_t j = 0;
    for (; j + 2 * kW <= nv; j += 2 * kW) {
      acc = acc + vexp(Vec::loadu(buf + j) - mv);
      acc2 = acc2 + vexp(Vec::loadu(buf + j + kW) - mv);
    }
    if (j < nv) acc = acc + vexp(Vec::loadu(buf + j) - mv);
    acc = acc + acc2;
  }
  return m + std::log(hsum(acc));
}

// One row of the gradient: out = exp(x - lse) * c, then out[local] = (exp(x[local] - lse) - 1) * c
// (local < 0: the label is not in this shard). x[local] is read before the row is written, and
// every vector is read before it is stored, so out == x (in place) is safe.
template <typename T>
void row_grad(const T* x, T* out, int64_t V, float lse, float c, int64_t local) {
  const float x_local = local >= 0 ? static_cast<float>(x[local]) : 0.f;
  const Vec lv(lse), cv(c);
  int64_t j = 0;
  for (; j + 2 * kW <= V; j += 2 * kW) {
    const Vec a = vexp(load_f32(x + j) - lv) * cv;
    const Vec b = vexp(load_f32(x + j + kW) - lv) * cv;
    store_2x(out + j, a, b);
  }
  for (; j < V; ++j) out[j] = static_cast<T>(std::exp(static_cast<float>(x[j]) - lse) * c);
  if (local >= 0) out[local] = static_cast<T>((std::exp(x_local - lse) - 1.f) * c);
}

// Label of row i as int64 (labels are int32 or int64, contiguous).
struct Labels {
  const int32_t* i32 = nullptr;
  const int64_t* i64 = nullptr;
  explicit Labels(const at::Tensor& t) {
    if (t.scalar_type() == at::kLong) i64 = t.data_ptr<int64_t>();
    else i32 = t.data_ptr<int32_t>();
  }
  int64_t operator[](int64_t i) const { return i64 ? i64[i] : static_cast<int64_t>(i32[i]); }
};

// Threads for `elems` units of work: 1 for small problems (no fork/join cost), else torch's
// intra-op thread count (torch.set_num_threads is honoured).
int n_threads(int64_t elems) {
  return elems < kSerialElems ? 1 : std::max(1, at::get_num_threads());
}

void check_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK(logits.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(logits.dim() == 2, name, " must be 2-D [N, V], got ", logits.dim(), "-D");
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, name,
              " must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1, name, " must have unit column stride");
}

at::Tensor check_rows(const at::Tensor& t, int64_t n, const char* name, bool is_label) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape [", n, "], got ", t.sizes());
  if (is_label) {
    TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, name,
                " must be int32 or int64, got ", t.scalar_type());
    return t.contiguous();
  }
  return t.to(at::kFloat).contiguous();  // no copy when already contiguous float32
}

// All rows of the forward: (lse, target) per row, ignored rows skipped (0/0, never read).
template <typename T>
void forward_rows(const T* base, int64_t N, int64_t V, int64_t stride, Labels lab, int64_t vocab_start,
                  int64_t ignore_index, float* lse_p, float* tgt_p) {
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(V, 1));
#pragma omp parallel num_threads(n_threads(N * V))
  {
    alignas(64) float buf[kChunk + kW];  // per-thread widening buffer (see kChunk)
#pragma omp for schedule(dynamic, grain)
    for (int64_t i = 0; i < N; ++i) {
      const int64_t label = lab[i];
      if (label == ignore_index) {
        lse_p[i] = 0.f;
        tgt_p[i] = 0.f;
        continue;
      }
      const T* row = base + i * stride;  // int64 offset
      lse_p[i] = row_lse(row, V, buf);
      const int64_t local = label - vocab_start;
      tgt_p[i] = (local >= 0 && local < V) ? static_cast<float>(row[local]) : 0.f;
    }
  }
}

// All rows of the backward. Rows with coef == 0 (after forcing ignored labels to 0) are zeroed
// with memset (+0.0 is all-zero bits in every dtype) and their logits are not read.
template <typename T>
void backward_rows(const T* base, T* obase, int64_t N, int64_t V, int64_t stride, int64_t out_stride,
                   Labels lab, const float* lse_p, const float* coef_p, int64_t vocab_start,
                   int64_t ignore_index) {
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(V, 1));
#pragma omp parallel for num_threads(n_threads(N * V)) schedule(dynamic, grain)
  for (int64_t i = 0; i < N; ++i) {
    const int64_t label = lab[i];
    const float c = label == ignore_index ? 0.f : coef_p[i];
    T* orow = obase + i * out_stride;
    if (c == 0.f) {
      std::memset(static_cast<void*>(orow), 0, sizeof(T) * V);
      continue;
    }
    const int64_t local = label - vocab_start;
    row_grad(base + i * stride, orow, V, lse_p[i], c, (local >= 0 && local < V) ? local : -1);
  }
}

// Advise transparent huge pages for a large output buffer that is about to be written for the
// first time (a fresh gradient from torch.empty): the first touch then costs one page fault per
// 2 MiB instead of one per 4 KiB, which is a large share of the backward on small machines.
// Advice only: a no-op where THP is disabled or the pages already exist.
void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ce_forward_cpu(
    const at::Tensor& logits, const at::Tensor& labels_in, int64_t vocab_start, int64_t ignore_index) {
  check_logits(logits, "logits");
  const int64_t N = logits.size(0), V = logits.size(1), stride = logits.stride(0);
  const at::Tensor labels = check_rows(labels_in, N, "labels", true);
  at::Tensor lse = at::empty({N}, logits.options().dtype(at::kFloat));
  at::Tensor target = at::empty({N}, logits.options().dtype(at::kFloat));
  float* lse_p = lse.data_ptr<float>();
  float* tgt_p = target.data_ptr<float>();
  const Labels lab(labels);
  const void* in = logits.const_data_ptr();
  switch (logits.scalar_type()) {
    case at::kFloat:
      forward_rows(static_cast<const float*>(in), N, V, stride, lab, vocab_start, ignore_index, lse_p, tgt_p);
      break;
    case at::kBFloat16:
      forward_rows(static_cast<const c10::BFloat16*>(in), N, V, stride, lab, vocab_start, ignore_index, lse_p,
                   tgt_p);
      break;
    default:  // kHalf (check_logits allows nothing else)
      forward_rows(static_cast<const c10::Half*>(in), N, V, stride, lab, vocab_start, ignore_index, lse_p, tgt_p);
  }
  return {lse, target};
}

void ce_backward_cpu(
    const at::Tensor& logits, const at::Tensor& labels_in, const at::Tensor& lse_in, const at::Tensor& coef_in,
    int64_t vocab_start, int64_t ignore_index, const at::Tensor& out) {
  check_logits(logits, "logits");
  check_logits(out, "out");
  TORCH_CHECK(out.sizes() == logits.sizes(), "out must have the shape of logits ", logits.sizes(),
              ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == logits.scalar_type(), "out must have the dtype of logits");
  const int64_t N = logits.size(0), V = logits.size(1);
  const int64_t stride = logits.stride(0), out_stride = out.stride(0);
  const at::Tensor labels = check_rows(labels_in, N, "labels", true);
  const at::Tensor lse = check_rows(lse_in, N, "lse", false);
  const at::Tensor coef = check_rows(coef_in, N, "coef", false);
  const float* lse_p = lse.data_ptr<float>();
  const float* coef_p = coef.data_ptr<float>();
  // Raw pointers: `out` may alias `logits`, so no const view of the same storage is used.
  void* in = logits.data_ptr();
  void* o = out.data_ptr();
  if (o != in && N > 0) advise_huge_pages(o, ((N - 1) * out_stride + V) * out.element_size());
  const Labels lab(labels);
  switch (logits.scalar_type()) {
    case at::kFloat:
      backward_rows(static_cast<const float*>(in), static_cast<float*>(o), N, V, stride, out_stride, lab, lse_p,
                    coef_p, vocab_start, ignore_index);
      break;
    case at::kBFloat16:
      backward_rows(static_cast<const c10::BFloat16*>(in), static_cast<c10::BFloat16*>(o), N, V, stride,
                    out_stride, lab, lse_p, coef_p, vocab_start, ignore_index);
      break;
    default:  // kHalf
      backward_rows(static_cast<const c10::Half*>(in), static_cast<c10::Half*>(o), N, V, stride, out_stride, lab,
                    lse_p, coef_p, vocab_start, ignore_index);
  }
}

at::Tensor segment_sum_cpu(const at::Tensor& x_in, const at::Tensor& cu_in) {
  TORCH_CHECK(x_in.device().is_cpu() && cu_in.device().is_cpu(), "segment_sum takes CPU tensors");
  TORCH_CHECK(x_in.dim() == 1, "x must be 1-D, got ", x_in.dim(), "-D");
  TORCH_CHECK(cu_in.dim() == 1 && cu_in.size(0) >= 1, "cu_seqlens must be 1-D with at least one entry");
  TORCH_CHECK(cu_in.scalar_type() == at::kLong || cu_in.scalar_type() == at::kInt,
              "cu_seqlens must be int32 or int64, got ", cu_in.scalar_type());
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const at::Tensor cu = cu_in.contiguous();
  const int64_t T = x.size(0), B = cu.size(0) - 1;
  at::Tensor y = at::empty({B}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const Labels bounds(cu);  // same int32/int64 reader
#pragma omp parallel for num_threads(n_threads(T)) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    const int64_t start = std::clamp<int64_t>(bounds[b], 0, T);
    const int64_t end = std::clamp<int64_t>(bounds[b + 1], start, T);
    float s = 0.f;  // sequential: one fixed order, the segment's tokens in index order
    for (int64_t t = start; t < end; ++t) s += xp[t];
    yp[b] = s;
  }
  return y;
}

const char* simd_capability() {
#if defined(CPU_CAPABILITY_AVX512)
  return "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#else
  return "default";
#endif
}

}  // namespace steerlm
