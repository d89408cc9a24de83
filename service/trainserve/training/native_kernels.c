/*
 * The kernels of trainserve's native path (trainserve/training/native.py), in float32.
 *
 * One named function per operation, forward and backward side by side, in the manner of
 * karpathy/llm.c's train_gpt2.c. native.py pastes this file, unchanged, at the top of each
 * generated translation unit and writes below it only the sequence of calls and the sizes
 * for one spec (train_steps) or one trained model (forward_rows), plus the ABI record those
 * sizes make. So everything that decides a result bit for bit is here, where a reviewer can
 * read it and CI compiles it under -Wall -Wextra -Werror and the sanitizers
 * (scripts/check_native.sh).
 *
 * Each formula mirrors torch's, in the order torch applies it, with torch's scalars passed
 * in as torch computes them (in double, rounded to float where torch's kernels take a
 * float). Sums run in another order than torch's matrix kernels, so results match eager
 * training to rounding, not bit for bit (docs/native.md, "Error budget").
 *
 * Built with -ffp-contract=off and without -ffast-math: a*b+c must round twice on every
 * compiler, or two replicas built by gcc and clang would disagree in the last bits.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Unused kernels in a unit are normal: each spec calls only those it needs. */
#define KERNEL static __attribute__((unused))

/* Return codes of train_steps and forward_rows; native.py turns each into an exception. */
#define TS_OK 0
#define TS_ERR_NOMEM 1  /* a workspace allocation failed */
#define TS_ERR_INDEX 2  /* a row index outside the data */
#define TS_ERR_TARGET 3 /* a class label outside [0, classes) */

/* ---------------------------------------------------------------------------------------- */
/* scalar helpers */

static inline float sigm(float v) { return 1.0f / (1.0f + expf(-v)); }
static inline float softplus1(float v) { return v > 20.0f ? v : log1pf(expf(v)); }

/* ---------------------------------------------------------------------------------------- */
/* input standardisation, as the module's scaler: (x - mean) / std */

KERNEL void standardize_row(float *out, const float *x, const float *mean, const float *sd, long C) {
    for (long i = 0; i < C; i++) out[i] = (x[i] - mean[i]) / sd[i];
}

/* ---------------------------------------------------------------------------------------- */
/* nn.Linear: out (B, OC) = inp (B, C) @ weight (OC, C)^T + bias (OC); bias may be NULL */

KERNEL void linear_forward(float *out, const float *inp, const float *weight, const float *bias, long B, long C,
                           long OC) {
    for (long b = 0; b < B; b++) {
        const float *x = inp + b * C;
        for (long o = 0; o < OC; o++) {
            const float *wr = weight + o * C;
            float acc = 0.0f;
            for (long i = 0; i < C; i++) acc += wr[i] * x[i];
            out[b * OC + o] = bias ? acc + bias[o] : acc;
        }
    }
}

/* Gradients of linear_forward: dweight and dbias are overwritten (torch's zero_grad, then
 * backward); dinp is skipped when NULL (the first layer's input needs no gradient). */
KERNEL void linear_backward(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                            const float *weight, long B, long C, long OC) {
    memset(dweight, 0, sizeof(float) * (size_t)(OC * C));
    if (dbias) memset(dbias, 0, sizeof(float) * (size_t)OC);
    for (long b = 0; b < B; b++) {
        const float *x = inp + b * C, *d = dout + b * OC;
        for (long o = 0; o < OC; o++) {
            float *gw = dweight + o * C;
            if (dbias) dbias[o] += d[o];
            for (long i = 0; i < C; i++) gw[i] += d[o] * x[i];
        }
    }
    if (!dinp) return;
    for (long b = 0; b < B; b++) {
        float *dx = dinp + b * C;
        const float *d = dout + b * OC;
        for (long i = 0; i < C; i++) dx[i] = 0.0f;
        for (long o = 0; o < OC; o++) {
            const float *wr = weight + o * C;
            for (long i = 0; i < C; i++) dx[i] += d[o] * wr[i];
        }
    }
}

