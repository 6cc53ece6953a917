"""A teacher behind an HTTP server.

* :mod:`distill.server.app`: ``distill serve``, an OpenAI-compatible server (vLLM's response shape) for a model
  in this process.
* :mod:`distill.server.client`: the client side: requests with retries, the vLLM / SGLang / ``distill serve``
  response shapes, scoring on token ids, and the server's side of speculative KD.
"""
