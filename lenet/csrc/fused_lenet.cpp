// Fused LeNet-5 convolution stages for CPU training and inference: "classic" (sigmoid, average pooling) and
// "modern" (batch norm, ReLU, max pooling); augment.affine's resampling; and, at the end of this file,
// lenet5-1998's whole SDLM training step.
//
// Samples are processed in blocks of L (16 with AVX-512, else 8), one sample per SIMD lane (GCC/Clang vector
// extensions), so every loop is the plain scalar convolution with no padding or tail waste in the spatial
// dimensions; blocks run in parallel with OpenMP. The maths is exactly the module's:
//   conv1 (1->6, 5x5, pad 2) + bias -> sigmoid -> 2x2 average pool -> conv2 (6->16, 5x5) + bias -> sigmoid
//   -> 2x2 average pool -> flatten (N, 400) in (channel, row, column) order.
// modern, whose batch norm needs the whole batch's statistics between a convolution and what follows it,
// runs as passes over the batch with the per-channel sums reduced in between (see the modern_* functions):
//   conv1 (1->6, 5x5, pad 2, no bias) -> batch norm -> ReLU -> 2x2 max pool -> conv2 (6->16, 5x5, no bias)
//   -> batch norm -> ReLU -> 2x2 max pool -> flatten (N, 400).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <omp.h>

