/* CPU kernels of gradient_augmentation.py's batch norm second derivative (training mode,
 * float32, contiguous N x C x HW tensors), for L_GA^A on pixels. torch's native batch norm
 * backward is slow where the maps are small (0.33 ms for 32 x 512 x 2 x 2 against 0.07 ms for
 * the forward) and the second derivative's per-channel updates are several broadcast passes.
 * Here each is two passes over the data: per-channel sums (float partial sums over each run of
 * HW elements, gathered in double), then the elementwise outputs.
 *
 * Notation (see gradient_augmentation._BatchNormInputGrad): x_hat = (x - mu) s, s = invstd,
 * M = N HW, <t> = sum(t) / M over a channel; gy the first-order output gradient, m1 = <gy>,
 * m2 = <gy x_hat>.
 *
 * Channels are independent: large tensors are split by channel over `threads` POSIX threads.
 * Built at first use by cpu_kernels.py (-O3 -march=native, no -ffast-math). */
#include <pthread.h>
#include <stdint.h>

int tirg_bn_version(void) { return 1; }

/* First order, and dL/dx as pass 1 of L_GA^A builds it:
 * grad_x = gamma s (gy - m1 - x_hat m2); sum_gy[c] = M m1, sum_gy_xhat[c] = M m2. */
static void backward(int64_t n, int64_t c, int64_t hw, int64_t k_begin, int64_t k_end,
                     const float *restrict gy, const float *restrict x,
                     const float *restrict mean, const float *restrict invstd,
                     const float *restrict gamma, float *restrict grad_x, float *restrict sum_gy,
                     float *restrict sum_gy_xhat) {
    double count = (double)(n * hw);
    for (int64_t k = k_begin; k < k_end; k++) {
        double total = 0.0, total_xhat = 0.0;
        float mu = mean[k];
        for (int64_t i = 0; i < n; i++) {
            const float *g = gy + (i * c + k) * hw, *v = x + (i * c + k) * hw;
            float part = 0.0f, part_xc = 0.0f;
            for (int64_t j = 0; j < hw; j++) {
                part += g[j];
                part_xc += g[j] * (v[j] - mu);
            }
            total += part;
            total_xhat += part_xc;
        }
        float s = invstd[k];
        sum_gy[k] = (float)total;
        sum_gy_xhat[k] = (float)(total_xhat * s);
        float m1 = (float)(total / count), m2 = (float)(total_xhat * s / count);
        float gs = gamma[k] * s, k_xc = -gs * m2 * s, k0 = -gs * m1;
        for (int64_t i = 0; i < n; i++) {
            const float *g = gy + (i * c + k) * hw, *v = x + (i * c + k) * hw;
            float *out = grad_x + (i * c + k) * hw;
            for (int64_t j = 0; j < hw; j++)
                out[j] = gs * g[j] + (v[j] - mu) * k_xc + k0;
        }
    }
}

/* The derivative of <a, grad_x> for an upstream gradient a (A = <a>, AX = <a x_hat>,
 * AG = <a gy>), each output optional (NULL):
 * d_gy = gamma s (a - A - x_hat AX),
 * d_x = gamma s^2 (x_hat (3 m2 AX + m1 A - AG) - AX (gy - m1) - m2 (a - A)),
 * d_gamma = M s (AG - m1 A - m2 AX). */