/* One row through nn.Linear with the weight transposed, (C, OC): the outputs accumulate side
 * by side (vectorised), each output still summing its inputs in one fixed order, whatever
 * rows share the call. Serving's row-wise pass. */
KERNEL void linear_forward_row_t(float *out, const float *inp, const float *weight_t, const float *bias, long C,
                                 long OC) {
    for (long o = 0; o < OC; o++) out[o] = bias ? bias[o] : 0.0f;
    for (long i = 0; i < C; i++) {
        const float v = inp[i], *wr = weight_t + i * OC;
        for (long o = 0; o < OC; o++) out[o] += wr[o] * v;
    }
}

/* ---------------------------------------------------------------------------------------- */
/* activations, element-wise over N values: forward(out, inp) may run in place;
 * backward(dinp, inp, out, dout) has the forward's input and output at hand */

KERNEL void identity_forward(float *out, const float *inp, long N) {
    if (out != inp) memmove(out, inp, sizeof(float) * (size_t)N);
}
KERNEL void identity_backward(float *dinp, const float *inp, const float *out, const float *dout, long N) {
    (void)inp, (void)out;
    memmove(dinp, dout, sizeof(float) * (size_t)N);
}

KERNEL void tanh_forward(float *out, const float *inp, long N) {
    for (long j = 0; j < N; j++) out[j] = tanhf(inp[j]);
}
KERNEL void tanh_backward(float *dinp, const float *inp, const float *out, const float *dout, long N) {
    (void)inp;
    for (long j = 0; j < N; j++) dinp[j] = dout[j] * (1.0f - out[j] * out[j]);
}

KERNEL void relu_forward(float *out, const float *inp, long N) {
    for (long j = 0; j < N; j++) out[j] = inp[j] > 0.0f ? inp[j] : 0.0f;
}
KERNEL void relu_backward(float *dinp, const float *inp, const float *out, const float *dout, long N) {
    (void)out;
    for (long j = 0; j < N; j++) dinp[j] = inp[j] > 0.0f ? dout[j] : 0.0f;
}

KERNEL void sigmoid_forward(float *out, const float *inp, long N) {
    for (long j = 0; j < N; j++) out[j] = sigm(inp[j]);
}
KERNEL void sigmoid_backward(float *dinp, const float *inp, const float *out, const float *dout, long N) {
    (void)inp;
    for (long j = 0; j < N; j++) dinp[j] = dout[j] * out[j] * (1.0f - out[j]);
}

KERNEL void silu_forward(float *out, const float *inp, long N) {
    for (long j = 0; j < N; j++) out[j] = inp[j] * sigm(inp[j]);
}
KERNEL void silu_backward(float *dinp, const float *inp, const float *out, const float *dout, long N) {
    (void)out;
    for (long j = 0; j < N; j++) {
        float x = inp[j];
        dinp[j] = dout[j] * (sigm(x) * (1.0f + x * (1.0f - sigm(x))));
    }
}

KERNEL void mish_forward(float *out, const float *inp, long N) {
    for (long j = 0; j < N; j++) out[j] = inp[j] * tanhf(softplus1(inp[j]));
}
KERNEL void mish_backward(float *dinp, const float *inp, const float *out, const float *dout, long N) {
    (void)out;
    for (long j = 0; j < N; j++) {
        float x = inp[j], t = tanhf(softplus1(x));
        dinp[j] = dout[j] * (t + x * sigm(x) * (1.0f - t * t));
    }
}

KERNEL void elu_forward(float *out, const float *inp, long N, float alpha) {
    for (long j = 0; j < N; j++) out[j] = inp[j] > 0.0f ? inp[j] : alpha * expm1f(inp[j]);
}
KERNEL void elu_backward(float *dinp, const float *inp, const float *out, const float *dout, long N, float alpha) {
    (void)out;
    for (long j = 0; j < N; j++) dinp[j] = inp[j] > 0.0f ? dout[j] : dout[j] * alpha * expf(inp[j]);
}

KERNEL void leaky_relu_forward(float *out, const float *inp, long N, float slope) {
    for (long j = 0; j < N; j++) out[j] = inp[j] > 0.0f ? inp[j] : inp[j] * slope;
}
KERNEL void leaky_relu_backward(float *dinp, const float *inp, const float *out, const float *dout, long N,
                                float slope) {
    (void)out;
    for (long j = 0; j < N; j++) dinp[j] = inp[j] > 0.0f ? dout[j] : dout[j] * slope;
}

