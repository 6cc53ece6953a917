"""Offline teacher caches: sparse per-token teacher targets (top-k + tail, or sampled) on disk, written once by
``distill cache``, read by training and evaluation (``teacher: {cache: DIR}``).

* :mod:`distill.caching.codec`: the format: bit packing, Rice codes, quantization, hashes, shard files.
* :mod:`distill.caching.capture`: the targets from a teacher's logits and the shards written from them.
* :mod:`distill.caching.reader`: :class:`~distill.caching.reader.TeacherCache`, the manifest checks and the targets
  read back.
"""