namespace {

// Samples per block: one per lane of the widest vector the target CPU has (AVX-512: 16 floats).
#if defined(__AVX512F__)
constexpr int L = 16;
#else
constexpr int L = 8;
#endif
typedef float vf __attribute__((vector_size(4 * L)));
typedef int vi __attribute__((vector_size(4 * L)));
typedef float v8 __attribute__((vector_size(32)));  // lenet5-1998's rows
typedef int v8i __attribute__((vector_size(32)));

// Per-block sizes, in vf elements.
constexpr int XP = 32;                      // padded input side: 28 + 2 * 2
constexpr int X_SIZE = XP * XP;             // (32, 32)
constexpr int S1_SIZE = 6 * 28 * 28;        // (6, 28, 28) conv1 activations
constexpr int P1_SIZE = 6 * 14 * 14;        // (6, 14, 14) pool1 output
constexpr int S2_SIZE = 16 * 10 * 10;       // (16, 10, 10) conv2 activations
constexpr int OUT = 16 * 5 * 5;             // 400 features
constexpr int GP = 18;                      // conv2 output gradient padded by 4 on each side
constexpr int W1N = 6 * 25, W2N = 16 * 150;

template <class V, class VI>
inline V vexp(V x) {
  // exp on [-87, 88]: x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial for e^r, 2^n from the exponent bits.
  const V lo = x - x - 87.0f, hi = x - x + 88.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low bits
  V t = x * 1.44269504088896341f + magic;
  V n = t - magic;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = 1.9875691500e-4f + r * 0;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  VI bits = ((VI)t << 23) + (127 << 23);
  return p * (V)bits;
}

inline vf vsigmoid(vf z) { return 1.0f / (1.0f + vexp<vf, vi>(-z)); }

// out[i] = the sum over threads of partial[t * parts + i], in thread order: a given thread count always gives
// the same bits.
template <class T>
void sum_partials(const std::vector<T>& partial, int threads, int parts, T* out) {
  std::fill(out, out + parts, T{});
  for (int t = 0; t < threads; ++t)
    for (int i = 0; i < parts; ++i) out[i] += partial[static_cast<size_t>(t) * parts + i];
}

// (N, 1, 28, 28) floats -> the block's zero-padded (32, 32) lanes; lanes past N stay zero.
void load_input(const float* x, int64_t n0, int64_t n, vf* X) {
  std::fill(X, X + X_SIZE, vf{});
  for (int l = 0; l < L && n0 + l < n; ++l) {
    const float* src = x + (n0 + l) * 784;
    for (int y = 0; y < 28; ++y)
      for (int c = 0; c < 28; ++c) X[(y + 2) * XP + c + 2][l] = src[y * 28 + c];
  }
}

// The block's (400) feature lanes -> rows n0.. of (N, 400) floats; padding lanes are not written.
void store_features(const vf* F, int64_t n0, int64_t n, float* out) {
  for (int l = 0; l < L && n0 + l < n; ++l) {
    float* dst = out + (n0 + l) * OUT;
    for (int j = 0; j < OUT; ++j) dst[j] = F[j][l];
  }
}

// Rows n0.. of (N, 400) floats (feature gradients) -> the block's lanes; lanes past N stay zero.
void load_features(const float* rows, int64_t n0, int64_t n, vf* F) {
  std::fill(F, F + OUT, vf{});
  for (int l = 0; l < L && n0 + l < n; ++l) {
    const float* src = rows + (n0 + l) * OUT;
    for (int j = 0; j < OUT; ++j) F[j][l] = src[j];
  }
}

void pool(const vf* S, int channels, int side, vf* P) {
  const int half = side / 2;
  for (int c = 0; c < channels; ++c)
    for (int py = 0; py < half; ++py)
      for (int px = 0; px < half; ++px) {
        const vf* s = S + (c * side + 2 * py) * side + 2 * px;
        P[(c * half + py) * half + px] = 0.25f * (s[0] + s[1] + s[side] + s[side + 1]);
      }
}

// conv1 (1->6, 5x5, pad 2) of the padded input X with bias b1 (or none), each output as emit(channel,
// index in the (28, 28) map, value): 3 channels x 4 columns of accumulators.
template <class Emit>
void conv1(const vf* X, const float* w1, const float* b1, Emit emit) {
  for (int y = 0; y < 28; ++y)
    for (int x0 = 0; x0 < 28; x0 += 4)
      for (int c0 = 0; c0 < 6; c0 += 3) {
        vf acc[3][4];
        for (int c = 0; c < 3; ++c)
          for (int i = 0; i < 4; ++i) acc[c][i] = vf{} + (b1 ? b1[c0 + c] : 0.0f);
        for (int ky = 0; ky < 5; ++ky) {
          const vf* row = X + (y + ky) * XP + x0;
          for (int kx = 0; kx < 5; ++kx)
            for (int c = 0; c < 3; ++c) {
              const float w = w1[(c0 + c) * 25 + ky * 5 + kx];
              for (int i = 0; i < 4; ++i) acc[c][i] += w * row[i + kx];
            }
        }
        for (int c = 0; c < 3; ++c)
          for (int i = 0; i < 4; ++i) emit(c0 + c, y * 28 + x0 + i, acc[c][i]);
      }
}

// conv2 (6->16, 5x5) of P1 (6, 14, 14) with bias b2 (or none), each output as emit(channel, index in the
// (10, 10) map, value): 2 channels x 5 columns of accumulators.
template <class Emit>
void conv2(const vf* P1, const float* w2, const float* b2, Emit emit) {
  for (int o0 = 0; o0 < 16; o0 += 2)
    for (int y = 0; y < 10; ++y)
      for (int x0 = 0; x0 < 10; x0 += 5) {
        vf acc[2][5];
        for (int o = 0; o < 2; ++o)
          for (int i = 0; i < 5; ++i) acc[o][i] = vf{} + (b2 ? b2[o0 + o] : 0.0f);
        for (int ic = 0; ic < 6; ++ic)
          for (int ky = 0; ky < 5; ++ky) {
            const vf* row = P1 + (ic * 14 + y + ky) * 14 + x0;
            for (int kx = 0; kx < 5; ++kx)
              for (int o = 0; o < 2; ++o) {
                const float w = w2[(o0 + o) * 150 + ic * 25 + ky * 5 + kx];
                for (int i = 0; i < 5; ++i) acc[o][i] += w * row[i + kx];
              }
          }
        for (int o = 0; o < 2; ++o)
          for (int i = 0; i < 5; ++i) emit(o0 + o, y * 10 + x0 + i, acc[o][i]);
      }
}

void forward_block(const vf* X, const float* w1, const float* b1, const float* w2, const float* b2, vf* S1,
                   vf* P1, vf* S2, vf* P2) {
  conv1(X, w1, b1, [&](int c, int i, vf z) { S1[c * 784 + i] = vsigmoid(z); });
  pool(S1, 6, 28, P1);
  conv2(P1, w2, b2, [&](int o, int i, vf z) { S2[o * 100 + i] = vsigmoid(z); });
  pool(S2, 16, 10, P2);
}

// conv2's backward from the gradient at its output, gz2, held in the interior of the zero-bordered
// (16, 18, 18) GZ2P: dw2 += the weight gradient (lane-wise), GP1 = the gradient at its input (6, 14, 14).
void conv2_backward(const vf* GZ2P, const vf* P1, const float* w2, vf* dw2, vf* GP1) {
  // dW2[o][ic][ky][kx] = sum_{y,x} gz2[o][y][x] * p1[ic][y+ky][x+kx]: 2 channels x 5 taps of accumulators.
  for (int o0 = 0; o0 < 16; o0 += 2)
    for (int ic = 0; ic < 6; ++ic)
      for (int ky = 0; ky < 5; ++ky) {
        vf acc[2][5] = {};
        for (int y = 0; y < 10; ++y) {
          const vf* prow = P1 + (ic * 14 + y + ky) * 14;
          const vf* g0 = GZ2P + ((o0 * GP) + y + 4) * GP + 4;
          const vf* g1 = g0 + GP * GP;
          for (int x = 0; x < 10; ++x)
            for (int kx = 0; kx < 5; ++kx) {
              acc[0][kx] += g0[x] * prow[x + kx];
              acc[1][kx] += g1[x] * prow[x + kx];
            }
        }
        for (int o = 0; o < 2; ++o)
          for (int kx = 0; kx < 5; ++kx) dw2[(o0 + o) * 150 + ic * 25 + ky * 5 + kx] += acc[o][kx];
      }
  // d(pool1 output)[ic][py][px] = sum_{o,ky,kx} w2[o][ic][ky][kx] * gz2[o][py-ky][px-kx]; rows outside the
  // gradient are skipped, columns read the zero border. 6 channels x 2 columns of accumulators.
  for (int py = 0; py < 14; ++py) {
    const int ky_lo = std::max(0, py - 9), ky_hi = std::min(4, py);
    for (int px0 = 0; px0 < 14; px0 += 2) {
      vf acc[6][2] = {};
      for (int o = 0; o < 16; ++o)
        for (int ky = ky_lo; ky <= ky_hi; ++ky) {
          const vf* g = GZ2P + (o * GP + py - ky + 4) * GP + px0 + 4;
          const float* w = w2 + o * 150 + ky * 5;
          for (int kx = 0; kx < 5; ++kx)
            for (int ic = 0; ic < 6; ++ic) {
              const float wv = w[ic * 25 + kx];
              acc[ic][0] += wv * g[-kx];
              acc[ic][1] += wv * g[1 - kx];
            }
        }
      for (int ic = 0; ic < 6; ++ic) {
        GP1[(ic * 14 + py) * 14 + px0] = acc[ic][0];
        GP1[(ic * 14 + py) * 14 + px0 + 1] = acc[ic][1];
      }
    }
  }
}

// dw1 += conv1's weight gradient (lane-wise) from the gradient at its output GZ1 (6, 28, 28) and the padded
// input X: dW1[c][ky][kx] = sum_{y,x} gz1[c][y][x] * xpad[y+ky][x+kx], 2 channels x 5 taps of accumulators.
void conv1_weight_grad(const vf* X, const vf* GZ1, vf* dw1) {
  for (int c0 = 0; c0 < 6; c0 += 2)
    for (int ky = 0; ky < 5; ++ky) {
      vf acc[2][5] = {};
      for (int y = 0; y < 28; ++y) {
        const vf* xrow = X + (y + ky) * XP;
        const vf* g0 = GZ1 + (c0 * 28 + y) * 28;
        const vf* g1 = g0 + 28 * 28;
        for (int x = 0; x < 28; ++x)
          for (int kx = 0; kx < 5; ++kx) {
            acc[0][kx] += g0[x] * xrow[x + kx];
            acc[1][kx] += g1[x] * xrow[x + kx];
          }
      }
      for (int c = 0; c < 2; ++c)
        for (int kx = 0; kx < 5; ++kx) dw1[(c0 + c) * 25 + ky * 5 + kx] += acc[c][kx];
    }
}

// Gradients of one block. dw1/db1/dw2/db2 are the thread's lane-wise accumulators.
void backward_block(const vf* X, const vf* S1, const vf* P1, const vf* S2, const vf* G2, const float* w2,
                    vf* GZ2P, vf* GP1, vf* GZ1, vf* dw1, vf* db1, vf* dw2, vf* db2) {
  // d(conv2 pre-activation), written into the interior of the zero-bordered (16, 18, 18) buffer.
  for (int o = 0; o < 16; ++o)
    for (int y = 0; y < 10; ++y)
      for (int x = 0; x < 10; ++x) {
        const vf s = S2[(o * 10 + y) * 10 + x];
        const vf g = 0.25f * G2[o * 25 + (y / 2) * 5 + x / 2] * s * (1.0f - s);
        GZ2P[(o * GP + y + 4) * GP + x + 4] = g;
        db2[o] += g;
      }
  conv2_backward(GZ2P, P1, w2, dw2, GP1);
  // d(conv1 pre-activation).
  for (int c = 0; c < 6; ++c)
    for (int y = 0; y < 28; ++y)
      for (int x = 0; x < 28; ++x) {
        const vf s = S1[(c * 28 + y) * 28 + x];
        const vf g = 0.25f * GP1[(c * 14 + y / 2) * 14 + x / 2] * s * (1.0f - s);
        GZ1[(c * 28 + y) * 28 + x] = g;
        db1[c] += g;
      }
  conv1_weight_grad(X, GZ1, dw1);
}

float lane_sum(vf v) {
  float s = 0;
  for (int l = 0; l < L; ++l) s += v[l];
  return s;
}

}  // namespace

