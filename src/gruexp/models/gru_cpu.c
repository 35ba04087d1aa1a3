/* The fused GRU recurrence on the CPU: nn.GRU's reset-after cell over T steps, forward and backward.
 *
 * Compiled on first use by gruexp/models/gru_cpu.py, twice: REAL=float (training) and REAL=double (gradcheck).
 * Python keeps everything that is not sequential (the input projection or table before the loop, the weight
 * gradients after it); here is only what must run step by step:
 *
 *   forward   g = h_{t-1} W_hh^T                                   one product per step
 *             r = s(gi_r + g_r + b_hr), z = s(gi_z + g_z + b_hz)    one pass over the gates, fused
 *             n = tanh(gi_n + r * (g_n + b_hn)), h_t = n + z * (h_{t-1} - n)
 *   backward  dG = [da_r, da_z, r * da_n] from dh_t                 one pass, fused
 *             dh_{t-1} = dy_{t-1} + z * dh_t + dG W_hh             one product per step
 *
 * Threads split the hidden units, as a persistent RNN does: thread q owns units [j0, j0 + nu), computes their
 * r, z and n pre-activations for the whole batch with its own slice of W_hh (in its core's cache when it fits),
 * and meets the others at one barrier per step, where h_t (forward) or dG (backward) is complete. Inside the
 * parallel region each GEMM is single-threaded. The GEMM is the BLAS that PyTorch itself calls (MKL's
 * sgemm_/dgemm_ in libtorch_cpu), passed in by pointer, so the products round as torch.mm's do.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SUFFIX)

typedef void (*gemm_t)(const char *transa, const char *transb, const int *m, const int *n, const int *k,
                       const REAL *alpha, const REAL *a, const int *lda, const REAL *b, const int *ldb,
                       const REAL *beta, REAL *c, const int *ldc);

static gemm_t gemm;

void FN(gru_set_gemm)(void *fn) { gemm = (gemm_t)fn; }

/* Row-major C[m x n] = A[m x k] B^T (B is [n x k]) + beta C, through the column-major BLAS: C^T = B A^T. */
static void gemm_abt(int m, int n, int k, const REAL *A, int lda, const REAL *B, int ldb, REAL beta, REAL *C,
                     int ldc) {
    const REAL one = 1;
    gemm("T", "N", &n, &m, &k, &one, B, &ldb, A, &lda, &beta, C, &ldc);
}

/* Row-major C[m x n] = A[m x k] B (B is [k x n]) + beta C: C^T = B^T A^T. */
static void gemm_ab(int m, int n, int k, const REAL *A, int lda, const REAL *B, int ldb, REAL beta, REAL *C,
                    int ldc) {
    const REAL one = 1;
    gemm("N", "N", &n, &m, &k, &one, B, &ldb, A, &lda, &beta, C, &ldc);
}

#if IS_DOUBLE
static inline REAL sigmoid(REAL x) { return 1 / (1 + exp(-x)); }
static inline REAL tanh_(REAL x) { return tanh(x); }
#else
/* exp, sigmoid and tanh in float with no branches and no libm calls, so that gcc vectorises the gate loops.
 * exp: Cephes' expf (range reduction by ln 2, degree-5 polynomial, 2^k from the exponent bits), within 2 ulp;
 * tanh: Cephes' odd polynomial below |x| = 0.625, 1 - 2 / (e^{2|x|} + 1) above, within a few ulp. */
static inline float exp_(float x) {
    x = x < -87.3f ? -87.3f : x > 88.7f ? 88.7f : x;
    float k = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int bits = ((int)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}
static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_(-x)); }
static inline float tanh_(float x) {
    float a = fabsf(x), x2 = x * x;
    float p = -5.70498872745e-3f;
    p = p * x2 + 2.06390887954e-2f;
    p = p * x2 - 5.37397155531e-2f;
    p = p * x2 + 1.33314422036e-1f;
    p = p * x2 - 3.33332819422e-1f;
    float small = x + x * x2 * p;
    float big = copysignf(1.0f - 2.0f / (exp_(2.0f * a) + 1.0f), x);
    return a < 0.625f ? small : big;
}
#endif

/* Thread q of P owns units [*j0, *j0 + *nu): an even share, cut at multiples of 16 (a cache line, a SIMD
 * register) where H allows. */
static void units(int H, int q, int P, int *j0, int *nu) {
    int step = H >= 16 * P ? 16 : 1, n = H / step;
    *j0 = (int)((long)n * q / P) * step;
    *nu = (q == P - 1 ? H : (int)((long)n * (q + 1) / P) * step) - *j0;
}

/* hs[0] = h0 on entry; fills hs[1..T] ([T+1, B, H]). gi is x W_ih^T + b_ih, [T, B, 3H]; with tok ([T, B]
 * token ids) it is the table [V, 3H] whose row tok[t, b] is that input (layer 0: a one-hot x picks a row).
 * With G and N (training) it keeps, per step, G = [r, z, g_n + b_hn] ([T, B, 3H]) and N = n ([T, B, H]) for the
 * backward; with G = N = NULL it keeps nothing. */