static void double_backward(int64_t n, int64_t c, int64_t hw, int64_t k_begin, int64_t k_end,
                            const float *restrict a, const float *restrict gy,
                            const float *restrict x, const float *restrict mean,
                            const float *restrict invstd, const float *restrict gamma,
                            const float *restrict sum_gy, const float *restrict sum_gy_xhat,
                            float *restrict d_gy, float *restrict d_x, float *restrict d_gamma) {
    double count = (double)(n * hw);
    for (int64_t k = k_begin; k < k_end; k++) {
        double total_a = 0.0, total_axc = 0.0, total_ag = 0.0;
        float mu = mean[k];
        for (int64_t i = 0; i < n; i++) {
            const float *u = a + (i * c + k) * hw, *g = gy + (i * c + k) * hw,
                        *v = x + (i * c + k) * hw;
            float part_a = 0.0f, part_axc = 0.0f, part_ag = 0.0f;
            for (int64_t j = 0; j < hw; j++) {
                part_a += u[j];
                part_axc += u[j] * (v[j] - mu);
                part_ag += u[j] * g[j];
            }
            total_a += part_a;
            total_axc += part_axc;
            total_ag += part_ag;
        }
        float s = invstd[k], gamma_s = gamma[k] * s;
        float m1 = (float)(sum_gy[k] / count), m2 = (float)(sum_gy_xhat[k] / count);
        float mean_a = (float)(total_a / count), mean_axhat = (float)(total_axc * s / count);
        float mean_ag = (float)(total_ag / count);
        if (d_gamma)
            d_gamma[k] = (float)(count * s) * (mean_ag - m1 * mean_a - m2 * mean_axhat);
        if (d_gy) {
            float k_xc = -gamma_s * mean_axhat * s, k0 = -gamma_s * mean_a;
            for (int64_t i = 0; i < n; i++) {
                const float *u = a + (i * c + k) * hw, *v = x + (i * c + k) * hw;
                float *out = d_gy + (i * c + k) * hw;
                for (int64_t j = 0; j < hw; j++)
                    out[j] = gamma_s * u[j] + (v[j] - mu) * k_xc + k0;
            }
        }
        if (d_x) {
            float gs2 = gamma_s * s;
            float k_xc = gs2 * (3.0f * m2 * mean_axhat + m1 * mean_a - mean_ag) * s;
            float k_g = -gs2 * mean_axhat, k_a = -gs2 * m2;
            float k0 = gs2 * (mean_axhat * m1 + m2 * mean_a);
            for (int64_t i = 0; i < n; i++) {
                const float *u = a + (i * c + k) * hw, *g = gy + (i * c + k) * hw,
                            *v = x + (i * c + k) * hw;
                float *out = d_x + (i * c + k) * hw;
                for (int64_t j = 0; j < hw; j++)
                    out[j] = (v[j] - mu) * k_xc + g[j] * k_g + u[j] * k_a + k0;
            }
        }
    }
}

/* ------------------------------------------------------------------ threads over channels */

typedef struct {
    int second; /* 0: backward, 1: double_backward */
    int64_t n, c, hw, k_begin, k_end;
    const float *a, *gy, *x, *mean, *invstd, *gamma, *sum_gy, *sum_gy_xhat;
    float *out1, *out2, *out3;
} task_t;

static void *run(void *arg) {
    task_t *t = (task_t *)arg;
    if (t->second)
        double_backward(t->n, t->c, t->hw, t->k_begin, t->k_end, t->a, t->gy, t->x, t->mean,
                        t->invstd, t->gamma, t->sum_gy, t->sum_gy_xhat, t->out1, t->out2,
                        t->out3);
    else
        backward(t->n, t->c, t->hw, t->k_begin, t->k_end, t->gy, t->x, t->mean, t->invstd,
                 t->gamma, t->out1, t->out2, t->out3);
    return 0;
}

#define MAX_THREADS 64

/* Split channels 0 .. c - 1 over up to `threads` threads (the caller's among them); a thread
 * that cannot be started leaves its share to the caller. */
static void split(task_t task, int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > task.c) threads = (int)task.c;
    if (threads < 1) threads = 1;
    task_t tasks[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int i = 0; i < threads; i++) {
        tasks[i] = task;
        tasks[i].k_begin = task.c * i / threads;
        tasks[i].k_end = task.c * (i + 1) / threads;
    }
    for (int i = 1; i < threads; i++)
        started[i] = pthread_create(&ids[i], 0, run, &tasks[i]) == 0;
    run(&tasks[0]);
    for (int i = 1; i < threads; i++) {
        if (started[i])
            pthread_join(ids[i], 0);
        else
            run(&tasks[i]);
    }
}

void tirg_bn_backward(int64_t n, int64_t c, int64_t hw, const float *gy, const float *x,
                      const float *mean, const float *invstd, const float *gamma, float *grad_x,
                      float *sum_gy, float *sum_gy_xhat, int threads) {
    task_t t = {0, n, c, hw, 0, c, 0, gy, x, mean, invstd, gamma, 0, 0, grad_x, sum_gy,
                sum_gy_xhat};
    split(t, threads);
}

void tirg_bn_double_backward(int64_t n, int64_t c, int64_t hw, const float *a, const float *gy,
                             const float *x, const float *mean, const float *invstd,
                             const float *gamma, const float *sum_gy, const float *sum_gy_xhat,
                             float *d_gy, float *d_x, float *d_gamma, int threads) {
    task_t t = {1, n, c, hw, 0, c, a, gy, x, mean, invstd, gamma, sum_gy, sum_gy_xhat, d_gy, d_x,
                d_gamma};
    split(t, threads);
}
