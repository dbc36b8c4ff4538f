/* The CPU kernel of isotropic_noise.py: the same stream of random numbers as its torch
 * reference (see there for the definition), drawn in blocks that stay in cache and used in the
 * same pass: written out, added to a gradient, or added and followed by an SGD step.
 *
 * Built at first use with -march=native. The logf declaration lets the compiler call glibc's
 * vector math (libmvec); the sine and cosine are polynomials of our own. No -ffast-math (in a
 * shared library it switches the whole process to flush-to-zero), and -ffp-contract=off: every
 * fused multiply-add is written out, where torch's kernels use one. */
#include <stdint.h>

float logf(float) __attribute__((simd("notinbranch")));
float sqrtf(float);
float fmaf(float, float, float);

#define HALF 1024 /* pairs per block; a block is 2 * HALF elements */
#define GOLDEN 0x9E3779B97F4A7C15ULL
#define PI_4_2M21 (0.785398163397448309616f * 0x1p-21f)

int tirg_noise_version(void) { return 3; }

static inline uint64_t mix(uint64_t z) { /* SplitMix64's output function */
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Block `index` of the stream of `key`, times `scale`, into z[0 .. 2 * HALF). */
static void block(int uniform, uint64_t key, uint64_t index, float scale, float *restrict z) {
    int32_t hi[HALF], lo[HALF];
    uint64_t first = index * HALF + 1;
    for (int j = 0; j < HALF; j++) {
        uint64_t x = mix(key + (first + (uint64_t)j) * GOLDEN);
        hi[j] = (int32_t)(x >> 40);
        lo[j] = (int32_t)(x & 0xFFFFFF);
    }
    if (uniform) {
        for (int j = 0; j < HALF; j++) {
            z[j] = (float)(2 * hi[j] + 1 - (1 << 24)) * 0x1p-24f * scale;
            z[HALF + j] = (float)(2 * lo[j] + 1 - (1 << 24)) * 0x1p-24f * scale;
        }
        return;
    }
    /* Box-Muller. cos t and sin t from the angle's integer: its top 3 bits pick the octant,
     * the other 21 an argument a in [0, pi/4] (measured from the octant's nearer axis), where
     * Cephes' single-precision polynomials hold; faster than libmvec's, which reduce any angle. */
    for (int j = 0; j < HALF; j++) {
        float rho = sqrtf(-2.0f * logf((float)(hi[j] + 1) * 0x1p-24f)) * scale;
        int octant = lo[j] >> 21, odd = octant & 1;
        int steps = odd ? (1 << 21) - (lo[j] & 0x1FFFFF) : lo[j] & 0x1FFFFF;
        float a = (float)steps * PI_4_2M21, a2 = a * a;
        float s = fmaf(fmaf(fmaf(-1.9515295891e-4f, a2, 8.3321608736e-3f), a2, -1.6666654611e-1f)
                       * a2, a, a);
        float c = fmaf(fmaf(fmaf(fmaf(2.443315711809948e-5f, a2, -1.388731625493765e-3f), a2,
                                 4.166664568298827e-2f), a2, -0.5f), a2, 1.0f);
        int swap = ((octant + 1) >> 1) & 1;      /* octants 1, 2, 5, 6 */
        float cos_t = swap ? s : c, sin_t = swap ? c : s;
        cos_t = ((octant + 2) >> 2) & 1 ? -cos_t : cos_t; /* octants 2 to 5 */
        sin_t = octant >> 2 ? -sin_t : sin_t;             /* octants 4 to 7 */
        z[j] = rho * cos_t;
        z[HALF + j] = rho * sin_t;
    }
}

/* out[i] = scale * r[offset + i] for i < n; offset is a multiple of 2 * HALF. */
void tirg_noise_fill(int uniform, uint64_t key, int64_t offset, float scale, float *out,
                     int64_t n) {
    float z[2 * HALF];
    for (int64_t s = 0; s < n; s += 2 * HALF) {
        int64_t m = n - s < 2 * HALF ? n - s : 2 * HALF;
        block(uniform, key, (uint64_t)(offset + s) / (2 * HALF), scale, z);
        for (int64_t j = 0; j < m; j++)
            out[s + j] = z[j];
    }
}

/* grad[i] += scale * r[offset + i] for i < n; returns the sum of param[i] * scale * r[offset + i]
 * (float per block, double across blocks). */
double tirg_noise_add(int uniform, uint64_t key, int64_t offset, float scale,
                      float *restrict grad, const float *restrict param, int64_t n) {
    float z[2 * HALF];
    double total = 0.0;
    for (int64_t s = 0; s < n; s += 2 * HALF) {
        int64_t m = n - s < 2 * HALF ? n - s : 2 * HALF;
        block(uniform, key, (uint64_t)(offset + s) / (2 * HALF), scale, z);
        float dot = 0.0f;
        for (int64_t j = 0; j < m; j++) {
            grad[s + j] += z[j];
            dot += param[s + j] * z[j];
        }
        total += dot;
    }
    return total;
}

/* grad += scale * r[offset + i], then torch.optim.SGD's step on param with that gradient
 * (momentum, no dampening, not Nesterov, not maximizing), rounded as torch's vectorized kernels
 * round it:
 *     d = grad + weight_decay * param      (one fused multiply-add)
 *     buf = first ? d : momentum * buf + d (a product, then a sum)
 *     param = param - lr * buf             (one fused multiply-add)
 * Returns the sum of param[i] * scale * r[offset + i] at the parameter before the step. */
double tirg_noise_sgd(int uniform, uint64_t key, int64_t offset, float scale,
                      float *restrict grad, float *restrict param, float *restrict buf,
                      int first, float lr, float momentum, float weight_decay, int64_t n) {
    float z[2 * HALF];
    double total = 0.0;
    for (int64_t s = 0; s < n; s += 2 * HALF) {
        int64_t m = n - s < 2 * HALF ? n - s : 2 * HALF;
        block(uniform, key, (uint64_t)(offset + s) / (2 * HALF), scale, z);
        float *g = grad + s, *p = param + s, *b = buf + s, dot = 0.0f;
        for (int64_t j = 0; j < m; j++) {
            float gj = g[j] + z[j];
            dot += p[j] * z[j];
            g[j] = gj;
            float d = fmaf(weight_decay, p[j], gj);
            float bj = first ? d : momentum * b[j] + d;
            b[j] = bj;
            p[j] = fmaf(-lr, bj, p[j]);
        }
        total += dot;
    }
    return total;
}
