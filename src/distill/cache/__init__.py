"""Offline teacher caches: sparse per-token teacher targets (top-k + tail, or sampled) on disk, written once by
``distill cache``, read by training and evaluation (``teacher: {cache: DIR}``).

* :mod:`distill.cache.codec`: the format: bit packing, Rice codes, quantization, hashes, shard files.
* :mod:`distill.cache.capture`: the targets from a teacher's logits and the shards written from them.
* :mod:`distill.cache.reader`: :class:`~distill.cache.reader.TeacherCache`, the manifest checks and the targets
  read back.
"""