static void forward_units(int q, int P, int T, int B, int H, const REAL *gi, const int64_t *tok, const REAL *w_hh,
                          const REAL *b_hh, REAL *hs, REAL *G, REAL *N) {
    const size_t H3 = 3 * (size_t)H;
    int j0, nu;
    units(H, q, P, &j0, &nu);
    const int nu3 = 3 * nu;
    REAL *g = malloc(sizeof(REAL) * B * (nu3 + nu));
    const REAL *br = b_hh + j0, *bz = br + H, *bn = bz + H;
    for (int t = 0; t < T; t++) {
        const REAL *h_prev = hs + (size_t)t * B * H;
        REAL *h = hs + (size_t)(t + 1) * B * H;
        // g = h_{t-1} W^T over this thread's rows of W_hh: its r, z and n blocks, nu contiguous rows each
        for (int k = 0; k < 3; k++)
            gemm_abt(B, nu, H, h_prev, H, w_hh + ((size_t)k * H + j0) * H, H, 0, g + k * nu, nu3);
        for (int i = 0; i < B; i++) {
            const size_t row = (size_t)t * B + i;
            const REAL *xr = gi + (tok ? (size_t)tok[row] : row) * H3 + j0, *xz = xr + H, *xn = xz + H;
            const REAL *hp = h_prev + (size_t)i * H + j0;
            const REAL *gr = g + (size_t)i * nu3, *gz = gr + nu, *gn = gz + nu;
            // what backward needs goes to G and N; without them, over this row's GEMM output and a spare row
            REAL *kr = G ? G + row * H3 + j0 : (REAL *)gr, *kz = G ? kr + H : kr + nu, *kn = G ? kz + H : kz + nu;
            REAL *n_out = N ? N + row * H + j0 : g + (size_t)B * nu3, *hr = h + (size_t)i * H + j0;
#pragma omp simd
            for (int j = 0; j < nu; j++) {
                REAL r = sigmoid(xr[j] + gr[j] + br[j]);
                REAL z = sigmoid(xz[j] + gz[j] + bz[j]);
                REAL a = gn[j] + bn[j];
                REAL n = tanh_(xn[j] + r * a);
                kr[j] = r, kz[j] = z, kn[j] = a, n_out[j] = n;
                hr[j] = n + z * (hp[j] - n);
            }
        }
        if (P > 1) {  // one thread alone (a trial of gru_forward_trials) meets no one: its team may be others'
#pragma omp barrier
        }
    }
    free(g);
}

/* From dhs = dL/dh_t through the outputs ([T, B, H]), dh_T = dL/dh_T through the final state and what the
 * forward kept, the gradients of the gate pre-activations: dgh = dL/d(h W_hh^T + b_hh) ([T, B, 3H]) and dgi =
 * dL/dgi ([T, B, 3H]), or with tok the gradient of the table, [V, 3H] and zeroed by the caller, which each step
 * adds to (the threads own distinct columns, so they never add to the same entry). dh0 (may be NULL) gets
 * dL/dh0. dh and next are [B, H] buffers shared by the threads, each using the columns of its units. */
static void backward_units(int q, int P, int T, int B, int H, const REAL *dhs, const REAL *dh_T, const int64_t *tok,
                           const REAL *w_hh, const REAL *hs, const REAL *G, const REAL *N, REAL *dgi, REAL *dgh,
                           REAL *dh0, REAL *dh, REAL *next) {
    const size_t H3 = 3 * (size_t)H;
    int j0, nu;
    units(H, q, P, &j0, &nu);
    REAL *acc = tok ? malloc(sizeof(REAL) * 3 * nu) : NULL;  // one row of dgi, added to the table by token
    for (int i = 0; i < B; i++) {
        const REAL *a = dhs + ((size_t)(T - 1) * B + i) * H + j0, *b = dh_T + (size_t)i * H + j0;
        REAL *d = dh + (size_t)i * H + j0;
        for (int j = 0; j < nu; j++) d[j] = a[j] + b[j];
    }
    for (int t = T - 1; t >= 0; t--) {
        if (t == 0 && dh0) next = dh0;
        for (int i = 0; i < B; i++) {
            const size_t row = (size_t)t * B + i, k = row * H3 + j0;
            const REAL *r_ = G + k, *z_ = r_ + H, *gn = z_ + H, *n_ = N + row * H + j0;
            const REAL *hp = hs + row * H + j0, *d = dh + (size_t)i * H + j0;
            const REAL *dy = t > 0 ? dhs + (row - B) * H + j0 : NULL;  // dL/dh_{t-1} through output t-1
            REAL *dir = tok ? acc : dgi + k, *diz = tok ? dir + nu : dir + H, *din = tok ? diz + nu : diz + H;
            REAL *dgr = dgh + k, *dgz = dgr + H, *dgn = dgz + H;
            REAL *nx = next + (size_t)i * H + j0;
            if (dy)
                memcpy(nx, dy, sizeof(REAL) * nu);
            else
                memset(nx, 0, sizeof(REAL) * nu);
#pragma omp simd
            for (int j = 0; j < nu; j++) {
                REAL r = r_[j], z = z_[j], n = n_[j];
                REAL da_n = d[j] * (1 - z) * (1 - n * n);
                REAL da_z = d[j] * (hp[j] - n) * z * (1 - z);
                REAL da_r = da_n * gn[j] * r * (1 - r);
                dir[j] = dgr[j] = da_r;
                diz[j] = dgz[j] = da_z;
                din[j] = da_n;
                dgn[j] = da_n * r;
                nx[j] += d[j] * z;
            }
            if (tok) {
                REAL *tr = dgi + (size_t)tok[row] * H3 + j0, *tz = tr + H, *tn = tz + H;
                for (int j = 0; j < nu; j++) tr[j] += dir[j], tz[j] += diz[j], tn[j] += din[j];
            }
        }
        if (t > 0 || dh0) {
            if (P > 1) {
#pragma omp barrier
            }
            // dh_{t-1}[:, units] += dG_t (all 3H columns, every thread's) W_hh[:, units]
            gemm_ab(B, nu, 3 * H, dgh + (size_t)t * B * H3, 3 * H, w_hh + j0, H, 1, next + j0, H);
            REAL *tmp = dh;
            dh = next, next = tmp;
        }
    }
    free(acc);
}