extern "C" {

// 0-2: floats per block of the saved activations s1, p1, s2; 3: floats of the conv gradients; 4: samples
// per block.
int lenet_sizes(int which) {
  const int sizes[] = {S1_SIZE * L, P1_SIZE * L, S2_SIZE * L, W1N + 6 + W2N + 16, L};
  return sizes[which];
}

// x (n, 1, 28, 28) and the contiguous conv parameters -> out (n, 400), plus the activations backward needs:
// s1 (blocks, 6*28*28*L), p1 (blocks, 6*14*14*L), s2 (blocks, 16*10*10*L) with blocks = ceil(n / L).
void lenet_forward(const float* x, int64_t n, const float* w1, const float* b1, const float* w2,
                   const float* b2, float* out, float* s1, float* p1, float* s2, int threads) {
  const int64_t blocks = (n + L - 1) / L;
  vf *s1p = reinterpret_cast<vf*>(s1), *p1p = reinterpret_cast<vf*>(p1), *s2p = reinterpret_cast<vf*>(s2);
#pragma omp parallel num_threads(threads)
  {
    std::vector<vf> X(X_SIZE), P2(OUT);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      load_input(x, b * L, n, X.data());
      forward_block(X.data(), w1, b1, w2, b2, s1p + b * S1_SIZE, p1p + b * P1_SIZE, s2p + b * S2_SIZE,
                    P2.data());
      store_features(P2.data(), b * L, n, out);
    }
  }
}

// Inference: x (n, 1, 28, 28) -> out (n, 400), keeping no activations (one block's scratch per thread).
void lenet_infer(const float* x, int64_t n, const float* w1, const float* b1, const float* w2,
                 const float* b2, float* out, int threads) {
  const int64_t blocks = (n + L - 1) / L;
#pragma omp parallel num_threads(threads)
  {
    std::vector<vf> X(X_SIZE), S1(S1_SIZE), P1(P1_SIZE), S2(S2_SIZE), P2(OUT);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      load_input(x, b * L, n, X.data());
      forward_block(X.data(), w1, b1, w2, b2, S1.data(), P1.data(), S2.data(), P2.data());
      store_features(P2.data(), b * L, n, out);
    }
  }
}

// grad (n, 400) of the features -> grads: w1 (150), b1 (6), w2 (2400), b2 (16) concatenated, overwritten.
void lenet_backward(const float* grad, const float* x, int64_t n, const float* w2, const float* s1,
                    const float* p1, const float* s2, float* grads, int threads) {
  const int64_t blocks = (n + L - 1) / L;
  constexpr int PARTS = W1N + 6 + W2N + 16;
  const vf *s1p = reinterpret_cast<const vf*>(s1), *p1p = reinterpret_cast<const vf*>(p1);
  const vf* s2p = reinterpret_cast<const vf*>(s2);
  std::vector<float> partial(static_cast<size_t>(threads) * PARTS, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    std::vector<vf> X(X_SIZE), G2(OUT), GZ2P(16 * GP * GP), GP1(P1_SIZE), GZ1(S1_SIZE), acc(PARTS);
    vf *dw1 = acc.data(), *db1 = dw1 + W1N, *dw2 = db1 + 6, *db2 = dw2 + W2N;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      load_input(x, b * L, n, X.data());
      load_features(grad, b * L, n, G2.data());
      backward_block(X.data(), s1p + b * S1_SIZE, p1p + b * P1_SIZE, s2p + b * S2_SIZE, G2.data(), w2,
                     GZ2P.data(), GP1.data(), GZ1.data(), dw1, db1, dw2, db2);
    }
    float* mine = partial.data() + static_cast<size_t>(omp_get_thread_num()) * PARTS;
    for (int i = 0; i < PARTS; ++i) mine[i] = lane_sum(acc[i]);
  }
  sum_partials(partial, threads, PARTS, grads);
}

}  // extern "C"