KERNEL void softplus_forward(float *out, const float *inp, long N, float beta, float threshold) {
    for (long j = 0; j < N; j++) {
        float x = inp[j];
        out[j] = x * beta > threshold ? x : log1pf(expf(x * beta)) / beta;
    }
}
KERNEL void softplus_backward(float *dinp, const float *inp, const float *out, const float *dout, long N, float beta,
                              float threshold) {
    (void)out;
    for (long j = 0; j < N; j++) {
        float x = inp[j];
        dinp[j] = x * beta > threshold ? dout[j] : dout[j] * sigm(x * beta);
    }
}

/* GELU, approximate="none": 0.5 x (1 + erf(x / sqrt 2)) */
KERNEL void gelu_forward(float *out, const float *inp, long N) {
    for (long j = 0; j < N; j++) out[j] = 0.5f * inp[j] * (1.0f + erff(inp[j] * 0.70710678118654752f));
}
KERNEL void gelu_backward(float *dinp, const float *inp, const float *out, const float *dout, long N) {
    (void)out;
    for (long j = 0; j < N; j++) {
        float v = inp[j];
        float grad = 0.5f * (1.0f + erff(v * 0.70710678118654752f)) + v * 0.39894228040143268f * expf(-0.5f * v * v);
        dinp[j] = dout[j] * grad;
    }
}

/* GELU, approximate="tanh" */
KERNEL void gelu_tanh_forward(float *out, const float *inp, long N) {
    for (long j = 0; j < N; j++) {
        float v = inp[j], inner = 0.79788456080286536f * (v + 0.044715f * v * v * v);
        out[j] = 0.5f * v * (1.0f + tanhf(inner));
    }
}
KERNEL void gelu_tanh_backward(float *dinp, const float *inp, const float *out, const float *dout, long N) {
    (void)out;
    for (long j = 0; j < N; j++) {
        float v = inp[j], inner = 0.79788456080286536f * (v + 0.044715f * v * v * v), t = tanhf(inner);
        float grad = 0.5f * (1.0f + t) +
                     0.5f * v * (1.0f - t * t) * 0.79788456080286536f * (1.0f + 3.0f * 0.044715f * v * v);
        dinp[j] = dout[j] * grad;
    }
}

/* ---------------------------------------------------------------------------------------- */
/* losses (reduction="mean"): each writes the loss and d(loss)/d(outputs) for the m rows of a
 * batch; rows[r] is the data row of batch row r, so targets are read where the rows are */

/* nn.CrossEntropyLoss over C logits, with label smoothing ls */
KERNEL int cross_entropy_backward(float *loss, float *dlogits, const float *logits, const int64_t *targets,
                                  const long *rows, long m, long C, float ls) {
    float total = 0.0f;
    for (long r = 0; r < m; r++) {
        const float *z = logits + r * C;
        float *dz = dlogits + r * C;
        int64_t t = targets[rows[r]];
        if (t < 0 || t >= C) return TS_ERR_TARGET;
        float mx = z[0];
        for (long c = 1; c < C; c++)
            if (z[c] > mx) mx = z[c];
        float se = 0.0f;
        for (long c = 0; c < C; c++) se += expf(z[c] - mx);
        float lse = mx + logf(se), all = 0.0f;
        for (long c = 0; c < C; c++) {
            all += z[c] - lse;
            dz[c] = (expf(z[c] - lse) - ls / (float)C) / (float)m;
        }
        dz[t] -= (1.0f - ls) / (float)m;
        total += -(1.0f - ls) * (z[t] - lse) - ls / (float)C * all;
    }
    *loss = total / (float)m;
    return TS_OK;
}

/* The element-wise regression and binary losses share one walk over (m, W) outputs. */
typedef enum { LOSS_MSE, LOSS_L1, LOSS_HUBER, LOSS_SMOOTH_L1, LOSS_BCE_WITH_LOGITS } PointLoss;

