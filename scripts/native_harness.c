/*
 * A C harness for trainserve's generated native code (scripts/check_native.py): linked with
 * one spec's train_steps and its model's forward_rows, built with
 * -fsanitize=address,undefined, it reads their ABI records, allocates every buffer at
 * exactly the size the record gives (so AddressSanitizer catches a read or write one
 * element past any of them), runs forward, loss, backward and update over a few small
 * batches (one of them partial), the fences (a row index outside the data, a class label
 * out of range) and the row-wise forward pass, and checks each result is finite.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

extern const long train_abi_in_features, train_abi_batch_size, train_abi_out_width, train_abi_y_width;
extern const long train_abi_y_is_int64, train_abi_n_params, train_abi_n_slots;
extern const long train_abi_param_sizes[], train_abi_slot_is_scalar[];
extern const long forward_abi_in_features, forward_abi_out_width, forward_abi_n_params;
extern const long forward_abi_param_sizes[];

int train_steps(float **P_, float **S_, const float *X, const void *Yv, const int64_t *idx, const float *mean,
                const float *sd, long n_x, long n, long start, long stop, double lr, float *loss_sum, int *fresh);
int forward_rows(float **P_, const float *X, const float *mean, const float *sd, long n, float *out);

static uint32_t seed = 12345u;

static float uniform(void) { /* in [-1, 1), deterministic */
    seed = seed * 1664525u + 1013904223u;
    return (float)(seed >> 8) / 8388608.0f - 1.0f;
}

static void *alloc(size_t bytes) {
    void *p = calloc(bytes ? bytes : 1, 1);
    if (!p) {
        fprintf(stderr, "harness: out of memory\n");
        exit(2);
    }
    return p;
}

static float *randoms(long n, float scale) {
    float *a = alloc(sizeof(float) * (size_t)n);
    for (long i = 0; i < n; i++) a[i] = scale * uniform();
    return a;
}

static int expect(int ok, const char *what) {
    if (!ok) fprintf(stderr, "harness: %s\n", what);
    return ok ? 0 : 1;
}

int main(void) {
    const long F = train_abi_in_features, bs = train_abi_batch_size, W = train_abi_out_width;
    const long NP = train_abi_n_params, NS = train_abi_n_slots, YW = train_abi_y_width;
    const long n_x = 3 * bs + 2, n = n_x - 1; /* a partial last batch; one row held out */
    int failures = 0;

    float **P = alloc(sizeof(float *) * (size_t)NP), **S = alloc(sizeof(float *) * (size_t)(NP * NS + 1));
    for (long i = 0; i < NP; i++) P[i] = randoms(train_abi_param_sizes[i], 0.5f);
    for (long i = 0; i < NP; i++)
        for (long j = 0; j < NS; j++)
            S[i * NS + j] = alloc(sizeof(float) * (size_t)(train_abi_slot_is_scalar[j] ? 1 : train_abi_param_sizes[i]));
    float *X = randoms(n_x * F, 2.0f), *mean = randoms(F, 0.1f), *sd = alloc(sizeof(float) * (size_t)F);
    for (long i = 0; i < F; i++) sd[i] = 1.0f + 0.5f * uniform();
    void *Y;
    if (train_abi_y_is_int64) {
        int64_t *labels = alloc(sizeof(int64_t) * (size_t)n_x);
        for (long r = 0; r < n_x; r++) labels[r] = r % W;
        Y = labels;
    } else {
        float *targets = randoms(n_x * YW, 1.0f);
        for (long j = 0; j < n_x * YW; j++) targets[j] = targets[j] > 0.0f ? targets[j] : 0.0f; /* BCE: [0, 1] */
        Y = targets;
    }
    int64_t *idx = alloc(sizeof(int64_t) * (size_t)n);
    for (long r = 0; r < n; r++) idx[r] = n - 1 - r; /* shuffled: reversed */

    long batches = (n + bs - 1) / bs;
    float loss = 0.0f;
    int fresh = 1;
    failures += expect(train_steps(P, S, X, Y, idx, mean, sd, n_x, n, 0, batches, 0.01, &loss, &fresh) == 0,
                       "train_steps (shuffled) failed");
    failures += expect(isfinite(loss) && fresh == 0, "train_steps (shuffled): loss not finite");
    long batches_x = (n_x + bs - 1) / bs;
    failures += expect(train_steps(P, S, X, Y, NULL, mean, sd, n_x, n_x, 1, batches_x, 0.01, &loss, &fresh) == 0,
                       "train_steps (in order) failed");
    for (long i = 0; i < NP; i++)
        for (long j = 0; j < train_abi_param_sizes[i]; j++) failures += expect(isfinite(P[i][j]), "weight not finite");

    /* The fences: a row index outside the data, then (classifiers) a label out of range. */
    idx[0] = n_x;
    failures += expect(train_steps(P, S, X, Y, idx, mean, sd, n_x, n, 0, 1, 0.01, &loss, &fresh) == 2,
                       "an out-of-range row index was not refused");
    idx[0] = -1;
    failures += expect(train_steps(P, S, X, Y, idx, mean, sd, n_x, n, 0, 1, 0.01, &loss, &fresh) == 2,
                       "a negative row index was not refused");
    idx[0] = 0;
    if (train_abi_y_is_int64) {
        ((int64_t *)Y)[0] = W;
        failures += expect(train_steps(P, S, X, Y, idx, mean, sd, n_x, n, 0, 1, 0.01, &loss, &fresh) == 3,
                           "an out-of-range class label was not refused");
    }

    /* The row-wise forward pass, its weights transposed: the same sizes, another layout. */
    failures += expect(forward_abi_in_features == F && forward_abi_n_params == NP, "forward ABI differs");
    float **Q = alloc(sizeof(float *) * (size_t)forward_abi_n_params);
    for (long i = 0; i < forward_abi_n_params; i++) Q[i] = randoms(forward_abi_param_sizes[i], 0.5f);
    float *out = alloc(sizeof(float) * (size_t)(n_x * forward_abi_out_width));
    failures += expect(forward_rows(Q, X, mean, sd, n_x, out) == 0, "forward_rows failed");
    for (long j = 0; j < n_x * forward_abi_out_width; j++) failures += expect(isfinite(out[j]), "output not finite");

    for (long i = 0; i < NP; i++) free(P[i]), free(Q[i]);
    for (long i = 0; i < NP * NS; i++) free(S[i]);
    free(P), free(Q), free(S), free(X), free(mean), free(sd), free(Y), free(idx), free(out);
    return failures ? 1 : 0;
}