namespace {

// ---- modern ----------------------------------------------------------------------------------------------

// 1.0 in the lanes that hold samples, 0.0 in the padding lanes of the last block.
vf lane_mask(int64_t n0, int64_t n) {
  vf m = {};
  for (int l = 0; l < L && n0 + l < n; ++l) m[l] = 1.0f;
  return m;
}

double lane_sum_d(vf v) {
  double s = 0;
  for (int l = 0; l < L; ++l) s += v[l];
  return s;
}

// conv1 without bias into Z1 (6, 28, 28); per-channel sum and sum of squares added to stats[0..5], [6..11].
// Padding lanes hold zero input, so zero output: they add nothing.
void modern_conv1_block(const vf* X, const float* w1, vf* Z1, double* stats) {
  vf sum[6] = {}, sq[6] = {};
  conv1(X, w1, nullptr, [&](int c, int i, vf z) {
    Z1[c * 784 + i] = z;
    sum[c] += z;
    sq[c] += z * z;
  });
  for (int c = 0; c < 6; ++c) {
    stats[c] += lane_sum_d(sum[c]);
    stats[6 + c] += lane_sum_d(sq[c]);
  }
}

// y = z * scale + shift, ReLU, 2x2 max pool: Z (channels, side, side) -> P (channels, side/2, side/2).
void bn_relu_maxpool(const vf* Z, const float* scale, const float* shift, int channels, int side, vf* P) {
  const int half = side / 2;
  for (int c = 0; c < channels; ++c) {
    const vf s = vf{} + scale[c], t = vf{} + shift[c];
    for (int py = 0; py < half; ++py)
      for (int px = 0; px < half; ++px) {
        const vf* z = Z + (c * side + 2 * py) * side + 2 * px;
        vf m = z[0] * s + t, v;
        v = z[1] * s + t, m = v > m ? v : m;
        v = z[side] * s + t, m = v > m ? v : m;
        v = z[side + 1] * s + t, m = v > m ? v : m;
        P[(c * half + py) * half + px] = m > 0.0f ? m : vf{};
      }
  }
}

// The inverse route of bn_relu_maxpool: each pooled gradient G goes to the first maximum of its 2x2 window
// (as PyTorch's max pool picks it) when that maximum is positive (ReLU), into DY (channels, side, side),
// zero elsewhere. sums[c] += sum of dy, sums[channels + c] += sum of dy * z.
void maxpool_relu_backward(const vf* G, const vf* Z, const float* scale, const float* shift, int channels,
                           int side, vf* DY, double* sums) {
  const int half = side / 2;
  for (int c = 0; c < channels; ++c) {
    const vf s = vf{} + scale[c], t = vf{} + shift[c];
    vf sum_dy = {}, sum_dyz = {};
    for (int py = 0; py < half; ++py)
      for (int px = 0; px < half; ++px) {
        const int base = (c * side + 2 * py) * side + 2 * px;
        const int offsets[4] = {0, 1, side, side + 1};
        vf m = Z[base] * s + t;
        vi pick = {};  // 0..3: which of the four holds the first maximum
        for (int k = 1; k < 4; ++k) {
          const vf v = Z[base + offsets[k]] * s + t;
          const vi greater = v > m;
          m = greater ? v : m;
          pick = greater ? (vi{} + k) : pick;
        }
        const vf g = m > 0.0f ? G[(c * half + py) * half + px] : vf{};
        for (int k = 0; k < 4; ++k) {
          const vf dy = pick == k ? g : vf{};
          DY[base + offsets[k]] = dy;
          sum_dy += dy;
          sum_dyz += dy * Z[base + offsets[k]];
        }
      }
    sums[c] += lane_sum_d(sum_dy);
    sums[channels + c] += lane_sum_d(sum_dyz);
  }
}

}  // namespace

extern "C" {

// Forward pass 1: x (n, 1, 28, 28) -> z1 (blocks, 6*28*28*L); stats (12 doubles): sums, sums of squares.
void modern_conv1(const float* x, int64_t n, const float* w1, float* z1, double* stats, int threads) {
  const int64_t blocks = (n + L - 1) / L;
  std::vector<double> partial(static_cast<size_t>(threads) * 12, 0.0);
#pragma omp parallel num_threads(threads)
  {
    std::vector<vf> X(X_SIZE);
    double* mine = partial.data() + static_cast<size_t>(omp_get_thread_num()) * 12;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      load_input(x, b * L, n, X.data());
      modern_conv1_block(X.data(), w1, reinterpret_cast<vf*>(z1) + b * S1_SIZE, mine);
    }
  }
  sum_partials(partial, threads, 12, stats);
}

// Forward pass 2: z1 -> batch norm 1 (as scale, shift), ReLU, max pool -> p1 (kept for backward) -> conv2
// without bias -> z2 (blocks, 16*10*10*L); stats (32 doubles): sums, sums of squares over real samples.
void modern_conv2(const float* z1, int64_t n, const float* scale1, const float* shift1, const float* w2,
                  float* p1, float* z2, double* stats, int threads) {
  const int64_t blocks = (n + L - 1) / L;
  std::vector<double> partial(static_cast<size_t>(threads) * 32, 0.0);
#pragma omp parallel num_threads(threads)
  {
    double* mine = partial.data() + static_cast<size_t>(omp_get_thread_num()) * 32;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      vf* P1 = reinterpret_cast<vf*>(p1) + b * P1_SIZE;
      vf* Z2 = reinterpret_cast<vf*>(z2) + b * S2_SIZE;
      bn_relu_maxpool(reinterpret_cast<const vf*>(z1) + b * S1_SIZE, scale1, shift1, 6, 28, P1);
      const vf valid = lane_mask(b * L, n);  // padding lanes pool to max(shift, 0): keep them out of stats
      vf sum[16] = {}, sq[16] = {};
      conv2(P1, w2, nullptr, [&](int o, int i, vf z) {
        Z2[o * 100 + i] = z;
        z *= valid;
        sum[o] += z;
        sq[o] += z * z;
      });
      for (int o = 0; o < 16; ++o) {
        mine[o] += lane_sum_d(sum[o]);
        mine[16 + o] += lane_sum_d(sq[o]);
      }
    }
  }
  sum_partials(partial, threads, 32, stats);
}

// Forward pass 3: z2 -> batch norm 2 (scale, shift), ReLU, max pool -> out (n, 400).
void modern_pool2(const float* z2, int64_t n, const float* scale2, const float* shift2, float* out,
                  int threads) {
  const int64_t blocks = (n + L - 1) / L;
#pragma omp parallel num_threads(threads)
  {
    std::vector<vf> P2(OUT);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      bn_relu_maxpool(reinterpret_cast<const vf*>(z2) + b * S2_SIZE, scale2, shift2, 16, 10, P2.data());
      store_features(P2.data(), b * L, n, out);
    }
  }
}

