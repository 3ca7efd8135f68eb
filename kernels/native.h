/* The native kernels' typed interface: the structs that cross from Python into native.c.
 *
 * Written once, here: kernels/native.py builds its ctypes.Structure classes from the typedefs
 * below when it loads the library (so it reads this file's syntax: one field per line,
 * `type name;` or `type name[N];`, the type int64_t, int32_t, float, a pointer, or a struct
 * typedef'd above it). GP_ABI_VERSION changes with any struct or exported signature, and
 * native.py refuses a library whose gp_abi_version() is not the one it read here.
 *
 * Room left for the open issues (each bumps the version): attention options (logit soft-cap,
 * sinks) in gp_step_t, the activation kind. gp_decode_attention and gp_prefill_attention
 * take sinks (one float32 logit a query head, or NULL) since version 10, a soft cap of the
 * scores (0: none; Gemma 2) since 11. gp_step_t's windows: each layer's sliding window
 * (0: none), or NULL. Since 16 a step's layers may be two KV groups (gp_kv_t's groups, the
 * step's window_* slots and tables: a model mixing global and windowed layers). */
#ifndef GPUPOOL_NATIVE_H
#define GPUPOOL_NATIVE_H

#include <stdint.h>

#define GP_ABI_VERSION 17
#define GP_LORA_GROUPS 4 /* qkv, o, gate_up, down (adapters.base.GROUPS' order) */

/* one layer's weights: bf16 [N][K], int8 with bf16 row scales, or 4-bit (packed [N][K / 2]
 * with float32 group scales and offsets [N][K / group], kernels/quant4.py); NULL where absent
 * (a scale: not that kind; the bias: none). The field names are the model's weight names
 * (LlamaModel.layers' keys): native.py fills each field from the weight of its name, and a
 * `_group` field with the 4-bit weight's group size (0: not 4-bit). The norms' weights are
 * bf16, or float32 (Gemma's 1 + weight: the step's norm_f32); q_norm, k_norm: each head's
 * [head_dim] (Qwen3, Gemma 3); pre_ff_norm, post_ff_norm: Gemma's sandwich (post_norm then
 * norms the attention's output); NULL where the model has none. */
typedef struct {
    const void *input_norm;
    const void *post_norm;
    const void *q_norm;
    const void *k_norm;
    const void *pre_ff_norm;
    const void *post_ff_norm;
    const void *qkv_weight;
    const void *qkv_weight_scale;
    const void *qkv_weight_gscale;
    const void *qkv_weight_goffset;
    int64_t qkv_weight_group;
    const void *qkv_bias;
    const void *o_weight;
    const void *o_weight_scale;
    const void *o_weight_gscale;
    const void *o_weight_goffset;
    int64_t o_weight_group;
    const void *gate_up_weight;
    const void *gate_up_weight_scale;
    const void *gate_up_weight_gscale;
    const void *gate_up_weight_goffset;
    int64_t gate_up_weight_group;
    const void *down_weight;
    const void *down_weight_scale;
    const void *down_weight_gscale;
    const void *down_weight_goffset;
    int64_t down_weight_group;
} gp_layer_t;

/* one projection group's LoRA terms: where its rows lie in a piece's bf16 part (bytes from
 * the part's start): A's rows [P][K] at a_offset (projection j's rank row at a_offset + j K
 * elements), the transposed Bs' rank row [sum widths] at bt_offset; the projections' widths
 * and their ranks per segment, [P][S] */
typedef struct {
    int64_t a_offset;
    int64_t bt_offset;
    int64_t num_proj;
    int64_t widths[3];
    const int32_t *proj_rank;
} gp_lora_group_t;

/* a step's LoRA terms: its segments (starts [S + 1], ranks [S]) and each segment's adapter
 * through its page table (adapters/paged.py): the adapter's pieces, one a rank row of one
 * layer (piece l r + k: layer l, rank row k), lie pieces_per_page to a page in the order of
 * its pages, page_ids[seg_pages[s] .. seg_pages[s + 1]); page p starts at base + p page_bytes;
 * a piece's bf16 part at mirror_offset in it */
typedef struct {
    int64_t num_segments;
    const int32_t *starts;
    const int32_t *seg_rank;
    const int32_t *seg_pages;
    const int32_t *page_ids;
    const uint8_t *base;
    int64_t page_bytes;
    int64_t piece_bytes;
    int64_t pieces_per_page;
    int64_t mirror_offset;
    gp_lora_group_t groups[4];
} gp_lora_t;

/* the model's KV caches: each layer's K and V pages ([pages][block_tokens][kv heads][D]); a
 * model mixing global and windowed layers: groups[l] 1 for a windowed layer, whose pages are
 * its KV group's own (window_block_tokens tokens a page, the step's window_* slots and block
 * tables); groups NULL: every layer in one group */
typedef struct {
    const void *const *k;
    const void *const *v;
    int64_t page_stride;
    int64_t block_tokens;
    const int64_t *groups;
    int64_t window_block_tokens;
} gp_kv_t;

/* a tensor-parallel rank's place in its host's shared-memory exchange (models/tp.py's
 * ShmExchange: the same file, layout and protocol): the sequence numbers (rank r's at
 * flags[8 r]), the slots (two a rank, slot_bytes each, after the flags), this rank, the
 * group's size, the last sequence number used (updated by the call), the caller's alive()
 * (an int (*)(void): 0 once a peer is gone; asked every ~0.1 s of waiting) and how long a
 * wait may last */
typedef struct {
    int64_t *flags;
    void *slots;
    int64_t slot_bytes;
    int64_t rank;
    int64_t world;
    int64_t *seq;
    const void *alive;
    int64_t timeout_ms;
} gp_tp_t;

/* a decode step through every layer (gp_decode_layers). Gemma's: norm_f32 (every norm's
 * weights float32), act 1 (GeGLU; 0: SiLU x up), softcap (the scores' cap, 0: none), and
 * Gemma 3's windowed layers' rotary table cos_sin_local for the layers local_layers[l] says
 * (NULL: none) */
typedef struct {
    int64_t rows;
    int64_t hidden;
    int64_t inter;
    int64_t num_heads;
    int64_t num_kv_heads;
    int64_t head_dim;
    int64_t num_layers;
    float eps;
    float scale;
    const gp_layer_t *layers;
    const gp_kv_t *kv;
    const uint16_t *cos_sin;
    const int64_t *positions;
    const int64_t *slot_pages;
    const int64_t *slot_offsets;
    const int32_t *block_tables;
    int64_t block_table_stride;
    const int32_t *context_lens;
    const void *final_norm;
    uint16_t *x;
    uint16_t *out;
    const int64_t *ids;
    const void *embed;
    const uint16_t *embed_scale;
    const void *head;
    const uint16_t *head_scale;
    int64_t vocab;
    float *logits;
    const gp_lora_t *lora;
    const gp_tp_t *tp;
    const int64_t *windows;
    const int64_t *window_slot_pages;
    const int64_t *window_slot_offsets;
    const int32_t *window_block_tables;
    int64_t window_block_table_stride;
    int64_t norm_f32;
    int64_t act;
    float softcap;
    const uint16_t *cos_sin_local;
    const int64_t *local_layers;
} gp_step_t;

int gp_abi_version(void);
int gp_decode_layers(const gp_step_t *step, int threads);

#endif
