/* y = x W^T (+ bias) (+ residual) in fp32 for a few rows of x: the CPU decode step's matmul.
 *
 * W (N x K) is stored once as ceil(N/16) panels of K x 16 floats (panel p, row k holds
 * W[16p .. 16p+15][k]; columns past N are zero), so a panel streams from memory in one
 * sequential run. Each panel is multiplied by up to 6 rows of x at a time in 12 AVX2
 * registers (6 rows x 16 columns), the classic sgemm micro-tile: with 1-10 rows, what a decode
 * step has, the matmul is a stream of the weights and this kernel reads them at the memory's
 * speed where general-purpose GEMMs (MKL, oneDNN) stop at about half of it.
 * Panels are shared out among the OpenMP threads of the caller (torch's own pool: the library
 * is loaded only into processes whose torch runs libgomp). Built by panel_gemm.py with
 * -O3 -mavx2 -mfma; used only on CPUs that have both. */
#include <immintrin.h>
#include <string.h>

#define PANEL 16
#define TILE_ROWS 6
#define PREFETCH_AHEAD (32 * PANEL) /* floats: 2 KiB ahead in the panel's stream */

int panel_gemm_abi(void) { return 1; }

/* One tile: rows [0, ROWS) of x (stride ldx) times one panel; writes ROWS x 16 to out.
 * Accumulators are named variables (an array of them gets spilled to the stack at -O3);
 * the ``ROWS > r`` tests are compile-time constants. */
#define ROW_FMA(ROWS, r)                                                                          \
    if (ROWS > r) {                                                                           \
        __m256 v = _mm256_broadcast_ss(x + r * ldx + k);                                      \
        lo##r = _mm256_fmadd_ps(v, w0, lo##r);                                                \
        hi##r = _mm256_fmadd_ps(v, w1, hi##r);                                                \
    }
#define ROW_STORE(ROWS, r)                                                                        \
    if (ROWS > r) {                                                                           \
        _mm256_storeu_ps(out + r * PANEL, lo##r);                                             \
        _mm256_storeu_ps(out + r * PANEL + 8, hi##r);                                         \
    }
#define DEFINE_TILE(ROWS)                                                                     \
    static void tile##ROWS(const float *x, long ldx, const float *panel, long K, float *out) \
    {                                                                                         \
        __m256 lo0 = _mm256_setzero_ps(), hi0 = lo0, lo1 = lo0, hi1 = lo0, lo2 = lo0;         \
        __m256 hi2 = lo0, lo3 = lo0, hi3 = lo0, lo4 = lo0, hi4 = lo0, lo5 = lo0, hi5 = lo0;   \
        for (long k = 0; k < K; k++) {                                                        \
            const float *w = panel + k * PANEL;                                               \
            _mm_prefetch((const char *)(w + PREFETCH_AHEAD), _MM_HINT_T0);                    \
            __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);                      \
            ROW_FMA(ROWS, 0) ROW_FMA(ROWS, 1) ROW_FMA(ROWS, 2) ROW_FMA(ROWS, 3) ROW_FMA(ROWS, 4) ROW_FMA(ROWS, 5)                 \
        }                                                                                     \
        ROW_STORE(ROWS, 0) ROW_STORE(ROWS, 1) ROW_STORE(ROWS, 2) ROW_STORE(ROWS, 3) ROW_STORE(ROWS, 4) ROW_STORE(ROWS, 5)         \
    }

DEFINE_TILE(1)
DEFINE_TILE(2)
DEFINE_TILE(3)
DEFINE_TILE(4)
DEFINE_TILE(5)
DEFINE_TILE(6)

typedef void (*tile_fn)(const float *, long, const float *, long, float *);
static const tile_fn TILES[TILE_ROWS + 1] = {0, tile1, tile2, tile3, tile4, tile5, tile6};

/* x: M x K (row stride ldx); panels: ceil(N/16) x K x 16; bias: N or NULL;
 * residual: M x N (row stride ldr) or NULL; y: M x N (row stride ldy). */
void panel_gemm(const float *x, long M, long K, long ldx, const float *panels, long N,
                const float *bias, const float *residual, long ldr, float *y, long ldy)
{
    long n_panels = (N + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static)
    for (long p = 0; p < n_panels; p++) {
        const float *panel = panels + p * K * PANEL;
        long col = p * PANEL;
        long width = N - col < PANEL ? N - col : PANEL;
        for (long r0 = 0; r0 < M; r0 += TILE_ROWS) {
            long rows = M - r0 < TILE_ROWS ? M - r0 : TILE_ROWS;
            float out[TILE_ROWS * PANEL];
            TILES[rows](x + r0 * ldx, ldx, panel, K, out);
            for (long r = 0; r < rows; r++) {
                float *dst = y + (r0 + r) * ldy + col;
                const float *acc = out + r * PANEL;
                const float *add = residual ? residual + (r0 + r) * ldr + col : 0;
                for (long j = 0; j < width; j++)
                    dst[j] = acc[j] + (bias ? bias[col + j] : 0.0f) + (add ? add[j] : 0.0f);
            }
        }
    }
}