// Inference (eval mode): x (n, 1, 28, 28) -> out (n, 400), each batch norm given as the per-channel scale
// and shift its running statistics make of it; one block's scratch per thread, no activations kept.
void modern_infer(const float* x, int64_t n, const float* w1, const float* scale1, const float* shift1,
                  const float* w2, const float* scale2, const float* shift2, float* out, int threads) {
  const int64_t blocks = (n + L - 1) / L;
#pragma omp parallel num_threads(threads)
  {
    std::vector<vf> X(X_SIZE), Z1(S1_SIZE), P1(P1_SIZE), Z2(S2_SIZE), P2(OUT);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      load_input(x, b * L, n, X.data());
      conv1(X.data(), w1, nullptr, [&](int c, int i, vf z) { Z1[c * 784 + i] = z; });
      bn_relu_maxpool(Z1.data(), scale1, shift1, 6, 28, P1.data());
      conv2(P1.data(), w2, nullptr, [&](int o, int i, vf z) { Z2[o * 100 + i] = z; });
      bn_relu_maxpool(Z2.data(), scale2, shift2, 16, 10, P2.data());
      store_features(P2.data(), b * L, n, out);
    }
  }
}

// Backward pass 1: grad (n, 400) -> dy2 (blocks, 16*10*10*L), the gradient at batch norm 2's output;
// sums (32 doubles): per channel sum of dy and of dy * z2.
void modern_back_pool2(const float* grad, int64_t n, const float* z2, const float* scale2,
                       const float* shift2, float* dy2, double* sums, int threads) {
  const int64_t blocks = (n + L - 1) / L;
  std::vector<double> partial(static_cast<size_t>(threads) * 32, 0.0);
#pragma omp parallel num_threads(threads)
  {
    std::vector<vf> G(OUT);
    double* mine = partial.data() + static_cast<size_t>(omp_get_thread_num()) * 32;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      load_features(grad, b * L, n, G.data());
      maxpool_relu_backward(G.data(), reinterpret_cast<const vf*>(z2) + b * S2_SIZE, scale2, shift2, 16, 10,
                            reinterpret_cast<vf*>(dy2) + b * S2_SIZE, mine);
    }
  }
  sum_partials(partial, threads, 32, sums);
}

// Backward pass 2: dz2 = a * dy2 + bz * z2 + c per channel (coef2: a[16], bz[16], c[16], batch norm 2's
// backward) -> dw2 (2400, overwritten), and through conv2, max pool 1 and ReLU to dy1 (blocks, 6*28*28*L);
// sums1 (12 doubles): per channel sum of dy1 and of dy1 * z1.
void modern_back_conv2(const float* dy2, int64_t n, const float* z2, const float* coef2, const float* p1,
                       const float* w2, const float* z1, const float* scale1, const float* shift1, float* dy1,
                       float* dw2, double* sums1, int threads) {
  const int64_t blocks = (n + L - 1) / L;
  std::vector<float> partial_w(static_cast<size_t>(threads) * W2N, 0.0f);
  std::vector<double> partial_s(static_cast<size_t>(threads) * 12, 0.0);
#pragma omp parallel num_threads(threads)
  {
    std::vector<vf> GZ2P(16 * GP * GP), GP1(P1_SIZE), acc_w(W2N);
    double* mine = partial_s.data() + static_cast<size_t>(omp_get_thread_num()) * 12;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const vf* DY2 = reinterpret_cast<const vf*>(dy2) + b * S2_SIZE;
      const vf* Z2 = reinterpret_cast<const vf*>(z2) + b * S2_SIZE;
      const vf* P1 = reinterpret_cast<const vf*>(p1) + b * P1_SIZE;
      const vf valid = lane_mask(b * L, n);
      for (int o = 0; o < 16; ++o) {
        const float a = coef2[o], bz = coef2[16 + o], c = coef2[32 + o];
        for (int y = 0; y < 10; ++y)
          for (int x = 0; x < 10; ++x) {
            const int i = (o * 10 + y) * 10 + x;
            GZ2P[(o * GP + y + 4) * GP + x + 4] = (a * DY2[i] + bz * Z2[i] + c) * valid;
          }
      }
      conv2_backward(GZ2P.data(), P1, w2, acc_w.data(), GP1.data());
      maxpool_relu_backward(GP1.data(), reinterpret_cast<const vf*>(z1) + b * S1_SIZE, scale1, shift1, 6, 28,
                            reinterpret_cast<vf*>(dy1) + b * S1_SIZE, mine);
    }
    float* mine_w = partial_w.data() + static_cast<size_t>(omp_get_thread_num()) * W2N;
    for (int i = 0; i < W2N; ++i) mine_w[i] = lane_sum(acc_w[i]);
  }
  sum_partials(partial_w, threads, W2N, dw2);
  sum_partials(partial_s, threads, 12, sums1);
}

// Backward pass 3: dz1 = a * dy1 + bz * z1 + c per channel (coef1: a[6], bz[6], c[6]) -> dw1 (150,
// overwritten). Padding lanes hold zero input, so they add nothing.
void modern_back_conv1(const float* dy1, const float* x, int64_t n, const float* z1, const float* coef1,
                       float* dw1, int threads) {
  const int64_t blocks = (n + L - 1) / L;
  std::vector<float> partial(static_cast<size_t>(threads) * W1N, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    std::vector<vf> X(X_SIZE), GZ1(S1_SIZE), acc_w(W1N);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      load_input(x, b * L, n, X.data());
      const vf* DY1 = reinterpret_cast<const vf*>(dy1) + b * S1_SIZE;
      const vf* Z1 = reinterpret_cast<const vf*>(z1) + b * S1_SIZE;
      for (int c = 0; c < 6; ++c) {
        const float a = coef1[c], bz = coef1[6 + c], k = coef1[12 + c];
        for (int i = c * 784; i < (c + 1) * 784; ++i) GZ1[i] = a * DY1[i] + bz * Z1[i] + k;
      }
      conv1_weight_grad(X.data(), GZ1.data(), acc_w.data());
    }
    float* mine = partial.data() + static_cast<size_t>(omp_get_thread_num()) * W1N;
    for (int i = 0; i < W1N; ++i) mine[i] = lane_sum(acc_w[i]);
  }
  sum_partials(partial, threads, W1N, dw1);
}

}  // extern "C"

