/* The CPU kernel of isotropic_noise.py: the same stream of random numbers as its torch
 * reference (see there for the definition), in one pass that stays in cache.
 *
 * Built at first use with -march=native; the logf/cosf/sinf declarations below let the compiler
 * call glibc's vector math (libmvec), which is what makes this fast. No -ffast-math: in a shared
 * library it would switch the whole process to flush-to-zero. */
#include <stdint.h>

float logf(float) __attribute__((simd("notinbranch")));
float cosf(float) __attribute__((simd("notinbranch")));
float sinf(float) __attribute__((simd("notinbranch")));
float sqrtf(float);

#define HALF 1024 /* pairs per block; a block is 2 * HALF elements */
#define GOLDEN 0x9E3779B97F4A7C15ULL
#define TWO_PI_2M24 (6.28318530717958647692f * 0x1p-24f)

int tirg_noise_version(void) { return 1; }

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
    /* Box-Muller; the sine in a loop of its own, or the compiler fuses it with the cosine into
     * sincosf, which has no vector version. */
    for (int j = 0; j < HALF; j++) {
        float rho = sqrtf(-2.0f * logf((float)(hi[j] + 1) * 0x1p-24f)) * scale;
        z[j] = rho * cosf((float)lo[j] * TWO_PI_2M24);
        z[HALF + j] = rho;
    }
    for (int j = 0; j < HALF; j++)
        z[HALF + j] *= sinf((float)lo[j] * TWO_PI_2M24);
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
