// Selective scan core on CPU, float32, forward and backward, parallel over (batch, channel).
//
//   h[t, n] = exp(dt[t] * A[n]) * h[t-1, n] + dt[t] * u[t] * B[n, t]        (per batch b and channel d)
//   y[t]    = sum_n C[n, t] * h[t, n]
//
// Shapes: u, dt: (Bsz, D, L); A: (D, N); B, C: (Bsz, N, L); y: (Bsz, D, L). The D skip, the z gate, delta_bias
// and softplus stay in PyTorch (O(L·D) elementwise). The backward recomputes the states of one (b, d) row into
// a scratch buffer of L·N floats instead of storing all B·D·L·N of them.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

torch::Tensor scan_forward(torch::Tensor u, torch::Tensor dt, torch::Tensor A, torch::Tensor B, torch::Tensor C) {
  const int64_t bsz = u.size(0), dim = u.size(1), len = u.size(2), n_state = A.size(1);
  auto y = torch::empty_like(u);
  const float *up = u.data_ptr<float>(), *dtp = dt.data_ptr<float>(), *Ap = A.data_ptr<float>();
  const float *Bp = B.data_ptr<float>(), *Cp = C.data_ptr<float>();
  float *yp = y.data_ptr<float>();
  at::parallel_for(0, bsz * dim, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> h(n_state);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / dim, d = row % dim;
      const float *u_r = up + row * len, *dt_r = dtp + row * len, *A_r = Ap + d * n_state;
      const float *B_b = Bp + b * n_state * len, *C_b = Cp + b * n_state * len;
      float *y_r = yp + row * len;
      std::fill(h.begin(), h.end(), 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const float dtv = dt_r[t], x = dtv * u_r[t];
        float acc = 0.f;
        for (int64_t n = 0; n < n_state; ++n) {
          h[n] = std::exp(dtv * A_r[n]) * h[n] + x * B_b[n * len + t];
          acc += h[n] * C_b[n * len + t];
        }
        y_r[t] = acc;
      }
    }
  });
  return y;
}

// Returns (du, ddt, dA, dB, dC). Parallel over the batch: dB and dC of one batch item belong to one thread;
// dA (shared by all items) is summed through per-thread buffers of D·N floats.
std::vector<torch::Tensor> scan_backward(torch::Tensor u, torch::Tensor dt, torch::Tensor A, torch::Tensor B,
                                         torch::Tensor C, torch::Tensor dy) {
  const int64_t bsz = u.size(0), dim = u.size(1), len = u.size(2), n_state = A.size(1);
  const int64_t threads = at::get_num_threads();
  auto du = torch::empty_like(u), ddt = torch::empty_like(dt);
  auto dA_buf = torch::zeros({threads, dim, n_state}, u.options());
  auto dB = torch::zeros_like(B), dC = torch::zeros_like(C);
  const float *up = u.data_ptr<float>(), *dtp = dt.data_ptr<float>(), *Ap = A.data_ptr<float>();
  const float *Bp = B.data_ptr<float>(), *Cp = C.data_ptr<float>(), *dyp = dy.data_ptr<float>();
  float *dup = du.data_ptr<float>(), *ddtp = ddt.data_ptr<float>();
  float *dA_all = dA_buf.data_ptr<float>(), *dB_all = dB.data_ptr<float>(), *dC_all = dC.data_ptr<float>();
  at::parallel_for(0, bsz, 1, [&](int64_t begin, int64_t end) {
    float *dA_t = dA_all + at::get_thread_num() * dim * n_state;
    std::vector<float> h(len * n_state), a(len * n_state), carry(n_state);
    for (int64_t row = begin * dim; row < end * dim; ++row) {
      const int64_t b = row / dim, d = row % dim;
      const float *u_r = up + row * len, *dt_r = dtp + row * len, *A_r = Ap + d * n_state, *dy_r = dyp + row * len;
      const float *B_b = Bp + b * n_state * len, *C_b = Cp + b * n_state * len;
      float *dB_b = dB_all + b * n_state * len, *dC_b = dC_all + b * n_state * len, *dA_d = dA_t + d * n_state;
      for (int64_t t = 0; t < len; ++t) {  // recompute the states of this row
        const float dtv = dt_r[t], x = dtv * u_r[t];
        for (int64_t n = 0; n < n_state; ++n) {
          const float av = std::exp(dtv * A_r[n]);
          const float prev = t > 0 ? h[(t - 1) * n_state + n] : 0.f;
          a[t * n_state + n] = av;
          h[t * n_state + n] = av * prev + x * B_b[n * len + t];
        }
      }
      std::fill(carry.begin(), carry.end(), 0.f);  // carry[n] = a[t+1, n] * g[t+1, n]
      for (int64_t t = len - 1; t >= 0; --t) {
        const float dyv = dy_r[t], dtv = dt_r[t], uv = u_r[t];
        float ddt_acc = 0.f, du_acc = 0.f;
        for (int64_t n = 0; n < n_state; ++n) {
          const float bv = B_b[n * len + t], av = a[t * n_state + n];
          const float g = dyv * C_b[n * len + t] + carry[n];            // dLoss/dh[t, n]
          const float prev = t > 0 ? h[(t - 1) * n_state + n] : 0.f;
          const float g_a = g * prev * av;                              // through a = exp(dt * A)
          dC_b[n * len + t] += dyv * h[t * n_state + n];
          dB_b[n * len + t] += g * dtv * uv;
          dA_d[n] += g_a * dtv;
          ddt_acc += g_a * A_r[n] + g * uv * bv;
          du_acc += g * dtv * bv;
          carry[n] = av * g;
        }
        ddtp[row * len + t] = ddt_acc;
        dup[row * len + t] = du_acc;
      }
    }
  });
  return {du, ddt, dA_buf.sum(0), dB, dC};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &scan_forward, "selective scan core forward (CPU, float32)");
  m.def("backward", &scan_backward, "selective scan core backward (CPU, float32)");
}
