/* Greedy draft trees of the block drafters (DFlash, DSpark) for every sequence of a round, grown
 * best-first in one native call: tandem/tree_search.py's greedy_trees with the drafters' expansion
 * (children_of in tandem/drafters/dflash.py and dspark.py) folded in, making the same choices
 * node for node.
 *
 * Why: in Python a depth of the search is some 25 small torch ops plus a loop over its nodes,
 * which at batch 1 cost more than the drafter's own backbone pass. Here a depth is one call of
 * the Markov head's linear (tandem_linear on its packed weights: the very numbers the torch path
 * gets) and loops over the draft vocabulary.
 *
 * Per depth, each frontier node's children are its `topk` best draft tokens under the block
 * position's logits (plus, for DSpark, the Markov bias of the node's own token), scored by
 * cumulative log-probability; the `topk` best children (ties: lower id) are the next frontier.
 * At the end the `budget` best nodes are kept (closed under ancestors: a child never outscores
 * its parent) and renumbered in id order. A node's survival is its parent's times min(1, f),
 * f = exp(lp) without a confidence head (DFlash), else the parent's confidence times
 * exp(lp - lp_best) (DSpark). Scores and survivals are doubles, as Python's floats are.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "storage.h"

/* from exact_cpu.c */
void tandem_linear(const void *x, int64_t ldx, int64_t M, int64_t K, const void *packed, int64_t N,
                   const void *bias, void *out, int64_t ldo, int out_f32, int f32, int wide, int threads);
void tandem_log_sum_exp(const float *x, int64_t n, float *max_out, float *log_sum_out);

typedef struct {
    double score, survival;
    int64_t token, parent;
} tree_node;

/* The k best of `ids` by (score descending, id ascending), written back in id order; returns k. */
static int64_t best_of(const tree_node *nodes, int64_t *ids, int64_t n, int64_t k) {
    for (int64_t i = 1; i < n; i++) { /* insertion sort: n is at most topk^2 (or the tree's size) */
        int64_t id = ids[i], j = i;
        for (; j > 0; j--) {
            const tree_node *a = nodes + ids[j - 1], *b = nodes + id;
            if (a->score > b->score || (a->score == b->score && ids[j - 1] < id)) break;
            ids[j] = ids[j - 1];
        }
        ids[j] = id;
    }
    if (k > n) k = n;
    for (int64_t i = 1; i < k; i++) { /* the kept ones back in id order */
        int64_t id = ids[i], j = i;
        for (; j > 0 && ids[j - 1] > id; j--) ids[j] = ids[j - 1];
        ids[j] = id;
    }
    return k;
}

/* The `topk` largest of x[0..V) (ties: lower index first), descending, into idx. */
static void top_k(const float *x, int64_t V, int64_t k, int64_t *idx) {
    int64_t n = 0;
    for (int64_t i = 0; i < V; i++) {
        if (n == k && !(x[i] > x[idx[k - 1]])) continue;
        int64_t j = n < k ? n++ : k - 1;
        for (; j > 0 && x[i] > x[idx[j - 1]]; j--) idx[j] = idx[j - 1];
        idx[j] = i;
    }
}

/* base: [B, D, V] float32 draft logits of each block position; roots, budgets: [B] (budget: draft
 * nodes to keep, at most the shape's); vocab_map: [V] target id of each draft id.
 * Markov head: to_draft [target vocabulary] draft id of each target id (V: none), markov_in
 * [V + 1, rank] the code of each (NULL: no head), markov_packed its output linear, packed (NULL:
 * the codes feed the confidence only, no bias), both in the storage type `f32` says; `wide`,
 * `threads`: as tandem_linear's.
 * conf_mode: 0 no confidence head (f = exp(lp)); 1 confidence sigmoid((conf_hidden[b, d] +
 * conf_code . code) / temps[min(d, n_temps - 1)]) (conf_code NULL: no code term; n_temps 0: T = 1);
 * 2 a confidence of 1.
 * Out, per tree at most `cap` nodes (root first): out_count [B], out_tokens and out_parents
 * [B, cap], out_survival [B, cap]. Returns 0, or -1 when out of memory. */
