"""Generation on token ids: what ``distill generate``, the on-policy sources, SKD and speculative decoding sample.

* :mod:`distill.generation.sampling`: explicit sampling parameters, per-row seeds, the incremental
  :class:`~distill.generation.sampling.Decoder` and :func:`~distill.generation.sampling.sample`.
* :mod:`distill.generation.correction`: speculative KD, the student's tokens corrected by the teacher.
* :mod:`distill.generation.speculative`: speculative decoding, a draft checked by the target.
* :mod:`distill.generation.samplers`: ``distill generate``'s samples from a local model or a server.
"""