/* The entry points. threads == 1 runs outside any parallel region: inside one, even an inactive one, MKL keeps
 * each GEMM on one thread, while alone it may use all of torch's threads. */
void FN(gru_forward)(int T, int B, int H, const REAL *gi, const int64_t *tok, const REAL *w_hh, const REAL *b_hh,
                     REAL *hs, REAL *G, REAL *N, int threads) {
    if (threads <= 1) {
        forward_units(0, 1, T, B, H, gi, tok, w_hh, b_hh, hs, G, N);
        return;
    }
#pragma omp parallel num_threads(threads)
    forward_units(omp_get_thread_num(), omp_get_num_threads(), T, B, H, gi, tok, w_hh, b_hh, hs, G, N);
}

void FN(gru_backward)(int T, int B, int H, const REAL *dhs, const REAL *dh_T, const int64_t *tok, const REAL *w_hh,
                      const REAL *hs, const REAL *G, const REAL *N, REAL *dgi, REAL *dgh, REAL *dh0, int threads) {
    REAL *buf = malloc(sizeof(REAL) * 2 * (size_t)B * H), *next = buf + (size_t)B * H;
    if (threads <= 1) {
        backward_units(0, 1, T, B, H, dhs, dh_T, tok, w_hh, hs, G, N, dgi, dgh, dh0, buf, next);
    } else {
#pragma omp parallel num_threads(threads)
        backward_units(omp_get_thread_num(), omp_get_num_threads(), T, B, H, dhs, dh_T, tok, w_hh, hs, G, N, dgi, dgh,
                       dh0, buf, next);
    }
    free(buf);
}

/* Trials side by side (gruexp.stack): S recurrences of one shape, each whole on one thread, the threads taking the
 * trials in turn. No barrier per step, so even small trials share the cores well. Every array holds the S
 * trials one after another (gi_stride apart for gi, which is a table or the projections); tok may be NULL. */
void FN(gru_forward_trials)(int S, int T, int B, int H, const REAL *gi, long gi_stride, const int64_t *tok,
                            const REAL *w_hh, const REAL *b_hh, REAL *hs, REAL *G, REAL *N, int threads) {
    const size_t TB = (size_t)T * B, H3 = 3 * (size_t)H;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int s = 0; s < S; s++)
        forward_units(0, 1, T, B, H, gi + s * gi_stride, tok ? tok + s * TB : NULL, w_hh + s * H3 * H, b_hh + s * H3,
                      hs + s * (TB + B) * H, G ? G + s * TB * H3 : NULL, N ? N + s * TB * H : NULL);
}

void FN(gru_backward_trials)(int S, int T, int B, int H, const REAL *dhs, const REAL *dh_T, const int64_t *tok,
                             const REAL *w_hh, const REAL *hs, const REAL *G, const REAL *N, REAL *dgi, long gi_stride,
                             REAL *dgh, REAL *dh0, int threads) {
    const size_t TB = (size_t)T * B, H3 = 3 * (size_t)H, BH = (size_t)B * H;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int s = 0; s < S; s++) {
        REAL *buf = malloc(sizeof(REAL) * 2 * BH);
        backward_units(0, 1, T, B, H, dhs + s * TB * H, dh_T + s * BH, tok ? tok + s * TB : NULL, w_hh + s * H3 * H,
                       hs + s * (TB + B) * H, G + s * TB * H3, N + s * TB * H, dgi + s * gi_stride, dgh + s * TB * H3,
                       dh0 ? dh0 + s * BH : NULL, buf, buf + BH);
        free(buf);
    }
}