// ---- peak arithmetic rate --------------------------------------------------------------------------------

extern "C" {

// FLOPs per second of independent multiply-adds on full vectors (12 chains per thread, enough to fill the
// pipelines), over `rounds` rounds on `threads` threads: the rate the kernels' arithmetic can approach.
double lenet_fma_rate(int64_t rounds, int threads) {
  constexpr int CHAINS = 12;
  float sink = 0.0f;
  const double started = omp_get_wtime();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
  {
    vf acc[CHAINS];
    for (int i = 0; i < CHAINS; ++i) acc[i] = vf{} + (1.0f + i * 1e-3f);
    const vf scale = vf{} + 0.999999f, step = vf{} + 1e-6f;
    for (int64_t r = 0; r < rounds; ++r)
      for (int i = 0; i < CHAINS; ++i) acc[i] = acc[i] * scale + step;
    for (int i = 0; i < CHAINS; ++i) sink += acc[i][0];
  }
  const double seconds = omp_get_wtime() - started;
  return sink == 0.0f ? 0.0 : 2.0 * L * CHAINS * rounds * threads / seconds;  // sink keeps the loop alive
}

}  // extern "C"

// ---- affine distortions ---------------------------------------------------------------------------------

extern "C" {

// augment.affine's resampling: images (n, h, w) uint8 -> out (n, h, w) floats in [0, 255]. Output pixel
// (i, j), at normalised centre (px, py), reads the input bilinearly at normalised (c0 (px - c3) + c1 (py -
// c4), c2 (py - c4)), coef (n, 5) holding c0..c4 per image; inputs outside the image read 0. That is
// grid_sample's bilinear, zero-padded, align_corners=False sampling. The source row depends on i alone, so
// each output row blends two input rows first, then samples along the blend. Rows and columns carry a zero
// border of 2 pixels: a coordinate clamped into the border reads zeros only, so no tap needs a test, and
// coordinates offset by 2 are non-negative, so truncation is floor.
void affine_warp(const uint8_t* images, int64_t n, int h, int w, const float* coef, float* out, int threads) {
  const int pw = w + 4;
  const float hf = h, wf = w;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> padded(static_cast<size_t>(h + 4) * pw, 0.0f), blend(pw);
#pragma omp for schedule(static)
    for (int64_t k = 0; k < n; ++k) {
      const uint8_t* src = images + k * h * w;
      for (int y = 0; y < h; ++y)
        for (int x = 0; x < w; ++x) padded[(y + 2) * pw + x + 2] = src[y * w + x];
      const float* c = coef + k * 5;
      float* dst = out + k * h * w;
      for (int i = 0; i < h; ++i) {
        const float ys = (i * 2 + 1) / hf - 1 - c[4];
        const float iy = std::min(std::max(((c[2] * ys + 1) * hf - 1) / 2, -2.0f), hf) + 2;
        const int y0 = static_cast<int>(iy);
        const float fy = iy - y0;
        const float *top = padded.data() + y0 * pw, *bottom = top + pw;
        for (int x = 0; x < pw; ++x) blend[x] = top[x] * (1 - fy) + bottom[x] * fy;
        for (int j = 0; j < w; ++j) {
          const float xs = (j * 2 + 1) / wf - 1 - c[3];
          const float ix = std::min(std::max(((c[0] * xs + c[1] * ys + 1) * wf - 1) / 2, -2.0f), wf) + 2;
          const int x0 = static_cast<int>(ix);
          const float fx = ix - x0;
          dst[i * w + j] = std::min(std::max(blend[x0] * (1 - fx) + blend[x0 + 1] * fx, 0.0f), 255.0f);
        }
      }
    }
  }
}

}  // extern "C"

// lenet5-1998 trained by stochastic diagonal Levenberg-Marquardt, as the 1998 paper trains it: after every
// group of B samples (B = 1 in the paper), w -= lr * scale * (sum of the group's dE/dw), scale =
// 1 / (B mu + h) fixed for a pass. One sample is too small to split across lanes or threads; the loops run
// along image rows instead.
//   pad to 32x32 -> C1 6@5x5 -> S2 (2x2 sum * coefficient + bias) -> C3 16@5x5 on Table I's 60 kernels
//   -> S4 -> C5 120 on 400 -> F6 84 -> 10 RBF penalties y; loss E = y_D + log(exp(-j) + sum exp(-y_i));
//   every layer from C1 to F6 squashes with x = A tanh(S a).
namespace {

constexpr float SQ_A = 1.7159f, SQ_S = 2.0f / 3.0f;
constexpr int LENET5_TENSORS = 12;
// elements of c1.weight, c1.bias, s2.weight, s2.bias, c3.weight, c3.bias, s4.weight, s4.bias, c5.weight,
// c5.bias, f6.weight, f6.bias
constexpr int LENET5_SIZES[LENET5_TENSORS] = {150, 6, 6, 6, 1500, 16, 16, 16, 48000, 120, 10080, 84};

// a -> A tanh(S a) in place, n a multiple of 8 (tanh(z) = 1 - 2 / (exp(2z) + 1)).
void squash(float* a, int n) {
  for (int i = 0; i < n; i += 8) {
    v8 z;
    __builtin_memcpy(&z, a + i, sizeof z);
    z = SQ_A * (1.0f - 2.0f / (vexp<v8, v8i>(z * (2.0f * SQ_S)) + 1.0f));
    __builtin_memcpy(a + i, &z, sizeof z);
  }
}

inline float slope(float x) { return SQ_S * (SQ_A - x * x / SQ_A); }  // f'(a) from x = f(a)

// Subsampling: sums (maps, side/2, side/2) of the 2x2 blocks of x (maps, side, side), out = w * sums + b.
void subsample(const float* x, int maps, int side, const float* w, const float* b, float* sums, float* out) {
  const int half = side / 2;
  for (int m = 0; m < maps; ++m)
    for (int y = 0; y < half; ++y)
      for (int c = 0; c < half; ++c) {
        const float* p = x + (m * side + 2 * y) * side + 2 * c;
        const float s = p[0] + p[1] + p[side] + p[side + 1];
        sums[(m * half + y) * half + c] = s;
        out[(m * half + y) * half + c] = w[m] * s + b[m];
      }
}

// Backward of a subsampling layer: g (maps, half, half) is dE/da of its outputs. Writes dE/dx of its input
// (maps, side, side) into dx and adds the gradients of w and b to gw and gb.
void subsample_backward(const float* g, const float* sums, int maps, int side, const float* w, float* dx,
                        float* gw, float* gb) {
  const int half = side / 2;
  for (int m = 0; m < maps; ++m)
    for (int y = 0; y < half; ++y)
      for (int c = 0; c < half; ++c) {
        const float gi = g[(m * half + y) * half + c];
        gw[m] += gi * sums[(m * half + y) * half + c];
        gb[m] += gi;
        float* d = dx + (m * side + 2 * y) * side + 2 * c;
        d[0] = d[1] = d[side] = d[side + 1] = gi * w[m];
      }
}

// dst (out, out) += the valid 5x5 correlation of src (side, side) with kernel k (5, 5), out = side - 4.
void correlate_add(const float* src, int side, const float* k, float* dst) {
  const int out = side - 4;
  for (int ky = 0; ky < 5; ++ky)
    for (int kx = 0; kx < 5; ++kx) {
      const float w = k[ky * 5 + kx];
      for (int y = 0; y < out; ++y) {
        const float* row = src + (y + ky) * side + kx;
        float* d = dst + y * out;
#pragma omp simd
        for (int c = 0; c < out; ++c) d[c] += w * row[c];
      }
    }
}

void dense(const float* x, int out, int in, const float* w, const float* b, float* a) {
  for (int o = 0; o < out; ++o) {
    const float* row = w + o * in;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int k = 0; k < in; ++k) s += row[k] * x[k];
    a[o] = s + b[o];
  }
}

