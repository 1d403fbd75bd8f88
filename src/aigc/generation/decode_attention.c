/* Decode-step attention over a KV cache, for `aigc.generation.attention_kernel`.
 *
 * Built at first use with the system C compiler for this machine (-march=native) and one head
 * size (HEAD_DIM), then called through ctypes. One query per row: the batched matrix-vector work
 * of a decode step, where torch's SDPA pays more in setup than in arithmetic. Built with -fopenmp
 * when the compiler can, it links libgomp.so.1, which resolves to the copy torch has already
 * loaded: the same threads as torch, and torch.set_num_threads applies.
 */
#include <stdint.h>
#include <string.h>

#ifndef HEAD_DIM
#error "build with -DHEAD_DIM=<head size>"
#endif
#define D HEAD_DIM
#define BLK 128 /* slots per online-softmax block */
#define PARALLEL_WORK 4096

/* e^x for x <= 0 (scores minus their running max): 2^(x log2 e) = 2^n 2^f, f in [-1/2, 1/2],
 * 2^f by its Taylor series to degree 6 (relative error ~1e-7). Plain arithmetic, so the loop
 * that calls it vectorises. */
static inline float exp_nonpos(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float t = x * 1.4426950408889634f;
    const float n = __builtin_floorf(t + 0.5f);
    const float f = t - n;
    float p = 1.5403530393381609e-4f;
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910071e-1f;
    p = p * f + 6.9314718055994531e-1f;
    p = p * f + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &bits, sizeof s);
    return p * s;
}

/* For every query row b and query head h (its k/v head is h / (H / K)), in cache row
 * r = rows ? rows[b] : b:
 *   out[b, h] = softmax(scale * q[b, h] . k[r, g, j] for j < lens[b]) @ v[r, g, :lens[b]]
 * With kn (not NULL), each row's new key and value (kn[b, g], vn[b, g]) are first written to slot
 * lens[b] - 1 of its cache row, for every row before any row attends: several query rows may share
 * a cache row (a prompt's tokens, rows[b] equal, lens 1..T), each attending the slots the earlier
 * ones wrote, which is causal attention over the prompt. q rows, new k/v rows, cache rows and slots
 * are addressed by element strides; the last dim (D) is contiguous, out is a contiguous (B, H, D).
 * Online softmax over blocks of BLK slots: no scratch beyond the stack. */
void aigc_decode_attention_f32(
    const float *q, int64_t q_sb, int64_t q_sh,
    const float *kn, int64_t kn_sb, const float *vn, int64_t vn_sb,
    float *k, float *v, int64_t kv_sb, int64_t kv_sh, int64_t kv_ss,
    const int64_t *rows, const int64_t *lens, float *out, int64_t B, int64_t H, int64_t K, float scale)
{
    const int64_t G = H / K;
    int64_t work = 0; /* slots x heads: threads only pay for themselves on a few thousand */
    for (int64_t b = 0; b < B; b++) work += lens[b] * H;
    if (kn) {
        for (int64_t b = 0; b < B; b++) {
            const int64_t at = (rows ? rows[b] : b) * kv_sb + (lens[b] - 1) * kv_ss;
            for (int64_t g = 0; g < K; g++) {
                memcpy(k + at + g * kv_sh, kn + b * kn_sb + g * D, D * sizeof(float));
                memcpy(v + at + g * kv_sh, vn + b * vn_sb + g * D, D * sizeof(float));
            }
        }
    }
#pragma omp parallel for collapse(2) schedule(static) if (work >= PARALLEL_WORK)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < H; h++) {
            const int64_t n = lens[b];
            float sc[BLK];
            float acc[D];
            const float *qp = q + b * q_sb + h * q_sh;
            const int64_t r = rows ? rows[b] : b;
            const float *kp = k + r * kv_sb + (h / G) * kv_sh;
            const float *vp = v + r * kv_sb + (h / G) * kv_sh;
            float m = -1e30f, l = 0.0f;
            for (int d = 0; d < D; d++) acc[d] = 0.0f;
            for (int64_t j0 = 0; j0 < n; j0 += BLK) {
                const int64_t jn = n - j0 < BLK ? n - j0 : BLK;
                float bm = -1e30f;
                for (int64_t j = 0; j < jn; j++) {
                    const float *kr = kp + (j0 + j) * kv_ss;
                    float s = 0.0f;
                    for (int d = 0; d < D; d++) s += qp[d] * kr[d];
                    s *= scale;
                    sc[j] = s;
                    bm = s > bm ? s : bm;
                }
                const float mn = bm > m ? bm : m;
                const float corr = exp_nonpos(m - mn);
                l *= corr;
                for (int d = 0; d < D; d++) acc[d] *= corr;
                for (int64_t j = 0; j < jn; j++) {
                    const float p = exp_nonpos(sc[j] - mn);
                    sc[j] = p;
                    l += p;
                }
                /* four slots per pass: four independent products per accumulator update */
                int64_t j = 0;
                for (; j + 4 <= jn; j += 4) {
                    const float *vr = vp + (j0 + j) * kv_ss;
                    for (int d = 0; d < D; d++)
                        acc[d] += (sc[j] * vr[d] + sc[j + 1] * vr[kv_ss + d])
                                + (sc[j + 2] * vr[2 * kv_ss + d] + sc[j + 3] * vr[3 * kv_ss + d]);
                }
                for (; j < jn; j++) {
                    const float *vr = vp + (j0 + j) * kv_ss;
                    for (int d = 0; d < D; d++) acc[d] += sc[j] * vr[d];
                }
                m = mn;
            }
            float *op = out + (b * H + h) * D;
            const float inv = 1.0f / l;
            for (int d = 0; d < D; d++) op[d] = acc[d] * inv;
        }
    }
}
