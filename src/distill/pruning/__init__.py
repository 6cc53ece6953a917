"""Structured pruning of Hugging Face causal LMs, as in Minitron (docs/methods.md §10).

Three steps, each a module here; ``distill prune`` (:mod:`distill.commands.prune`) runs them in order:

1. :func:`~distill.pruning.importance.score`: forward passes over calibration batches with hooks, no
   gradients. Per unit, the activation magnitude at each position (the L2 norm of a head's output, |value| for
   an MLP neuron or an embedding channel) is averaged over the sequence, then aggregated over sequences with
   an L2 norm (Minitron's best aggregation: mean over the sequence, L2 over the batch). Heads read the input
   of ``o_proj`` split per head; neurons the input of ``down_proj``; embedding channels the output of every
   norm of the hidden dimension (each layer's and the final one: one ranking shared by the embeddings, every
   layer and the output layer). Layers get two scores: the calibration loss increase when the layer alone is
   skipped, and the block's cosine distance ``1 - cos(input, output)`` averaged over tokens.
2. :func:`~distill.pruning.plan.make_plan`: which layers, channels, KV groups, query heads and neurons to keep
   for target sizes (explicit, or :func:`~distill.pruning.sizes.sizes_for_budget` for a parameter budget).
   Grouped-query attention stays valid: whole KV groups are ranked (by the L2 norm of their query heads'
   scores) and kept, then the same number of query heads is kept in every kept group. Kept indices stay in
   their original order, so a plan that removes nothing reproduces the model exactly.
3. :func:`~distill.pruning.slicing.slice_model`: a new model of the same class, built from the updated config
   (``head_dim`` kept explicit, ``layer_types`` of the kept layers), loaded strictly with the sliced weights;
   norms, biases, Qwen3's per-head q/k norms, tied or untied embeddings and Gemma 2's soft-capping follow.

:mod:`distill.pruning.sizes` holds the supported families, their parameter layout and the checks of target
sizes; :mod:`distill.pruning.report` scores each plan's pruned model for the report.
"""