int64_t tandem_greedy_trees(const float *base, int64_t B, int64_t D, int64_t V, const int64_t *roots,
                            const int64_t *budgets, int64_t topk, int64_t depth, const int64_t *vocab_map,
                            const int64_t *to_draft, const void *markov_in, const void *markov_packed, int64_t rank,
                            int f32, int wide, int threads, int conf_mode, const float *conf_hidden,
                            const float *conf_code, const float *temps, int64_t n_temps, int64_t cap,
                            int64_t *out_count, int64_t *out_tokens, int64_t *out_parents, double *out_survival) {
    int64_t grown = 1 + topk + (depth > 1 ? (depth - 1) * topk * topk : 0); /* nodes a tree can reach */
    tree_node *nodes = malloc(sizeof(tree_node) * (size_t)(B * grown));
    int64_t *size = calloc((size_t)B, sizeof(int64_t)), *frontier = malloc(sizeof(int64_t) * (size_t)(B * topk));
    int64_t *fcount = calloc((size_t)B, sizeof(int64_t)), *ids = malloc(sizeof(int64_t) * (size_t)grown);
    int64_t *best = malloc(sizeof(int64_t) * (size_t)topk);
    float *logits = malloc(sizeof(float) * (size_t)V);
    size_t item = f32 ? 4 : 2;
    void *codes = markov_in ? malloc(item * (size_t)(B * topk * rank)) : NULL;
    void *bias = markov_packed ? malloc(item * (size_t)(B * topk * V)) : NULL;
    int failed = !nodes || !size || !frontier || !fcount || !ids || !best || !logits || (markov_in && !codes) ||
                 (markov_packed && !bias);
    int64_t deepest = 0;
    for (int64_t b = 0; b < B && !failed; b++) {
        nodes[b * grown] = (tree_node){0.0, 1.0, roots[b], -1};
        size[b] = 1;
        frontier[b * topk] = 0;
        fcount[b] = 1;
        int64_t reach = budgets[b] < depth ? budgets[b] : depth;
        if (reach > deepest) deepest = reach;
    }
    for (int64_t d = 0; d < deepest && !failed; d++) {
        int64_t M = 0; /* frontier rows of every tree, in tree order */
        for (int64_t b = 0; b < B; b++) {
            if (d >= (budgets[b] < depth ? budgets[b] : depth)) fcount[b] = 0;
            for (int64_t f = 0; f < fcount[b]; f++) {
                int64_t token = nodes[b * grown + frontier[b * topk + f]].token;
                if (markov_in)
                    memcpy((char *)codes + item * (size_t)(M * rank),
                           (const char *)markov_in + item * (size_t)(to_draft[token] * rank), item * (size_t)rank);
                M++;
            }
        }
        if (M == 0) break;
        if (markov_packed) tandem_linear(codes, rank, M, rank, markov_packed, V, NULL, bias, V, f32, f32, wide, threads);
        int64_t row = 0;
        for (int64_t b = 0; b < B; b++) {
            tree_node *tree = nodes + b * grown;
            int64_t children = 0, first_child = size[b];
            float m = 0.0f, log_sum = 0.0f;
            for (int64_t f = 0; f < fcount[b]; f++, row++) {
                int64_t parent = frontier[b * topk + f];
                const float *u = base + (b * D + d) * V, *x = u;
                if (markov_packed) { /* DSpark: the position's logits plus the parent's transition bias */
                    if (f32)
                        for (int64_t i = 0; i < V; i++) logits[i] = u[i] + ((const float *)bias)[row * V + i];
                    else
                        for (int64_t i = 0; i < V; i++) logits[i] = u[i] + load1(bias, row * V + i, 0);
                    x = logits;
                }
                if (markov_packed || f == 0) { /* without a bias every parent's children are the same */
                    tandem_log_sum_exp(x, V, &m, &log_sum);
                    top_k(x, V, topk, best);
                }
                double confidence = 1.0;
                if (conf_mode == 1) {
                    float z = conf_hidden[b * D + d];
                    if (conf_code)
                        for (int64_t r = 0; r < rank; r++) z += conf_code[r] * load1(codes, row * rank + r, f32);
                    float t = n_temps ? temps[d < n_temps ? d : n_temps - 1] : 1.0f;
                    confidence = (double)(1.0f / (1.0f + expf(-(z / t))));
                }
                double lp0 = (double)((x[best[0]] - m) - log_sum);
                for (int64_t j = 0; j < topk; j++) {
                    double lp = (double)((x[best[j]] - m) - log_sum);
                    double factor = conf_mode == 0 ? exp(lp) : confidence * exp(lp - lp0);
                    tree_node *parent_node = tree + parent;
                    tree[size[b]++] = (tree_node){parent_node->score + lp,
                                                  parent_node->survival * (factor < 1.0 ? factor : 1.0),
                                                  vocab_map[best[j]], parent};
                    children++;
                }
            }
            for (int64_t i = 0; i < children; i++) ids[i] = first_child + i;
            fcount[b] = best_of(tree, ids, children, topk);
            memcpy(frontier + b * topk, ids, sizeof(int64_t) * (size_t)fcount[b]);
        }
    }
    for (int64_t b = 0; b < B && !failed; b++) { /* the budget's best nodes, renumbered in id order */
        tree_node *tree = nodes + b * grown;
        for (int64_t i = 1; i < size[b]; i++) ids[i - 1] = i;
        int64_t keep = best_of(tree, ids, size[b] - 1, budgets[b] < cap - 1 ? budgets[b] : cap - 1);
        out_count[b] = keep + 1;
        out_tokens[b * cap] = tree[0].token;
        out_parents[b * cap] = -1;
        out_survival[b * cap] = 1.0;
        for (int64_t i = 0; i < keep; i++) {
            tree_node *node = tree + ids[i];
            int64_t parent = 0; /* the parent's new number: its place among the kept (0: the root) */
            for (int64_t j = 0; j < i; j++)
                if (ids[j] == node->parent) parent = j + 1;
            out_tokens[b * cap + i + 1] = node->token;
            out_parents[b * cap + i + 1] = parent;
            out_survival[b * cap + i + 1] = node->survival;
        }
    }
    free(nodes), free(size), free(frontier), free(fcount), free(ids), free(best), free(logits);
    free(codes), free(bias);
    return failed ? -1 : 0;
}
