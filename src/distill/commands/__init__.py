"""The commands of ``distill`` (:mod:`distill.cli` parses their arguments): one module each, ``main(cfg)`` read top
to bottom. A command never imports another command: what two of them share lives in a lower module
(:mod:`distill.training`, :mod:`distill.evaluation`, ...)."""