/* nn.MSELoss, nn.L1Loss, nn.HuberLoss(delta = param), nn.SmoothL1Loss(beta = param; 0 is L1)
 * and nn.BCEWithLogitsLoss, against float targets (rows of W values) */
KERNEL int pointwise_loss_backward(float *loss, float *dout, const float *out, const float *targets,
                                   const long *rows, long m, long W, PointLoss kind, float param) {
    float total = 0.0f, count = (float)(m * W);
    for (long j = 0; j < m * W; j++) {
        float p = out[j], t = targets[rows[j / W] * W + j % W], e = p - t, a = fabsf(e);
        float s = (float)((e > 0.0f) - (e < 0.0f));
        switch (kind) {
        case LOSS_MSE:
            total += e * e;
            dout[j] = 2.0f * e / count;
            break;
        case LOSS_L1:
            total += a;
            dout[j] = s / count;
            break;
        case LOSS_HUBER:
            total += a < param ? 0.5f * e * e : param * (a - 0.5f * param);
            dout[j] = (a < param ? e : param * s) / count;
            break;
        case LOSS_SMOOTH_L1:
            if (param == 0.0f) {
                total += a;
                dout[j] = s / count;
            } else {
                total += a < param ? 0.5f * e * e / param : a - 0.5f * param;
                dout[j] = (a < param ? e / param : s) / count;
            }
            break;
        case LOSS_BCE_WITH_LOGITS:
            total += (p > 0.0f ? p : 0.0f) - p * t + log1pf(expf(-fabsf(p)));
            dout[j] = (sigm(p) - t) / count;
            break;
        }
    }
    *loss = total / count;
    return TS_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* torch.nn.utils.clip_grad_norm_: the norm of the per-tensor norms, then one scale factor */

KERNEL void clip_grad_norm(float *const *grads, const long *sizes, long n_tensors, float max_norm) {
    float sq = 0.0f;
    for (long k = 0; k < n_tensors; k++) {
        float t = 0.0f;
        for (long j = 0; j < sizes[k]; j++) t += grads[k][j] * grads[k][j];
        float nt = sqrtf(t);
        sq += nt * nt;
    }
    float coef = max_norm / (sqrtf(sq) + 1e-6f);
    if (coef < 1.0f)
        for (long k = 0; k < n_tensors; k++)
            for (long j = 0; j < sizes[k]; j++) grads[k][j] *= coef;
}

/* ---------------------------------------------------------------------------------------- */
/* optimizers: one parameter tensor's update, on torch's own state tensors (the slots named
 * in native.py's STATE_SLOTS, in that order). Each follows torch.optim's single-tensor
 * ("foreach=False") algorithm as documented at https://pytorch.org/docs/stable/optim.html.
 * Hyperparameters arrive as torch's kernels use them: complements such as 1 - beta computed
 * in double by Python and rounded to float once. */

typedef struct {
    float weight_decay, momentum, one_minus_dampening;
    int nesterov;
} SGDConfig;

/* torch.optim.SGD; buf is the momentum_buffer (NULL without momentum); fresh: its first step */
KERNEL void sgd_update(float *p, const float *grad, float *buf, long n, double lr, SGDConfig c, int fresh) {
    for (long j = 0; j < n; j++) {
        float g = grad[j];
        if (c.weight_decay != 0.0f) g += c.weight_decay * p[j];
        if (buf) {
            buf[j] = fresh ? g : buf[j] * c.momentum + c.one_minus_dampening * g;
            g = c.nesterov ? g + c.momentum * buf[j] : buf[j];
        }
        p[j] -= (float)lr * g;
    }
}

typedef struct {
    double beta1, beta2, weight_decay;
    float one_minus_beta1, beta2f, one_minus_beta2, eps, weight_decay_f;
    int decoupled; /* AdamW: decay the weights, not the gradient */
} AdamConfig;

/* torch.optim.Adam and AdamW; max_exp_avg_sq is NULL unless amsgrad */
KERNEL void adam_update(float *p, const float *grad, float *step, float *exp_avg, float *exp_avg_sq,
                        float *max_exp_avg_sq, long n, double lr, AdamConfig c) {
    *step += 1.0f;
    double st = *step;
    double bc1 = 1.0 - pow(c.beta1, st), bc2s = sqrt(1.0 - pow(c.beta2, st));
    float step_size = (float)(lr / bc1), bc2f = (float)bc2s;
    int decay_weights = c.decoupled && c.weight_decay != 0.0;
    float decay = (float)(1.0 - lr * c.weight_decay);
    for (long j = 0; j < n; j++) {
        float g = grad[j];
        if (decay_weights)
            p[j] *= decay;
        else if (!c.decoupled && c.weight_decay_f != 0.0f)
            g += c.weight_decay_f * p[j];
        exp_avg[j] += (g - exp_avg[j]) * c.one_minus_beta1;
        exp_avg_sq[j] = exp_avg_sq[j] * c.beta2f + c.one_minus_beta2 * g * g;
        float second = exp_avg_sq[j];
        if (max_exp_avg_sq) {
            if (exp_avg_sq[j] > max_exp_avg_sq[j]) max_exp_avg_sq[j] = exp_avg_sq[j];
            second = max_exp_avg_sq[j];
        }
        float denom = sqrtf(second) / bc2f + c.eps;
        p[j] -= step_size * (exp_avg[j] / denom);
    }
}

typedef struct {
    float alpha, one_minus_alpha, eps, weight_decay, momentum;
} RMSpropConfig;

/* torch.optim.RMSprop; grad_avg is NULL unless centered, buf NULL without momentum */
KERNEL void rmsprop_update(float *p, const float *grad, float *step, float *square_avg, float *buf, float *grad_avg,
                           long n, double lr, RMSpropConfig c) {
    *step += 1.0f;
    for (long j = 0; j < n; j++) {
        float g = grad[j];
        if (c.weight_decay != 0.0f) g += c.weight_decay * p[j];
        square_avg[j] = square_avg[j] * c.alpha + c.one_minus_alpha * g * g;
        float avg;
        if (grad_avg) {
            grad_avg[j] += (g - grad_avg[j]) * c.one_minus_alpha;
            avg = sqrtf(square_avg[j] - grad_avg[j] * grad_avg[j]) + c.eps;
        } else {
            avg = sqrtf(square_avg[j]) + c.eps;
        }
        if (buf) {
            buf[j] = buf[j] * c.momentum + g / avg;
            p[j] -= (float)lr * buf[j];
        } else {
            p[j] -= (float)lr * (g / avg);
        }
    }
}

typedef struct {
    double lr_decay;
    float eps, weight_decay;
} AdagradConfig;

/* torch.optim.Adagrad */
KERNEL void adagrad_update(float *p, const float *grad, float *step, float *sum, long n, double lr, AdagradConfig c) {
    *step += 1.0f;
    double st = *step;
    float clr = (float)(lr / (1.0 + (st - 1.0) * c.lr_decay));
    for (long j = 0; j < n; j++) {
        float g = grad[j];
        if (c.weight_decay != 0.0f) g += c.weight_decay * p[j];
        sum[j] += g * g;
        p[j] -= clr * (g / (sqrtf(sum[j]) + c.eps));
    }
}

/* ---------------------------------------------------------------------------------------- */
/* serving's outputs, per row: as trainserve.training.network.outputs_to_probabilities */

/* binary: the sigmoid of the one logit, as [1 - p, p] */
KERNEL void sigmoid_pair_row(float *out, const float *logit) {
    float p = 1.0f / (1.0f + expf(-logit[0]));
    out[0] = 1.0f - p;
    out[1] = p;
}

/* classification: softmax over C logits; h is overwritten */
KERNEL void softmax_row(float *out, float *h, long C) {
    float top = h[0];
    for (long j = 1; j < C; j++)
        if (h[j] > top) top = h[j];
    float total = 0.0f;
    for (long j = 0; j < C; j++) {
        h[j] = expf(h[j] - top);
        total += h[j];
    }
    for (long j = 0; j < C; j++) out[j] = h[j] / total;
}

/* ---------------------------------------------------------------------------------------- */
/* end of the kernels; the generated sequence for one spec follows */
