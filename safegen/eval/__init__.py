"""Evaluation: named prompt sets (:mod:`.datasets`), image oracles (:mod:`.oracles`, a leaf the output guard may
use), the resumable sharded harness (:mod:`.harness`), tables and plots (:mod:`.results`), and the ``safegen eval``
command (:mod:`.command`, also ``python -m safegen.eval``).

Importing the package is cheap: nothing heavy loads until a submodule is used.
"""