// Backward of a fully connected layer: g (out) is dE/da. Adds W^T g into dx (in) and the gradients of w and
// b to gw and gb.
void dense_backward(const float* g, const float* x, int out, int in, const float* w, float* dx, float* gw,
                    float* gb) {
  for (int o = 0; o < out; ++o) {
    const float* row = w + o * in;
    float* grow = gw + o * in;
    const float go = g[o];
#pragma omp simd
    for (int k = 0; k < in; ++k) {
      dx[k] += row[k] * go;
      grow[k] += go * x[k];
    }
    gb[o] += go;
  }
}

}  // namespace

extern "C" {

// n samples x (n, 28, 28), normalised, labels (n); n a multiple of group. p: the 12 parameter tensors of
// lenet5-1998 in model order (c1.weight, c1.bias, s2.weight, s2.bias, c3.weight (60, 5, 5), c3.bias,
// s4.weight, s4.bias, c5.weight, c5.bias, f6.weight, f6.bias), updated in place after every group of
// samples; s: their step scales, g: gradient sums (zero on entry, left zero), both of the same shapes.
// pairs: C3's 60 (output map, input map) pairs in c3.weight's order. centres (10, 84). Writes the outputs
// -y (n, 10) and the loss (n) of each sample.
void lenet5_sdlm_train(const float* x, const int64_t* labels, int64_t n, int64_t group, float* const* p,
                       const float* const* s, float* const* g, const int32_t* pairs, const float* centres,
                       float lr, float pad, float j, float* outputs, float* losses) {
  const float *w1 = p[0], *b1 = p[1], *w2 = p[2], *b2 = p[3], *w3 = p[4], *b3 = p[5];
  const float *w4 = p[6], *b4 = p[7], *w5 = p[8], *b5 = p[9], *w6 = p[10], *b6 = p[11];
  alignas(32) float in[32 * 32], x1[6 * 784], sum1[6 * 196], x2[6 * 196], x3[1600], sum3[400], x4[400];
  alignas(32) float x5[120], x6[88], d1[6 * 784], d2[6 * 196], d3[1600], d4[400], d5[120], d6[84];
  for (int64_t t = 0; t < n; ++t) {
    std::fill(in, in + 1024, pad);
    for (int y = 0; y < 28; ++y)
      for (int c = 0; c < 28; ++c) in[(y + 2) * 32 + c + 2] = x[t * 784 + y * 28 + c];

    // forward
    for (int o = 0; o < 6; ++o) {
      std::fill(x1 + o * 784, x1 + (o + 1) * 784, b1[o]);
      correlate_add(in, 32, w1 + o * 25, x1 + o * 784);
    }
    squash(x1, 6 * 784);  // (6, 28, 28)
    subsample(x1, 6, 28, w2, b2, sum1, x2);
    squash(x2, 6 * 196);  // (6, 14, 14)
    for (int o = 0; o < 16; ++o) std::fill(x3 + o * 100, x3 + (o + 1) * 100, b3[o]);
    for (int k = 0; k < 60; ++k)  // kernel k reads S2 map pairs[2k + 1] into C3 map pairs[2k]
      correlate_add(x2 + pairs[2 * k + 1] * 196, 14, w3 + k * 25, x3 + pairs[2 * k] * 100);
    squash(x3, 1600);  // (16, 10, 10)
    subsample(x3, 16, 10, w4, b4, sum3, x4);
    squash(x4, 400);  // (16, 5, 5): C5's 5x5 kernels cover it whole, so C5 is a dense 400 -> 120 layer
    dense(x4, 120, 400, w5, b5, x5);
    squash(x5, 120);
    std::fill(x6, x6 + 88, 0.0f);
    dense(x5, 84, 120, w6, b6, x6);
    squash(x6, 88);

    // RBF penalties and the MAP loss: cross-entropy over the logits -y and a rubbish class at -j
    float z[11], e[11];
    for (int c = 0; c < 10; ++c) {
      float y = 0.0f;
      for (int i = 0; i < 84; ++i) y += (x6[i] - centres[c * 84 + i]) * (x6[i] - centres[c * 84 + i]);
      z[c] = -y;
      outputs[t * 10 + c] = -y;
    }
    z[10] = -j;
    const float top = *std::max_element(z, z + 11);
    float total = 0.0f;
    for (int c = 0; c < 11; ++c) total += e[c] = std::exp(z[c] - top);
    const int64_t label = labels[t];
    losses[t] = top + std::log(total) - z[label];

    // backward, d* = dE/da of each layer: dE/dy_c = [c == label] - p_c,
    // dE/dx6_i = sum_c dE/dy_c 2 (x6_i - w_ci)
    for (int i = 0; i < 84; ++i) {
      float d = 0.0f;
      for (int c = 0; c < 10; ++c) d += ((c == label) - e[c] / total) * 2.0f * (x6[i] - centres[c * 84 + i]);
      d6[i] = d * slope(x6[i]);
    }
    std::fill(d5, d5 + 120, 0.0f);
    dense_backward(d6, x5, 84, 120, w6, d5, g[10], g[11]);
    for (int i = 0; i < 120; ++i) d5[i] *= slope(x5[i]);
    std::fill(d4, d4 + 400, 0.0f);
    dense_backward(d5, x4, 120, 400, w5, d4, g[8], g[9]);
    for (int i = 0; i < 400; ++i) d4[i] *= slope(x4[i]);
    subsample_backward(d4, sum3, 16, 10, w4, d3, g[6], g[7]);
    for (int i = 0; i < 1600; ++i) d3[i] *= slope(x3[i]);
    for (int o = 0; o < 16; ++o)
      for (int i = 0; i < 100; ++i) g[5][o] += d3[o * 100 + i];
    std::fill(d2, d2 + 6 * 196, 0.0f);
    for (int k = 0; k < 60; ++k) {
      const float* src = x2 + pairs[2 * k + 1] * 196;
      float* dsrc = d2 + pairs[2 * k + 1] * 196;
      const float* dk = d3 + pairs[2 * k] * 100;
      for (int ky = 0; ky < 5; ++ky)
        for (int kx = 0; kx < 5; ++kx) {
          const float w = w3[k * 25 + ky * 5 + kx];
          float gw = 0.0f;
          for (int y = 0; y < 10; ++y) {
            const float* row = src + (y + ky) * 14 + kx;
            float* drow = dsrc + (y + ky) * 14 + kx;
#pragma omp simd reduction(+ : gw)
            for (int c = 0; c < 10; ++c) {
              gw += dk[y * 10 + c] * row[c];
              drow[c] += w * dk[y * 10 + c];
            }
          }
          g[4][k * 25 + ky * 5 + kx] += gw;
        }
    }
    for (int i = 0; i < 6 * 196; ++i) d2[i] *= slope(x2[i]);
    subsample_backward(d2, sum1, 6, 28, w2, d1, g[2], g[3]);
    for (int i = 0; i < 6 * 784; ++i) d1[i] *= slope(x1[i]);
    for (int o = 0; o < 6; ++o) {
      const float* dk = d1 + o * 784;
      for (int i = 0; i < 784; ++i) g[1][o] += dk[i];
      for (int ky = 0; ky < 5; ++ky)
        for (int kx = 0; kx < 5; ++kx) {
          float gw = 0.0f;
          for (int y = 0; y < 28; ++y) {
            const float* row = in + (y + ky) * 32 + kx;
#pragma omp simd reduction(+ : gw)
            for (int c = 0; c < 28; ++c) gw += dk[y * 28 + c] * row[c];
          }
          g[0][o * 25 + ky * 5 + kx] += gw;
        }
    }

    if ((t + 1) % group == 0)  // the group's update, and its gradient sums back to zero
      for (int i = 0; i < LENET5_TENSORS; ++i)
#pragma omp simd
        for (int k = 0; k < LENET5_SIZES[i]; ++k) {
          p[i][k] -= lr * s[i][k] * g[i][k];
          g[i][k] = 0.0f;
        }
  }
}

}  // extern "C"

// ---- The reader's search for cuts (read.py's _cheapest, whose numpy code is the reference) ----

extern "C" {

// The cheapest paths from the top row of each cost (n, h, w) to each pixel, stepping down a row or sideways
// a column at a time, paying each pixel entered and `straight` per sideways step: totals (n, h, w) and
// came (n, h, w), the column at which each path entered its last row. The same arithmetic in the same
// order as the numpy code, so the same doubles: per row, a walk rightwards and one leftwards (on the
// mirrored row) from each column entered from above, the cheaper of the two kept.
void cheapest_paths(const double* cost, int64_t n, int64_t h, int64_t w, double straight, double* totals,
                    int64_t* came) {
  std::vector<double> above(w), via[2] = {std::vector<double>(w), std::vector<double>(w)};
  std::vector<int64_t> start[2] = {std::vector<int64_t>(w), std::vector<int64_t>(w)};
  for (int64_t k = 0; k < n; ++k) {
    std::fill(above.begin(), above.end(), 0.0);
    for (int64_t y = 0; y < h; ++y) {
      const double* row = cost + (k * h + y) * w;
      for (int d = 0; d < 2; ++d) {  // d = 1: the row mirrored, x' = w - 1 - x
        double sum = 0.0, best = 0.0;
        int64_t from = 0;
        for (int64_t i = 0; i < w; ++i) {
          const int64_t x = d ? w - 1 - i : i;
          sum += row[x] + straight;  // the prefix sum of the sideways steps
          const double arriving = (above[x] + row[x]) - sum;
          if (i == 0 || arriving < best) best = arriving;
          if (arriving == best) from = i;  // the last column as cheap as the best so far
          via[d][i] = best + sum;
          start[d][i] = from;
        }
      }
      double* total = totals + (k * h + y) * w;
      int64_t* entered = came + (k * h + y) * w;
      for (int64_t x = 0; x < w; ++x) {
        const double right = via[0][x], left = via[1][w - 1 - x];
        total[x] = std::min(right, left);
        entered[x] = right <= left ? start[0][x] : w - 1 - start[1][w - 1 - x];
      }
      std::copy(total, total + w, above.begin());
    }
  }
}

}  // extern "C"
